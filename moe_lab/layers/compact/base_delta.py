"""A linear layer stored as a shared base weight plus a small low-rank delta (expert sharing)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab._checks import factor_sizes, last_dim
from moe_lab.layers.compact.base import CompactLinear
from moe_lab.layers.registry import register_layer


@register_layer
class BaseDeltaLinear(CompactLinear):
    """``y = x (W_base + B A)^T + b``: a shared base weight plus a rank-``r`` delta.

    ``base`` is a parameter that several experts hold (the same tensor, stored once);
    ``delta_in`` is ``A`` ``(rank, in)`` and ``delta_out`` is ``B`` ``(out, rank)``.
    ``device`` and ``dtype`` place the parameters, as for ``nn.Linear`` (not part of ``config``).
    Shapes: ``x`` is ``(..., in_features)``; the result is ``(..., out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 device=None, dtype=None):
        super().__init__()
        factor_sizes(in_features, out_features, rank)
        self.config = dict(in_features=in_features, out_features=out_features, rank=rank, bias=bias)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        where = dict(device=device, dtype=dtype)
        self.base = nn.Parameter(torch.zeros(out_features, in_features, **where))
        self.delta_in = nn.Parameter(torch.zeros(rank, in_features, **where))
        self.delta_out = nn.Parameter(torch.zeros(out_features, rank, **where))
        self.bias = nn.Parameter(torch.zeros(out_features, **where)) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        return self.base + self.delta_out @ self.delta_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last_dim("x", x, self.in_features)
        flat = x.reshape(-1, self.in_features)
        out = F.linear(flat, self.base, self.bias)  # then the delta is accumulated in the same GEMM call
        out.addmm_(F.linear(flat, self.delta_in), self.delta_out.t())
        return out.reshape(*x.shape[:-1], self.out_features)
