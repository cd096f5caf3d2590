"""The interface every mixture layer implements, so that tools never guess attribute names.

A mixture layer has a *router* (one output row per expert), a list of *experts*, and a
``route(x)`` that says, for each token, which experts it uses and with which gates. After
every forward it keeps the routing it used and the load of each expert. Compression stages,
measurement, evaluation, plots and the Hugging Face bridge read a layer only through this
interface (:class:`MixtureLayer`), never through its class name.

============================  ============================================================
``layer.num_experts``         ``E``
``layer.k``                   experts computed per token (``E`` for a dense mixture)
``layer.input_size``          width of the input
``layer.router``              the routing linear (``ROUTERS[0]``); its rows are experts
``layer.experts``             the experts (``nn.ModuleList``; ``expert_layers`` is an alias
                              in :class:`~moe_lab.SharedTrunkMoE`)
``layer.route(x)``            :class:`~moe_lab.layers.routing.Routing` for ``x`` ``(..., d)``
``layer.expert_load(x)``      :class:`ExpertLoad` on calibration inputs
``layer.last_routing``        the routing of the last forward (detached)
``layer.tokens_per_expert``   ``(E,)`` assignments per expert in the last forward
============================  ============================================================

Class attributes name the parts generic tools need: ``ROUTERS`` (child linears with one row
per expert: pruned and merged together with the experts), ``GATES`` (other routing linears,
e.g. a shared expert's gate: kept in float, never pruned by expert), ``EXPERTS`` (the
attribute holding the experts), ``EXPERT_BUFFERS`` (the layer's own buffers with one entry per
expert, e.g. a score-correction bias: pruned and merged with the experts) and ``DENSE`` (every
expert runs on every token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from moe_lab.layers.routing import Routing


@dataclass
class ExpertLoad:
    """How much a layer uses each of its ``E`` experts on some tokens.

    Attributes:
        counts: ``(E,)`` float64 routed assignments per expert (for a dense layer: the tokens
            whose largest gate is that expert).
        gate_weight: ``(E,)`` float64 summed gate weight per expert.
        dense: whether every expert runs on every token (then the gates, not the counts,
            say how much an expert contributes).
    """

    counts: torch.Tensor
    gate_weight: torch.Tensor
    dense: bool

    @staticmethod
    def from_routing(routing: Routing, num_experts: int, dense: bool) -> ExpertLoad:
        """Counts and gate mass from a ``Routing`` of ``n`` tokens (on the routing's device)."""
        indices = routing.indices[:, :1] if dense else routing.indices
        counts = torch.bincount(indices.reshape(-1), minlength=num_experts).double()
        weight = torch.zeros(num_experts, dtype=torch.float64, device=indices.device)
        weight.index_add_(0, routing.indices.reshape(-1), routing.gates.reshape(-1).double())
        return ExpertLoad(counts=counts, gate_weight=weight, dense=dense)

    def __add__(self, other: ExpertLoad) -> ExpertLoad:
        return ExpertLoad(self.counts + other.counts, self.gate_weight + other.gate_weight, self.dense)

    @property
    def share(self) -> torch.Tensor:
        """``(E,)`` share of the layer's work per expert, summing to one: routed assignments for a
        sparse layer, gate mass for a dense one. All zeros when no token was seen."""
        amount = self.gate_weight if self.dense else self.counts
        total = amount.sum()
        return amount / total if total > 0 else torch.zeros_like(amount)

    @property
    def frequency(self) -> torch.Tensor:
        """``(E,)`` share of routed assignments (dense: of first choices)."""
        total = self.counts.sum()
        return self.counts / total if total > 0 else torch.zeros_like(self.counts)

    @property
    def mean_gate(self) -> torch.Tensor:
        """``(E,)`` share of the total gate weight."""
        total = self.gate_weight.sum()
        return self.gate_weight / total if total > 0 else torch.zeros_like(self.gate_weight)


class MixtureLayer(nn.Module):
    """Base class of every mixture layer (see the module docstring for the interface).

    Subclasses set ``self.num_experts``, ``self.k`` and ``self.config`` (their constructor
    arguments, used to rebuild them) and implement :meth:`route`; their ``forward`` calls
    :meth:`_record` once with the routing it used.
    """

    ROUTERS: tuple[str, ...] = ("gating",)
    GATES: tuple[str, ...] = ()
    EXPERTS: str = "experts"
    EXPERT_BUFFERS: tuple[str, ...] = ()
    INPUT: str = "input_size"
    DENSE: bool = False
    #: After-forward attributes that hold autograd graphs (dropped by deepcopy / pickle).
    _GRAPH_STATE = ("last_routing", "load_balancing_loss", "router_z_loss", "aux_loss")

    def __init__(self):
        super().__init__()
        self.tokens_per_expert = self.dropped_tokens = self.last_routing = None
        self.load_balancing_loss = self.router_z_loss = self.aux_loss = None

    @property
    def input_size(self) -> int:
        return self.config[self.INPUT]

    @property
    def router(self) -> nn.Module:
        """The routing module whose output rows are the experts."""
        return getattr(self, self.ROUTERS[0])

    @property
    def routing_modules(self) -> tuple[str, ...]:
        """Names of every child that routes or gates (kept in float by compression)."""
        return tuple(name for name in self.ROUTERS + self.GATES if getattr(self, name, None) is not None)

    def expert_modules(self) -> nn.ModuleList:
        """The experts, whatever attribute holds them."""
        return getattr(self, self.EXPERTS)

    def expert_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the experts receive for layer input ``x`` (``(n, d)``): ``x`` itself, unless the
        layer transforms it first (a shared trunk)."""
        return x

    def route(self, x: torch.Tensor) -> Routing:  # pragma: no cover - abstract
        """Routing of ``x`` ``(..., input_size)`` flattened to ``n`` tokens."""
        raise NotImplementedError

    @torch.no_grad()
    def expert_load(self, x: torch.Tensor) -> ExpertLoad:
        """:class:`ExpertLoad` of calibration inputs ``x`` ``(..., input_size)`` (no routing noise:
        the layer is put in eval mode for the call)."""
        was = self.training
        self.eval()
        try:
            routing = self.route(x)
        finally:
            self.train(was)
        return ExpertLoad.from_routing(routing, self.num_experts, self.DENSE)

    def _record(self, routing: Routing, tokens_per_expert: torch.Tensor | None = None,
                dropped: int = 0) -> None:
        """Keep what the last forward did: its routing (detached) and the load per expert."""
        if tokens_per_expert is None:
            indices = routing.indices[:, :1] if self.DENSE else routing.indices
            tokens_per_expert = torch.bincount(indices.reshape(-1), minlength=self.num_experts)
        self.tokens_per_expert, self.dropped_tokens = tokens_per_expert, dropped
        self.last_routing = Routing(*(t.detach() for t in (routing.logits, routing.probs, routing.gates,
                                                            routing.indices)))

    def __getstate__(self):
        state = super().__getstate__().copy()
        for name in self._GRAPH_STATE:
            state[name] = None
        return state


def mixture_layers(model: nn.Module) -> list[tuple[str, MixtureLayer]]:
    """``(name, layer)`` for every mixture layer in ``model`` (the model itself included, as ``""``)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MixtureLayer)]


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a layer routes in: ``dtype``, but at least float32.

    Router logits come out of the router in the layer's dtype; softmax, top-k, gates and the
    auxiliary losses are then computed in float32 for bfloat16 / float16 layers (as Hugging
    Face's Mixtral and Qwen-MoE blocks do: a bfloat16 softmax has 3 significant digits, which
    ties and flips close expert choices) and in float64 for float64 layers. The gates are cast
    to the experts' dtype only when they weight the expert outputs.
    """
    return torch.promote_types(dtype, torch.float32)


def dense_routing(logits: torch.Tensor) -> Routing:
    """Routing of a dense mixture from ``(n, E)`` logits: every expert is used, gates are the
    softmax (in :func:`routing_dtype`), listed from the largest gate down (so ``indices[:, 0]``
    is each token's first choice)."""
    logits = logits.to(routing_dtype(logits.dtype))
    probs = logits.softmax(dim=-1)
    gates, indices = probs.sort(dim=-1, descending=True)
    return Routing(logits=logits, probs=probs, gates=gates, indices=indices)
