"""Weight-only integer quantization in plain PyTorch: 2, 3, 4 and 8 bits, per channel or per group.

A weight ``W`` of shape ``(out, in)`` is split into groups of ``group_size`` consecutive input
columns (``group_size=None``: one group per output row, i.e. per-channel). Each group gets a
scale ``s`` (:func:`scales_for`) and is stored as integers ``q = round(W / s)`` in
``[-q_max, q_max]``, ``q_max = 2 ** (bits - 1) - 1`` (127, 7, 3, 1 at 8, 4, 3, 2 bits).
Symmetric, no zero point.

What :class:`QuantizedLinear` saves (its ``state_dict``, written by :func:`moe_lab.save`):

* ``qweight``: int8 ``(out, in)`` at 8 bits; at 2, 3 and 4 bits each row packed as a little-endian
  bit stream (:func:`pack_bits`), uint8 ``(out, ceil(in * bits / 8))``: four values a byte at
  2 bits, eight values in three bytes at 3 bits, two a byte at 4 bits.
* ``scales``: bfloat16 ``(out, groups)``. bfloat16 has float32's exponent range (normal from
  1.2e-38 to 3.4e38), so a group of weights around 1e-6 or 1e-30 or 1e30 keeps its scale, where
  float16 (normal from 6.1e-5, largest 65504) flushed weights near 1e-6 to zero and overflowed
  for large ones, for the same two bytes (float32 scales would cost 4.25 instead of 4.125 bits
  per weight at int4 with groups of 128, 5 instead of 4.5 with groups of 32). Its 8-bit
  significand is rounded *up* and the integers are computed from the stored scale, so the pair
  is self-consistent: no weight is clamped and every ``|w - q s| <= s / 2``, with ``s`` at most
  2**-7 above ``max|w| / q_max``: a step under 1% coarser, which on Gaussian 1024 x 1024 weights
  gave 0.2-0.5% more weight error than exact float32 scales at 2, 3, 4 and 8 bits.
* ``bias``: bfloat16 ``(out,)``, for the same range at the same two bytes, rounded to nearest (at
  most 2**-9 relative; int8's step is 2**-7 of a row's largest weight).

Weights are quantized in float32: float64 weights beyond float32's range are refused
(``ValueError``), and below it (about 1e-45) they become zero.

Speed: the layer never keeps a float copy of its weight. ``forward`` dequantizes a block of rows
(``BLOCK_BYTES`` of float) at a time into a small buffer that stays in cache and multiplies the
input by it straight into the output's columns, so the weight crosses memory once, as integers.
Unpacking 2/3/4-bit values takes several passes in PyTorch's eager ops (slower than the matmul at
one token), so by default (``cache_codes``) the unpacked int8 values are kept between calls: in
memory a packed layer then holds its packed values plus one byte per weight (int4: 1.5 bytes per
weight instead of 0.5; float32 is 4), while the saved state and file stay packed. Set
``layer.cache_codes = False`` to keep memory at the packed size and unpack on every call.
On a CPU this brings the layer to about the float layer's time (within 1.3x at one token, equal
at a prefill, in ``bench/compressed.py``), not below it: the matmul still multiplies float
blocks. Bytes buy speed only with a kernel that multiplies by the integers directly
(``torch._weight_int8pack_mm``, GPU kernels); see ``bench/compressed.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab._checks import last_dim
from moe_lab.layers.compact.base import CompactLinear
from moe_lab.layers.registry import register_layer

SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPE = torch.bfloat16
BIAS_DTYPE = torch.bfloat16
BLOCK_BYTES = 1 << 20  # float rows dequantized at a time by forward (fits a core's L2 cache)


def _check_bits_and_groups(bits, group_size, in_features: int) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
        if in_features % group_size:
            raise ValueError(f"group_size ({group_size}) must divide the input width ({in_features})")


def scales_for(absmax: torch.Tensor, q_max: int) -> torch.Tensor:
    """The stored scales (bfloat16) of groups whose largest ``|w|`` is ``absmax``: the smallest
    bfloat16 value ``>= absmax / q_max`` (computed in float32), so that no weight of the group
    maps beyond ``q_max``. Raises ``ValueError`` if a scale overflows bfloat16."""
    exact = absmax.float() / q_max
    stored = exact.to(SCALE_DTYPE)
    short = stored.float() < exact  # rounded down: step to the next bfloat16 (its bits + 1)
    stored = torch.where(short, (stored.view(torch.int16) + 1).view(SCALE_DTYPE), stored)
    if not torch.isfinite(stored).all():
        raise ValueError(f"weight magnitudes up to {float(absmax.max()):.3g} overflow the bfloat16 "
                         f"scales at q_max={q_max}")
    return stored


def quantize_tensor(weight: torch.Tensor, bits: int = 8, group_size: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a ``(out, in)`` float weight (any float dtype, worked in float32); return int8
    values ``(out, in)`` in ``[-q_max, q_max]`` and bfloat16 scales ``(out, in // group_size)``
    (``(out, 1)`` per channel)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D float tensor, got {shape} "
                         f"{getattr(weight, 'dtype', '')}")
    out_features, in_features = weight.shape
    _check_bits_and_groups(bits, group_size, in_features)
    groups = weight.detach().float().reshape(out_features, -1, group_size or in_features)
    if groups.device.type != "meta" and not torch.isfinite(groups).all():  # (meta: shapes only)
        raise ValueError("weight must be finite (and within float32's range)")
    q_max = 2 ** (bits - 1) - 1
    scales = scales_for(groups.abs().amax(dim=-1, keepdim=True), q_max)
    safe = torch.where(scales == 0, torch.ones_like(scales), scales).float()
    values = torch.round(groups / safe).clamp_(-q_max, q_max).to(torch.int8)
    return values.reshape(out_features, in_features), scales.squeeze(-1)


def dequantize_tensor(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Float32 weight ``(out, in)`` from int8 ``values`` and ``(out, groups)`` ``scales`` (exact:
    an 8-bit integer times a bfloat16 scale fits float32's significand)."""
    out_features, in_features = values.shape
    groups = values.float().reshape(out_features, scales.shape[1], -1)
    return (groups * scales.float().unsqueeze(-1)).reshape(out_features, in_features)


