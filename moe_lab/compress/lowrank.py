"""Low-rank experts initialised from the trained weights by truncated SVD (slide 9 done right).

The deck builds a new, randomly initialised low-rank expert, which throws the trained
weights away. Here ``W = U S V^T`` is truncated to its ``rank`` largest singular values, the
best rank-``r`` approximation in Frobenius and spectral norm (Eckart-Young), and split
evenly: ``LowRankLinear.U.weight = sqrt(S_r) V_r^T`` and ``V.weight = U_r sqrt(S_r)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moe_lab._checks import finite_float
from moe_lab.low_rank import LowRankLinear


def _is_linear_like(module: nn.Module) -> bool:
    from moe_lab.compress.quantize import QuantizedLinear
    from moe_lab.compress.sparse import SparseLinear

    return type(module) in (nn.Linear, QuantizedLinear, SparseLinear)


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep ``energy`` (in (0, 1]) of ``sum(s**2)``."""
    finite_float("energy", energy, minimum=0.0, strict=True)
    if energy > 1:
        raise ValueError(f"energy must be <= 1, got {energy}")
    power = singular_values.double().square()
    kept = torch.cumsum(power, 0) / power.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12)) + 1


def low_rank_from_linear(linear: nn.Linear, rank: int | None = None, *, energy: float | None = None
                         ) -> LowRankLinear:
    """A :class:`LowRankLinear` holding the truncated SVD of a trained ``nn.Linear``.

    Give either ``rank`` (1 .. min(out, in)) or ``energy`` (fraction of spectral energy to
    keep). At full rank the outputs equal the original layer's up to float rounding.
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
    layer = LowRankLinear(linear.in_features, linear.out_features, rank, bias=linear.bias is not None)
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
    from moe_lab.compress.targets import experts_name, moe_layers, replace_module

    layers = moe_layers(model)
    if not layers:
        raise ValueError("model has no MoE layer to give low-rank experts")
    for prefix, layer in layers:
        heads = [experts_name(layer)] + (["output"] if include_output else [])
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
