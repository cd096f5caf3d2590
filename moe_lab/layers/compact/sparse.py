"""A sparse storage format for pruned weights: a bitmask plus the non-zero values.

Magnitude pruning only writes zeros; a dense tensor full of zeros is as big on disk as
before. :class:`SparseLinear` stores a packed bitmask (one bit per weight) and the non-zero
values in the weight's own dtype (``b`` bytes each: 4 for float32, 2 for bfloat16), so a
weight of density ``p`` costs ``out * in * (1/8 + b p)`` bytes instead of ``b * out * in``:
smaller as soon as ``p < 1 - 1/(8b)`` (31/32 in float32, 15/16 in bfloat16). (CSR with int32
column indices costs ``4 + b`` bytes per non-zero and only wins below ``p = b / (4 + b)``.)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab._checks import last_dim, positive_int
from moe_lab.layers.compact.base import CompactLinear
from moe_lab.layers.registry import register_layer


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into uint8, eight flags per byte (padded with zeros)."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, (-flat.numel()) % 8))
    weights = 2 ** torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: the first ``numel`` flags as a flat bool tensor."""
    bits = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.reshape(-1)[:numel].bool()


def sparse_bytes(out_features: int, in_features: int, nonzero: int, format: str = "bitmask", *,
                 value_bytes: int = 4) -> int:
    """Bytes of a weight's sparse payload: ``"bitmask"``, ``"csr"`` (int32) or ``"dense"``, with
    ``value_bytes`` per stored value (4: float32, 2: bfloat16 / float16)."""
    positive_int("value_bytes", value_bytes)
    if format == "bitmask":
        return -(-out_features * in_features // 8) + value_bytes * nonzero
    if format == "csr":
        return 4 * (out_features + 1) + (4 + value_bytes) * nonzero
    if format == "dense":
        return value_bytes * out_features * in_features
    raise ValueError(f"format must be 'bitmask', 'csr' or 'dense', got {format!r}")


@register_layer
class SparseLinear(CompactLinear):
    """A linear layer stored as ``mask`` (packed bits) + ``values`` (its non-zeros, row-major).

    ``forward`` rebuilds the dense weight and calls ``F.linear``: this saves bytes, not time.
    ``values`` and ``bias`` have ``dtype`` (the source weight's, in :meth:`from_linear`); every
    buffer lives on ``device`` (not part of ``config``).
    Shapes: ``x`` is ``(..., in_features)``; the result is ``(..., out_features)``.
    """

    WEIGHT_IN_BUFFERS = True

    def __init__(self, in_features: int, out_features: int, nonzero: int, bias: bool = True, *,
                 device=None, dtype=None):
        super().__init__()
        positive_int("in_features", in_features)
        positive_int("out_features", out_features)
        size = in_features * out_features
        if isinstance(nonzero, bool) or not isinstance(nonzero, int) or not 0 <= nonzero <= size:
            raise ValueError(f"nonzero must be an int in [0, in*out], got {nonzero!r}")
        self.config = dict(in_features=in_features, out_features=out_features, nonzero=nonzero, bias=bias)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("mask", torch.zeros(-(-in_features * out_features // 8), dtype=torch.uint8,
                                                 device=device))
        self.register_buffer("values", torch.zeros(nonzero, device=device, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features, device=device, dtype=dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        """Store a (pruned) ``nn.Linear`` exactly, in its dtype and on its device: its zeros go
        into the mask."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        keep = weight != 0
        layer = cls(linear.in_features, linear.out_features, int(keep.sum()), linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
        layer.mask.copy_(pack_mask(keep))
        layer.values.copy_(weight[keep])
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight, zeros included."""
        keep = unpack_mask(self.mask, self.in_features * self.out_features)
        dense = self.values.new_zeros(self.in_features * self.out_features)
        dense[keep] = self.values
        return dense.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last_dim("x", x, self.in_features)
        return F.linear(x, self.weight, self.bias)