def _word(bits: int) -> tuple[int, int]:
    """Values and bytes per packed word: the fewest values whose bits fill whole bytes."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")
    common = math.gcd(8, bits)
    return 8 // common, bits // common


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ``bits``-bit integers into a little-endian bit stream along the last dimension:
    int ``(..., m)`` in ``[-2**(bits-1), 2**(bits-1) - 1]`` -> uint8 ``(..., ceil(m * bits / 8))``.

    Value ``i`` takes bits ``[i * bits, (i + 1) * bits)`` of its row's stream, lowest bit first: int2
    packs 4 values a byte, int3 8 values in 3 bytes, and int4 is byte-for-byte :func:`pack_int4`.
    """
    per_word, word_bytes = _word(bits)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if values.is_floating_point() or values.dtype == torch.bool:
        raise ValueError(f"values must be an integer tensor, got {values.dtype}")
    if values.numel() and (values.min() < low or values.max() > high):
        raise ValueError(f"values must lie in [{low}, {high}] for {bits} bits")
    width = values.shape[-1]
    codes = (values.to(torch.int64) & (2 ** bits - 1))
    codes = F.pad(codes, (0, -width % per_word)).unflatten(-1, (-1, per_word))
    words = (codes << (bits * torch.arange(per_word, device=values.device))).sum(-1, keepdim=True)
    stream = (words >> (8 * torch.arange(word_bytes, device=values.device))) & 0xFF
    return stream.flatten(-2)[..., :(width * bits + 7) // 8].to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``(..., ceil(width * bits / 8))`` -> int8 ``(..., width)``.

    Each word (one byte, or three at 3 bits) is shifted left until value ``j``'s top bit is the
    word's sign bit, then arithmetically right, which sign-extends it: two whole-tensor shifts.
    """
    per_word, word_bytes = _word(bits)
    if isinstance(width, bool) or not isinstance(width, int) or width < 0:
        raise ValueError(f"width must be a nonnegative int, got {width!r}")
    if packed.dtype != torch.uint8 or packed.dim() == 0 or packed.shape[-1] != (width * bits + 7) // 8:
        raise ValueError(f"packed must be uint8 with last dimension {(width * bits + 7) // 8} for "
                         f"width {width} at {bits} bits, got {packed.dtype} {tuple(packed.shape)}")
    if word_bytes == 1:  # 8 // bits values a byte
        words, word_bits = packed.view(torch.int8), 8
    else:  # 3, 5, 6 or 7 bytes a word, assembled little-endian in a wide enough signed integer
        word_bits = 32 if word_bytes <= 3 else 64
        wide = torch.int32 if word_bits == 32 else torch.int64
        stream = F.pad(packed, (0, -packed.shape[-1] % word_bytes)).to(wide).unflatten(-1, (-1, word_bytes))
        offsets = 8 * torch.arange(word_bytes, device=packed.device, dtype=wide)
        words = (stream << offsets).sum(-1, dtype=wide)
    shifts = word_bits - bits * torch.arange(1, per_word + 1, device=packed.device, dtype=words.dtype)
    codes = (words.unsqueeze(-1) << shifts) >> (word_bits - bits)
    return codes.flatten(-2)[..., :width].to(torch.int8)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in ``[-8, 7]`` into uint8, two per byte along the last dimension
    (an odd width is padded with one zero nibble): ``(..., m)`` -> ``(..., ceil(m / 2))``."""
    if values.numel() and (values.min() < -8 or values.max() > 7):
        raise ValueError("pack_int4 values must lie in [-8, 7]")
    return pack_bits(values, 4)


def unpack_int4(packed: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(..., m)`` -> int8 ``(..., width)`` (default ``2m``)."""
    return unpack_bits(packed, 4, 2 * packed.shape[-1] if width is None else width)


@register_layer
class QuantizedLinear(CompactLinear):
    """A linear layer whose weight is stored as 8-bit or packed 2/3/4-bit integers plus bfloat16
    scales (see the module docstring for the format and why).

    Buffers: ``qweight`` (int8 ``(out, in)``, or uint8 ``(out, ceil(in * bits / 8))``), ``scales``
    (bfloat16 ``(out, groups)``) and ``bias`` (bfloat16 ``(out,)``, if any). They are the whole saved
    state: the unpacked values kept with ``cache_codes`` are a plain attribute, never saved.
    Shapes: ``x`` is ``(..., in_features)`` in any float dtype; the result is ``(..., out_features)``
    in ``x``'s dtype and equals ``F.linear(x, weight.to(x.dtype), bias.to(x.dtype))`` up to the
    order of the float sums.
    """

    WEIGHT_IN_BUFFERS = True
    cache_codes = True  # keep 2/3/4-bit values unpacked to int8 between calls (set False on a layer)

    def __init__(self, in_features: int, out_features: int, bits: int = 8,
                 group_size: int | None = None, bias: bool = True):
        super().__init__()
        _check_bits_and_groups(bits, group_size, in_features)
        self.config = dict(in_features=in_features, out_features=out_features, bits=bits,
                           group_size=group_size, bias=bias)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        stored = in_features if bits == 8 else (in_features * bits + 7) // 8
        dtype = torch.int8 if bits == 8 else torch.uint8
        groups = in_features // (group_size or in_features)
        self.register_buffer("qweight", torch.zeros(out_features, stored, dtype=dtype))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=SCALE_DTYPE))
        self.register_buffer("bias", torch.zeros(out_features, dtype=BIAS_DTYPE) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: int | None = None
                    ) -> QuantizedLinear:
        """Quantize a trained ``nn.Linear`` (its weight and bias are kept, not re-initialised);
        the buffers are made on the linear's device."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None)
        layer.to(linear.weight.device)
        values, scales = quantize_tensor(linear.weight, bits, group_size)
        layer.qweight.copy_(values if bits == 8 else pack_bits(values, bits))
        layer.scales.copy_(scales)
        if linear.bias is not None:
            bias = linear.bias.detach().to(BIAS_DTYPE)
            if not torch.isfinite(bias).all():
                raise ValueError("linear.bias must be finite (and within bfloat16's range, 3.4e38)")
            layer.bias.copy_(bias)
        return layer

    def _codes(self) -> torch.Tensor:
        """The int8 values ``(out, in)``: ``qweight`` itself at 8 bits, else unpacked from it. With
        ``cache_codes`` the unpacked values are kept (a plain attribute, never saved) and reused while
        ``qweight`` is the same tensor at the same version (``load_state_dict``, ``.to()`` and any
        in-place write make it rebuild)."""
        if self.bits == 8:
            return self.qweight
        cached = self.__dict__.get("_unpacked")
        if (self.cache_codes and cached is not None and cached[0] is self.qweight
                and cached[1] == self.qweight._version):
            return cached[2]
        codes = unpack_bits(self.qweight, self.bits, self.in_features)
        keep = self.cache_codes and not self.qweight.is_inference()  # inference tensors have no version
        self._unpacked = (self.qweight, self.qweight._version, codes) if keep else None
        return codes

    @staticmethod
    def _scaled(block: torch.Tensor, scales: torch.Tensor, per_row: bool) -> torch.Tensor:
        """``block`` (rows, in) of integer values, in place times its ``scales`` (rows, groups)."""
        if not per_row:
            rows, groups = scales.shape
            block.view(rows, groups, -1).mul_(scales.unsqueeze(-1))
        return block

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float32 ``(out, in)`` weight."""
        return dequantize_tensor(self._codes(), self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last_dim("x", x, self.in_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:  # autograd cannot follow the out= writes below
            return F.linear(x, self.weight.to(x.dtype), bias)
        codes, flat, scales = self._codes(), x.reshape(-1, self.in_features), self.scales
        exact = torch.float64 if x.dtype == torch.float64 else torch.float32  # holds every q * s exactly
        # one scale per row: multiply the output columns by it instead of every weight (float16 cannot
        # hold every bfloat16 scale, so there the weights are scaled in float32 first)
        per_row = scales.shape[1] == 1 and x.dtype != torch.float16
        rows = self.out_features  # one block on accelerators; on a CPU, blocks that stay in cache
        if x.device.type == "cpu":
            rows = max(1, min(rows, BLOCK_BYTES // (4 * self.in_features)))
        blocks = range(0, self.out_features, rows)
        if len(blocks) == 1:  # a small layer: fewer calls
            out = torch.mm(flat, self._scaled(codes.to(exact), scales, per_row).to(x.dtype).t())
        else:
            out = flat.new_empty(flat.shape[0], self.out_features)
            buffer = torch.empty(rows, self.in_features, dtype=exact, device=x.device)
            for start in blocks:
                stop = min(start + rows, self.out_features)
                block = buffer[:stop - start].copy_(codes[start:stop])
                block = self._scaled(block, scales[start:stop], per_row)
                torch.mm(flat, block.to(x.dtype).t(), out=out[:, start:stop])
        if per_row:
            out.mul_(scales.t())
        if bias is not None:
            out.add_(bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}")
