"""Dense mixtures: every expert runs on every token and the gates mix them.

:class:`DenseMoE` is the layer of slide 1 (the deck calls it ``MoE``; this package called it
``SoftMoE`` before, a name that belongs to Puigcerver et al.'s slot layer,
:class:`~moe_lab.layers.slot.SlotSoftMoE`) and :class:`SharedTrunkMoE` the weight-sharing
layer of slide 7. Both keep the deck's attribute names, so a ``state_dict`` saved from the
deck's classes loads into them and gives the same outputs, but they accept any leading
dimensions (``(..., input_size)``), not only ``(batch, input_size)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab._checks import last_dim, positive_int
from moe_lab.layers.activations import get_activation
from moe_lab.layers.base import MixtureLayer, dense_routing, routing_dtype
from moe_lab.layers.registry import register_layer
from moe_lab.layers.routing import Routing


def dense_mixture(x: torch.Tensor, gates: torch.Tensor, experts: nn.ModuleList,
                  activation=None) -> torch.Tensor:
    """Return ``sum_e gates[:, e] * act(experts[e](x))`` for ``x`` of shape ``(n, d)``.

    Plain ``nn.Linear`` experts run as one matmul against their concatenated weights; any
    other expert module (low-rank, quantized...) is called on ``x``. A batched product with
    the ``(n, E)`` gates (cast to the experts' dtype) then mixes the ``(n, E, h)`` expert
    outputs into ``(n, h)``.
    """
    if all(type(expert) is nn.Linear for expert in experts):
        weight = torch.cat([expert.weight for expert in experts])
        bias = torch.cat([expert.bias for expert in experts])
        hidden = F.linear(x, weight, bias).view(x.shape[0], len(experts), experts[0].out_features)
    else:
        hidden = torch.stack([expert(x) for expert in experts], dim=1)
    if activation is not None:
        hidden = activation(hidden)
    return torch.bmm(gates.to(hidden.dtype).unsqueeze(1), hidden).squeeze(1)


@register_layer(aliases=("SoftMoE",))
class DenseMoE(MixtureLayer):
    """Dense mixture of experts (slide 1): ``output(sum_e softmax(gating(x))_e * expert_e(x))``.

    Args:
        num_experts: number of experts ``E``.
        input_size: width ``d`` of the input.
        expert_size: width ``h`` of each expert's output (and of the mixed hidden state).
        output_size: width ``o`` of the layer's output.
        activation: ``None`` (the deck's linear experts), ``"relu"``, ``"gelu"`` or ``"silu"``,
            applied to each expert's output before mixing.

    Shapes: ``x`` is ``(..., d)``; the result is ``(..., o)``.
    """

    DENSE = True

    def __init__(self, num_experts: int, input_size: int, expert_size: int, output_size: int,
                 *, activation: str | None = None):
        super().__init__()
        for name, value in [("num_experts", num_experts), ("input_size", input_size),
                            ("expert_size", expert_size), ("output_size", output_size)]:
            positive_int(name, value)
        self._act = get_activation(activation)
        self.config = dict(num_experts=num_experts, input_size=input_size,
                           expert_size=expert_size, output_size=output_size, activation=activation)
        self.num_experts = self.k = num_experts
        self.experts = nn.ModuleList([nn.Linear(input_size, expert_size) for _ in range(num_experts)])
        self.gating = nn.Linear(input_size, num_experts)
        self.output = nn.Linear(expert_size, output_size)

    def gate_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Gate weights ``(..., E)`` for ``x`` of shape ``(..., d)``; each row sums to one
        (in :func:`~moe_lab.layers.base.routing_dtype`: at least float32)."""
        last_dim("x", x, self.config["input_size"])
        logits = self.gating(x)
        return logits.softmax(dim=-1, dtype=routing_dtype(logits.dtype))

    def route(self, x: torch.Tensor) -> Routing:
        """Every expert, gated by the softmax of the router (:func:`~moe_lab.layers.base.dense_routing`)."""
        last_dim("x", x, self.config["input_size"])
        return dense_routing(self.gating(x.reshape(-1, x.shape[-1])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.route(x)
        flat = x.reshape(-1, x.shape[-1])
        mixed = dense_mixture(flat, routing.probs, self.experts, self._act)
        self._record(routing)
        out = self.output(mixed)
        return out.reshape(*x.shape[:-1], out.shape[-1])


@register_layer
class SharedTrunkMoE(MixtureLayer):
    """Weight sharing (slide 7): one shared layer feeds small experts, gated on the input.

    ``output(sum_e softmax(gating(x))_e * expert_layers[e](shared_layer(x)))``. Each expert
    is ``shared_size x expert_size`` instead of ``input_size x expert_size``, so when
    ``shared_size < input_size`` the experts shrink and the trunk is stored once.

    Shapes: ``x`` is ``(..., input_size)``; the result is ``(..., output_size)``.
    """

    DENSE = True
    EXPERTS = "expert_layers"

    def __init__(self, num_experts: int, input_size: int, expert_size: int, output_size: int,
                 shared_size: int, *, activation: str | None = None):
        super().__init__()
        for name, value in [("num_experts", num_experts), ("input_size", input_size),
                            ("expert_size", expert_size), ("output_size", output_size),
                            ("shared_size", shared_size)]:
            positive_int(name, value)
        self._act = get_activation(activation)
        self.config = dict(num_experts=num_experts, input_size=input_size, expert_size=expert_size,
                           output_size=output_size, shared_size=shared_size, activation=activation)
        self.num_experts = self.k = num_experts
        self.shared_layer = nn.Linear(input_size, shared_size)
        self.expert_layers = nn.ModuleList([nn.Linear(shared_size, expert_size)
                                            for _ in range(num_experts)])
        self.gating = nn.Linear(input_size, num_experts)
        self.output = nn.Linear(expert_size, output_size)

    def gate_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Gate weights ``(..., E)`` for ``x`` of shape ``(..., input_size)`` (at least float32)."""
        last_dim("x", x, self.config["input_size"])
        logits = self.gating(x)
        return logits.softmax(dim=-1, dtype=routing_dtype(logits.dtype))

    @property
    def experts(self) -> nn.ModuleList:
        """The experts (the deck's name for them is ``expert_layers``)."""
        return self.expert_layers

    def expert_input(self, x: torch.Tensor) -> torch.Tensor:
        """The shared trunk's output: what every expert receives."""
        return self.shared_layer(x)

    def route(self, x: torch.Tensor) -> Routing:
        """Every expert, gated by the softmax of the router (on the input, not the trunk)."""
        last_dim("x", x, self.config["input_size"])
        return dense_routing(self.gating(x.reshape(-1, x.shape[-1])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.route(x)
        trunk = self.shared_layer(x.reshape(-1, x.shape[-1]))
        mixed = dense_mixture(trunk, routing.probs, self.expert_layers, self._act)
        self._record(routing)
        out = self.output(mixed)
        return out.reshape(*x.shape[:-1], out.shape[-1])
