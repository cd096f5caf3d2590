"""Weight-only integer quantization in plain PyTorch: int8 and int4, per channel or per group.

A weight ``W`` of shape ``(out, in)`` is split into groups of ``group_size`` consecutive input
columns (``group_size=None``: one group per output row, i.e. per-channel). Each group gets a
scale ``s = max|W_group| / q_max`` and is stored as integers ``round(W / s)`` clipped to
``[-q_max, q_max]`` (``q_max`` = 127 for int8, 7 for int4). Symmetric, no zero point.
int4 values are packed two per byte. :class:`QuantizedLinear` stores the integers and scales
and dequantizes in ``forward``: it saves memory and bytes on disk, not time.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab._checks import last_dim
from moe_lab.layers.compact.base import CompactLinear
from moe_lab.layers.registry import register_layer

SUPPORTED_BITS = (4, 8)
SCALE_DTYPE = torch.float16


def _check_bits_and_groups(bits, group_size, in_features: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
        if in_features % group_size:
            raise ValueError(f"group_size ({group_size}) must divide the input width ({in_features})")


def quantize_tensor(weight: torch.Tensor, bits: int = 8, group_size: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a ``(out, in)`` float weight; return int8 values ``(out, in)`` and scales
    ``(out, in // group_size)`` (``(out, 1)`` per channel) in float16."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor, got {tuple(weight.shape)} {weight.dtype}")
    out_features, in_features = weight.shape
    _check_bits_and_groups(bits, group_size, in_features)
    groups = weight.detach().float().reshape(out_features, -1, group_size or in_features)
    q_max = 2 ** (bits - 1) - 1
    scales = (groups.abs().amax(dim=-1, keepdim=True) / q_max).to(SCALE_DTYPE)
    safe = torch.where(scales == 0, torch.ones_like(scales), scales).float()
    values = torch.round(groups / safe).clamp_(-q_max, q_max).to(torch.int8)
    return values.reshape(out_features, in_features), scales.squeeze(-1)


def dequantize_tensor(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Float32 weight ``(out, in)`` from int8 ``values`` and ``(out, groups)`` ``scales``."""
    out_features, in_features = values.shape
    groups = values.float().reshape(out_features, scales.shape[1], -1)
    return (groups * scales.float().unsqueeze(-1)).reshape(out_features, in_features)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in ``[-8, 7]`` into uint8, two per byte along the last dimension
    (an odd width is padded with one zero nibble): ``(..., m)`` -> ``(..., ceil(m / 2))``."""
    if values.numel() and (values.min() < -8 or values.max() > 7):
        raise ValueError("pack_int4 values must lie in [-8, 7]")
    nibbles = (values.to(torch.int16) & 0xF).to(torch.uint8)
    nibbles = F.pad(nibbles, (0, values.shape[-1] % 2))
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(..., m)`` -> int8 ``(..., width)`` (default ``2m``)."""
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    both = torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)
    both = torch.where(both > 7, both - 16, both)
    return both if width is None else both[..., :width]


@register_layer
class QuantizedLinear(CompactLinear):
    """A linear layer whose weight is stored as int8 or packed int4 plus float16 scales.

    Buffers: ``qweight`` (int8 ``(out, in)``, or uint8 ``(out, ceil(in / 2))`` for int4),
    ``scales`` (float16 ``(out, groups)``) and ``bias`` (float16, if any: its rounding error,
    about 1e-3 relative, is far below the int8 / int4 weight error).
    Shapes: ``x`` is ``(..., in_features)``; the result is ``(..., out_features)``.
    """

    WEIGHT_IN_BUFFERS = True

    def __init__(self, in_features: int, out_features: int, bits: int = 8,
                 group_size: int | None = None, bias: bool = True):
        super().__init__()
        _check_bits_and_groups(bits, group_size, in_features)
        self.config = dict(in_features=in_features, out_features=out_features, bits=bits,
                           group_size=group_size, bias=bias)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        stored = (in_features + 1) // 2 if bits == 4 else in_features
        dtype = torch.uint8 if bits == 4 else torch.int8
        groups = in_features // (group_size or in_features)
        self.register_buffer("qweight", torch.zeros(out_features, stored, dtype=dtype))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=SCALE_DTYPE))
        self.register_buffer("bias", torch.zeros(out_features, dtype=SCALE_DTYPE) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: int | None = None
                    ) -> QuantizedLinear:
        """Quantize a trained ``nn.Linear`` (its weight and bias are kept, not re-initialised)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None)
        values, scales = quantize_tensor(linear.weight, bits, group_size)
        layer.qweight.copy_(pack_int4(values) if bits == 4 else values)
        layer.scales.copy_(scales)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float32 ``(out, in)`` weight."""
        values = unpack_int4(self.qweight, self.in_features) if self.bits == 4 else self.qweight
        return dequantize_tensor(values, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last_dim("x", x, self.in_features)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}")
