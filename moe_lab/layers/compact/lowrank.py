"""A linear layer stored as two thin factors (slide 9)."""

from __future__ import annotations

import torch
import torch.nn as nn

from moe_lab._checks import factor_sizes, last_dim
from moe_lab.layers.compact.base import CompactLinear
from moe_lab.layers.registry import register_layer


@register_layer
class LowRankLinear(CompactLinear):
    """``y = V(U(x))`` with ``U: in -> rank`` (no bias) and ``V: rank -> out``.

    Stores ``rank * (in + out) + out`` numbers instead of ``in * out + out``, so it is smaller
    than ``nn.Linear`` only when ``rank < in * out / (in + out)``. Attribute names ``U`` and
    ``V`` follow the deck's ``LowRankExpert``.

    ``device`` and ``dtype`` place the factors, as for ``nn.Linear`` (they are not part of
    ``config``). Shapes: ``x`` is ``(..., in_features)``; the result is ``(..., out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 device=None, dtype=None):
        super().__init__()
        factor_sizes(in_features, out_features, rank)
        self.config = dict(in_features=in_features, out_features=out_features, rank=rank, bias=bias)
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.U = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.V = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The full ``(out_features, in_features)`` matrix ``V.weight @ U.weight``."""
        return self.V.weight @ self.U.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.V.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last_dim("x", x, self.in_features)
        return self.V(self.U(x))
