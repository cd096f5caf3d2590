"""Low-rank experts initialised from the trained weights by truncated SVD (slide 9 done right).

The deck builds a new, randomly initialised low-rank expert, which throws the trained
weights away. Here ``W = U S V^T`` is truncated to its ``rank`` largest singular values, the
best rank-``r`` approximation in Frobenius and spectral norm (Eckart-Young), and split
evenly: ``LowRankLinear.U.weight = sqrt(S_r) V_r^T`` and ``V.weight = U_r sqrt(S_r)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from moe_lab._checks import finite_float, positive_int
from moe_lab.compress.registry import Stage, number, register_stage
from moe_lab.compress.targets import moe_layers, replace_module
from moe_lab.layers.compact.base import CompactLinear
from moe_lab.layers.compact.lowrank import LowRankLinear


def _is_linear_like(module: nn.Module) -> bool:
    """A full-width linear map: ``nn.Linear`` or one stored in buffers (quantized, sparse)."""
    return type(module) is nn.Linear or (isinstance(module, CompactLinear) and module.WEIGHT_IN_BUFFERS)


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep ``energy`` (in (0, 1]) of ``sum(s**2)``, at
    most ``len(singular_values)``. A zero matrix has no energy to keep: its rank is 1, the
    smallest a factorisation can have (and it reproduces the zeros exactly)."""
    finite_float("energy", energy, minimum=0.0, strict=True)
    if energy > 1:
        raise ValueError(f"energy must be <= 1, got {energy}")
    if singular_values.dim() != 1 or singular_values.numel() == 0:
        raise ValueError(f"singular_values must be a non-empty 1-D tensor, got shape "
                         f"{tuple(singular_values.shape)}")
    power = singular_values.double().square()
    if not torch.isfinite(power).all():
        raise ValueError("singular_values must be finite (the matrix holds nan or inf)")
    if power.sum() == 0:
        return 1
    kept = torch.cumsum(power, 0) / power.sum()
    found = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype, device=kept.device) - 1e-12))
    return min(found + 1, singular_values.numel())


def low_rank_from_linear(linear: nn.Linear, rank: int | None = None, *, energy: float | None = None
                         ) -> LowRankLinear:
    """A :class:`LowRankLinear` holding the truncated SVD of a trained ``nn.Linear``.

    Give either ``rank`` (1 .. min(out, in)) or ``energy`` (fraction of spectral energy to
    keep). At full rank the outputs equal the original layer's up to float rounding. The SVD
    runs in float64 wherever the weight lives; the factors get the weight's dtype and device.
    A :class:`~moe_lab.compress.QuantizedLinear` or :class:`~moe_lab.compress.SparseLinear`
    is factorised from its dequantized / dense weight (the factors are float again).
    """
    if not _is_linear_like(linear):
        raise TypeError(f"linear must be an nn.Linear (or a quantized or sparse one), "
                        f"got {type(linear).__name__}")
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank or energy")
    weight = linear.weight.detach()
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    if energy is not None:
        rank = rank_for_energy(s, energy)
    layer = LowRankLinear(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                          device=weight.device, dtype=weight.dtype)
    root = s[:rank].sqrt()
    with torch.no_grad():
        layer.U.weight.copy_((root[:, None] * vh[:rank]).to(weight.dtype))
        layer.V.weight.copy_((u[:, :rank] * root).to(weight.dtype))
        if linear.bias is not None:
            layer.V.bias.copy_(linear.bias.detach())
    return layer


def low_rank_experts(model: nn.Module, rank: int | None = None, *, energy: float | None = None,
                     include_output: bool = False) -> nn.Module:
    """Replace every expert ``nn.Linear`` of the model's MoE layers by its truncated SVD, in
    place (see :func:`low_rank_from_linear`); the router, and the output projection unless
    ``include_output``, stay as they are. Returns ``model``.

    A rank above a matrix's break-even ``in * out / (in + out)`` would grow it: an explicit
    ``rank`` that does so raises; with ``energy``, a matrix that would need such a rank is
    left as it is (it cannot be compressed by this method at that energy).
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("model has no MoE layer to give low-rank experts")
    for prefix, layer in layers:
        heads = [layer.EXPERTS] + (["output"] if include_output else [])
        targets = [(name, m) for name, m in layer.named_modules()
                   if _is_linear_like(m) and name.split(".")[0] in heads]
        for name, module in targets:
            low = low_rank_from_linear(module, rank, energy=energy)
            out_f, in_f = module.out_features, module.in_features
            if low.rank * (in_f + out_f) >= in_f * out_f:
                if energy is not None:
                    continue
                raise ValueError(f"rank {low.rank} does not shrink a {out_f}x{in_f} matrix "
                                 f"(break-even rank {in_f * out_f // (in_f + out_f)})")
            replace_module(model, f"{prefix}.{name}" if prefix else name, low)
    return model


@register_stage(r"lowrank=(?P<amount>.+)", "lowrank=X")
@dataclass
class LowRank(Stage):
    """Replace expert matrices by truncated SVDs of their trained weights (``rank`` or ``energy``)."""

    rank: int | None = None
    energy: float | None = None
    output_format = "lowrank"  # factorises float, quantized or sparse matrices (as float factors)

    def __post_init__(self):
        if (self.rank is None) == (self.energy is None):
            raise ValueError("give exactly one of rank or energy")
        if self.rank is not None:
            positive_int("rank", self.rank)
        else:
            finite_float("energy", self.energy, minimum=0.0, strict=True)
            if self.energy > 1:
                raise ValueError(f"energy must be in (0, 1], got {self.energy}")

    @property
    def name(self) -> str:
        return f"low-rank experts ({f'rank {self.rank}' if self.rank else f'{self.energy:.0%} energy'})"

    @property
    def recipe(self) -> str:
        return f"lowrank={self.rank}" if self.rank else f"lowrank={self.energy:g}"

    @classmethod
    def from_recipe(cls, item: str, amount: str) -> LowRank:
        value = number(item, amount, what="the energy or rank", low=0, low_open=True)
        if value < 1:
            return cls(energy=value)
        if value != int(value):
            raise ValueError(f"recipe item {item!r}: a value >= 1 is a rank and must be a whole number "
                             f"(an energy must be below 1)")
        return cls(rank=int(value))

    def apply(self, model: nn.Module, calibration: torch.Tensor) -> nn.Module:
        return low_rank_experts(model, self.rank, energy=self.energy)
