"""Soft MoE with slots (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

A sparse top-k layer makes a hard, discrete choice per token (and may drop tokens when an
expert is full); :class:`moe_lab.DenseMoE` runs every expert on every token. Soft MoE sits in
between: each expert owns ``slots_per_expert`` *slots*; every slot is a weighted average of
the tokens of one sequence (dispatch weights: a softmax over the tokens), each expert runs
only on its slots, and every token takes a weighted average of all slot outputs (combine
weights: a softmax over the slots). No token is dropped, nothing is discrete, and the work
in the experts depends on the number of slots, not on the number of tokens.

The price: a slot mixes *all* tokens of a sequence, the future ones too, so the layer is not
causal and cannot be used as-is in a decoder language model; and a token's output depends on
the other tokens of its sequence (never on other sequences of the batch).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from moe_lab._checks import last_dim, positive_int
from moe_lab.layers.activations import get_activation
from moe_lab.layers.base import MixtureLayer, dense_routing
from moe_lab.layers.registry import register_layer
from moe_lab.layers.routing import Routing


@register_layer
class SlotSoftMoE(MixtureLayer):
    """Soft MoE layer over sequences: tokens -> slots -> experts -> tokens.

    Args:
        num_experts: number of experts ``E``.
        slots_per_expert: slots ``S`` each expert processes per sequence (``n = E * S`` slots).
        input_size: token width ``d``.
        expert_size: width ``h`` of each expert's output.
        output_size: width ``o`` of the layer's output (a shared projection ``h -> o``).
        activation: ``None`` (linear experts), ``"relu"``, ``"gelu"`` or ``"silu"``, applied to
            each expert's output.

    Parameters: ``phi`` ``(d, n)`` (one learned vector per slot), ``experts`` (``E`` linears
    ``d -> h``), ``output`` (``h -> o``).

    Shapes: ``x`` is ``(batch, tokens, d)``; the result is ``(batch, tokens, o)``.
    ``logits = x @ phi`` is ``(batch, tokens, n)``; the dispatch weights are its softmax over
    the tokens (dim 1), the combine weights its softmax over the slots (dim 2).

    The paper also L2-normalises ``x`` and ``phi`` (with a learned scale) for large widths;
    this small layer leaves that out.
    """

    ROUTERS = ("phi",)  # a (d, E * S) parameter, not a linear: one column per slot
    DENSE = True

    def __init__(self, num_experts: int, slots_per_expert: int, input_size: int, expert_size: int,
                 output_size: int, *, activation: str | None = None):
        super().__init__()
        for name, value in [("num_experts", num_experts), ("slots_per_expert", slots_per_expert),
                            ("input_size", input_size), ("expert_size", expert_size),
                            ("output_size", output_size)]:
            positive_int(name, value)
        self._act = get_activation(activation)
        self.config = dict(num_experts=num_experts, slots_per_expert=slots_per_expert,
                           input_size=input_size, expert_size=expert_size, output_size=output_size,
                           activation=activation)
        self.num_experts = self.k = num_experts
        self.slots_per_expert = slots_per_expert
        self.num_slots = num_experts * slots_per_expert
        self.phi = nn.Parameter(torch.randn(input_size, self.num_slots) / math.sqrt(input_size))
        self.experts = nn.ModuleList([nn.Linear(input_size, expert_size) for _ in range(num_experts)])
        self.output = nn.Linear(expert_size, output_size)

    def _check(self, x: torch.Tensor) -> None:
        last_dim("x", x, self.config["input_size"])
        if x.dim() != 3:
            raise ValueError(f"x must have shape (batch, tokens, {self.config['input_size']}), "
                             f"got {tuple(x.shape)}")

    def routing_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dispatch, combine)``, both ``(batch, tokens, n)`` for ``x`` ``(batch, tokens, d)``.

        ``dispatch[b, :, i]`` sums to one over the tokens (how slot ``i`` averages the tokens);
        ``combine[b, t, :]`` sums to one over the slots (how token ``t`` averages the slots).
        """
        self._check(x)
        logits = x @ self.phi                                       # (B, T, n)
        return logits.softmax(dim=1), logits.softmax(dim=2)

    def route(self, x: torch.Tensor) -> Routing:
        """Token-to-expert view of the combine weights: each token's mass on each expert's slots
        (``(B * T, E)``, rows sum to one), as a dense routing. ``x`` is ``(batch, tokens, d)``."""
        _, combine = self.routing_weights(x)
        per_expert = combine.reshape(-1, self.num_experts, self.slots_per_expert).sum(-1)
        return dense_routing(per_expert.clamp_min(torch.finfo(per_expert.dtype).tiny).log())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dispatch, combine = self.routing_weights(x)                 # (B, T, n) each
        per_expert = combine.reshape(-1, self.num_experts, self.slots_per_expert).sum(-1)
        self._record(dense_routing(per_expert.clamp_min(torch.finfo(per_expert.dtype).tiny).log()))
        batch = x.shape[0]
        slots = dispatch.transpose(1, 2) @ x                        # (B, n, d): weighted token averages
        slots = slots.view(batch, self.num_experts, self.slots_per_expert, x.shape[-1])  # (B, E, S, d)
        outs = torch.stack([expert(slots[:, e]) for e, expert in enumerate(self.experts)], dim=1)
        if self._act is not None:
            outs = self._act(outs)                                  # (B, E, S, h)
        mixed = combine @ outs.reshape(batch, self.num_slots, outs.shape[-1])  # (B, T, h): slot averages
        return self.output(mixed)                                   # (B, T, o)
