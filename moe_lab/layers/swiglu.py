"""A top-k mixture of SwiGLU experts, the block used by Mixtral, OLMoE and Qwen-MoE.

Each expert is ``down(act(gate(x)) * up(x))`` with its own bias-free projections, stored as
``nn.Linear`` modules (``gate_up_proj`` holds the gate and up rows together, one matmul, as in
Hugging Face's layout), not as slices of fused 3-D tensors, so every technique of
:mod:`moe_lab.compress` applies to them. The router is a bias-free linear ``gate``: softmax
over all experts, top-k, optionally renormalised (``norm_topk_prob``). Qwen2-MoE adds a
``shared_expert`` that every token uses, scaled by ``sigmoid(shared_expert_gate(x))``.
Tokens are grouped by expert exactly as in :class:`moe_lab.TopKMoE`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moe_lab._checks import last_dim, positive_int
from moe_lab.layers.activations import get_activation
from moe_lab.layers.base import MixtureLayer, routing_dtype
from moe_lab.layers.dispatch import routed_mixture
from moe_lab.layers.registry import register_layer
from moe_lab.layers.routing import Routing, load_balancing_loss, plan_dispatch, router_z_loss, top_k_routing


class SwiGLUExpert(nn.Module):
    """``down_proj(act(gate) * up)`` with ``gate, up = gate_up_proj(x).chunk(2)``:
    ``(..., hidden) -> (..., hidden)``. The first ``intermediate_size`` rows of
    ``gate_up_proj`` are the gate, the rest the up projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu"):
        super().__init__()
        positive_int("hidden_size", hidden_size)
        positive_int("intermediate_size", intermediate_size)
        self._act = get_activation(activation)
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self._act(gate) * up)


@register_layer
class SwiGLUMoE(MixtureLayer):
    """Top-k routed SwiGLU experts, optionally with a gated shared expert (Qwen2-MoE).

    Args:
        num_experts, hidden_size, intermediate_size: ``E``, the model width ``H`` and each
            expert's inner width ``I``.
        k: experts per token.
        normalize: renormalise the k gates to sum to one (Mixtral; ``norm_topk_prob``).
        activation: the expert activation (``"silu"`` for all the supported families).
        shared_expert_size: inner width of a shared expert (``None``: no shared expert).

    Shapes: ``x`` is ``(..., H)``; the result is ``(..., H)``. After each forward the layer
    holds ``tokens_per_expert``, ``dropped_tokens`` (always 0), ``last_routing`` and the
    unweighted ``load_balancing_loss`` / ``router_z_loss`` like :class:`moe_lab.TopKMoE`
    (``aux_loss`` is ``None``: these models are compressed, not pre-trained, here).
    """

    ROUTERS = ("gate",)
    GATES = ("shared_expert_gate",)
    INPUT = "hidden_size"

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, k: int = 2, *,
                 normalize: bool = True, activation: str = "silu", shared_expert_size: int | None = None):
        super().__init__()
        positive_int("num_experts", num_experts)
        positive_int("k", k)
        if k > num_experts:
            raise ValueError(f"k must be <= num_experts ({num_experts}), got {k}")
        if shared_expert_size is not None:
            positive_int("shared_expert_size", shared_expert_size)
        self.config = dict(num_experts=num_experts, hidden_size=hidden_size,
                           intermediate_size=intermediate_size, k=k, normalize=normalize,
                           activation=activation, shared_expert_size=shared_expert_size)
        self.num_experts, self.k = num_experts, k
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList([SwiGLUExpert(hidden_size, intermediate_size, activation)
                                      for _ in range(num_experts)])
        if shared_expert_size is not None:
            self.shared_expert = SwiGLUExpert(hidden_size, shared_expert_size, activation)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)

    def route(self, x: torch.Tensor) -> Routing:
        """Routing for ``x`` ``(..., H)`` flattened to ``n`` tokens (in at least float32:
        :func:`~moe_lab.layers.base.routing_dtype`)."""
        last_dim("x", x, self.config["hidden_size"])
        logits = self.gate(x.reshape(-1, x.shape[-1]))
        return top_k_routing(logits.to(routing_dtype(logits.dtype)), self.k, routing="softmax_topk",
                             normalize=self.config["normalize"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.route(x)
        flat = x.reshape(-1, x.shape[-1])
        plan = plan_dispatch(routing.indices, routing.gates, self.num_experts)
        out = routed_mixture(flat, plan, self.experts, self.config["hidden_size"])
        if self.config["shared_expert_size"] is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        self._record(routing, plan.tokens_per_expert)
        self.load_balancing_loss = load_balancing_loss(routing.probs, routing.indices)
        self.router_z_loss = router_z_loss(routing.logits)
        return out.reshape(x.shape)
