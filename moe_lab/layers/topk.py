"""Sparse top-k mixture of experts (slides 6 and 8), vectorised.

The deck's ``ConditionalMoE`` calls every expert once per token in a Python loop. This layer
has the same attribute names and gives the same outputs on the same weights, but groups the
tokens by expert (sort, ``index_select``, one matmul per expert, ``index_add_``), so the
Python loop runs over the ``E`` experts, never over tokens. Like Hugging Face's
``MixtralSparseMoeBlock``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moe_lab._checks import finite_float, last_dim, positive_int
from moe_lab.layers.activations import get_activation
from moe_lab.layers.base import MixtureLayer, routing_dtype
from moe_lab.layers.dispatch import routed_mixture
from moe_lab.layers.registry import register_layer
from moe_lab.layers.routing import (
    Routing,
    expert_capacity,
    load_balancing_loss,
    noisy_logits,
    plan_dispatch,
    router_z_loss,
    top_k_routing,
)


@register_layer
class TopKMoE(MixtureLayer):
    """Each token is sent to its ``k`` best experts; only those experts compute.

    ``output(sum_{e in topk(x)} gate_e(x) * act(experts[e](x)))``

    Args:
        num_experts, input_size, expert_size, output_size: as in :class:`moe_lab.DenseMoE`.
        k: experts per token, ``1 <= k <= num_experts``.
        activation: ``None`` (the deck's linear experts), ``"relu"``, ``"gelu"`` or ``"silu"``.
        routing: ``"topk_softmax"`` (the deck: softmax over the top-k logits) or
            ``"softmax_topk"`` (Mixtral: softmax over all experts, then top-k).
        normalize: with ``"softmax_topk"``, renormalise the k gates to sum to one
            (``False`` is Switch / Qwen ``norm_topk_prob=False``).
        noisy_gating: add learned Gaussian noise to the logits while training
            (Shazeer et al. 2017); adds a ``noise_gating`` linear layer, zero-initialised.
        capacity_factor: if set, each expert takes at most
            ``ceil(capacity_factor * n * k / E)`` assignments per forward; the rest are dropped.
        balance_loss_weight: ``alpha`` of the Switch load-balancing loss.
        z_loss_weight: weight of the ST-MoE router z-loss.

    Shapes: ``x`` is ``(..., input_size)``; the result is ``(..., output_size)``, in ``x``'s dtype.
    Routing (softmax, top-k, gates, auxiliary losses) runs in at least float32, as in Hugging
    Face's Mixtral (:func:`~moe_lab.layers.base.routing_dtype`); the gates are cast to the
    experts' dtype when they weight the expert outputs.

    After each forward the layer holds (for the ``n`` tokens of that call):
        ``load_balancing_loss``: ``alpha * E * sum_i f_i P_i`` (equals ``alpha`` when uniform),
        ``router_z_loss``: weighted z-loss, ``aux_loss``: their sum (add it to your loss),
        ``tokens_per_expert``: ``(E,)`` assignments per expert before the capacity cut,
        ``dropped_tokens``: assignments dropped by the capacity limit,
        ``last_routing``: the :class:`moe_lab.layers.routing.Routing` used (detached).
    """

    ROUTERS = ("gating", "noise_gating")

    def __init__(self, num_experts: int, input_size: int, expert_size: int, output_size: int,
                 k: int = 2, *, activation: str | None = None, routing: str = "topk_softmax",
                 normalize: bool = True, noisy_gating: bool = False,
                 capacity_factor: float | None = None, balance_loss_weight: float = 0.0,
                 z_loss_weight: float = 0.0):
        super().__init__()
        for name, value in [("num_experts", num_experts), ("input_size", input_size),
                            ("expert_size", expert_size), ("output_size", output_size), ("k", k)]:
            positive_int(name, value)
        if k > num_experts:
            raise ValueError(f"k must be <= num_experts ({num_experts}), got {k}")
        if capacity_factor is not None:
            finite_float("capacity_factor", capacity_factor, minimum=0.0, strict=True)
        finite_float("balance_loss_weight", balance_loss_weight, minimum=0.0)
        finite_float("z_loss_weight", z_loss_weight, minimum=0.0)
        top_k_routing(torch.zeros(1, num_experts), k, routing=routing, normalize=normalize)
        self._act = get_activation(activation)
        self.config = dict(num_experts=num_experts, input_size=input_size, expert_size=expert_size,
                           output_size=output_size, k=k, activation=activation, routing=routing,
                           normalize=normalize, noisy_gating=noisy_gating,
                           capacity_factor=capacity_factor, balance_loss_weight=balance_loss_weight,
                           z_loss_weight=z_loss_weight)
        self.num_experts = num_experts
        self.k = k
        self.experts = nn.ModuleList([nn.Linear(input_size, expert_size) for _ in range(num_experts)])
        self.gating = nn.Linear(input_size, num_experts)
        self.output = nn.Linear(expert_size, output_size)
        if noisy_gating:
            self.noise_gating = nn.Linear(input_size, num_experts, bias=False)
            nn.init.zeros_(self.noise_gating.weight)

    def route(self, x: torch.Tensor) -> Routing:
        """Routing for ``x`` of shape ``(..., input_size)``, flattened to ``n`` tokens."""
        last_dim("x", x, self.config["input_size"])
        flat = x.reshape(-1, x.shape[-1])
        logits = self.gating(flat)
        logits = logits.to(routing_dtype(logits.dtype))
        if self.config["noisy_gating"] and self.training:
            logits = noisy_logits(logits, self.noise_gating(flat).to(logits.dtype))
        return top_k_routing(logits, self.k, routing=self.config["routing"],
                             normalize=self.config["normalize"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.route(x)
        flat = x.reshape(-1, x.shape[-1])
        capacity = None
        if self.config["capacity_factor"] is not None:
            capacity = expert_capacity(flat.shape[0], self.k, self.num_experts,
                                       self.config["capacity_factor"])
        plan = plan_dispatch(routing.indices, routing.gates, self.num_experts, capacity)
        act = self._act or (lambda h: h)
        mixed = routed_mixture(flat, plan, [lambda c, e=e: act(e(c)) for e in self.experts],
                               self.config["expert_size"])
        self._record(routing, plan.tokens_per_expert, plan.dropped)
        self.load_balancing_loss = self.config["balance_loss_weight"] * load_balancing_loss(
            routing.probs, routing.indices)
        self.router_z_loss = self.config["z_loss_weight"] * router_z_loss(routing.logits)
        self.aux_loss = self.load_balancing_loss + self.router_z_loss
        out = self.output(mixed)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def collect_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of ``aux_loss`` over every mixture layer in ``model`` after its last forward.

    Returns ``None`` if no layer has an auxiliary loss (or none has run yet).
    """
    losses = [m.aux_loss for m in model.modules()
              if isinstance(m, MixtureLayer) and isinstance(m.aux_loss, torch.Tensor)]
    return torch.stack(losses).sum() if losses else None
