"""GPTQ (Frantar et al. 2022): round weights to the int grid one input column at a time, pushing each
column's rounding error onto the columns not yet rounded, so the layer's *output* on calibration
inputs moves as little as possible.

The grid and storage are those of :mod:`moe_lab.layers.compact.quantized` (symmetric, no zero
point): a weight ``(out, in)`` is cut into groups of ``group_size`` input columns (``None``: one group
per row), each with a scale ``s`` (stored in bfloat16, rounded up:
:func:`~moe_lab.layers.compact.quantized.scales_for`) and integers
``q = clamp(round(w / s), -q_max, q_max)``, ``q_max = 2 ** (bits - 1) - 1``. Only *which* integers are
picked changes; round-to-nearest (RTN) is GPTQ with no error feedback.

The loss GPTQ minimises for one row ``w`` is ``(w - w_q) H (w - w_q)^T`` with ``H = mean(x x^T)`` over the
calibration tokens (:func:`hessian_from_inputs`, :class:`HessianAccumulator`; per-token weights such as
router gates weight the tokens, as MoEQuant does for experts).

Choices, all documented where they are made:

* Scales are rounded (up) to bfloat16 *before* rounding the weights, so the error fed back is the error of the
  weight that is actually stored (RTN does the same, hence GPTQ with ``H = I`` equals RTN exactly).
* Per-channel scales come from the whole row before any update. Group scales (``act_order=False``) come
  from the group's columns as they stand when the group's first column is reached, with *every* earlier
  column's update applied, including the ones a lazy block has not yet written back (the reference code
  reads the stale matrix there, which makes its result depend on ``block_size``; ours does not).
* With ``act_order`` and groups, the scales are *static*: computed from the weight before any update and
  before the permutation, so each stored group still covers ``group_size`` consecutive original columns
  (the reference code's ``static_groups=True``). Columns are visited by decreasing ``diag(H)``.
* Dead columns (``diag(H) = 0``: inputs always zero) get weight 0 and a diagonal of 1, as in the
  reference code, but the damping ``damp * mean(diag H)`` averages the live columns only, so scaling
  the inputs does not change the result.

For mixtures, :func:`gptq_layer` and :func:`gptq_experts` calibrate every expert on the tokens routed
to it (:mod:`moe_lab.compress.calibration`), layer after layer on the outputs of the quantized layers
before it; the :class:`~moe_lab.compress.Quantize` stage with ``method="gptq"`` runs them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moe_lab._checks import finite_float, last_dim, positive_int
from moe_lab.compress.calibration import (
    HessianAccumulator,
    calibrate_layers,
    calibrate_mixture,
    dampen,
    hessian_from_inputs,
)
from moe_lab.layers.compact import quantized as _storage
from moe_lab.layers.compact.quantized import QuantizedLinear, pack_bits, scales_for, unpack_bits

__all__ = ["GPTQ_BITS", "HessianAccumulator", "gptq_quantize", "gptq_quantize_weight", "hessian_from_inputs",
           "pack_bits", "unpack_bits"]  # the packing helpers live with the storage format

GPTQ_BITS = (2, 3, 4, 8)


def _check_arguments(weight, hessian, bits, group_size, damp, block_size) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor, got {getattr(weight, 'shape', weight)!r}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight must be finite")
    if isinstance(bits, bool) or bits not in GPTQ_BITS:
        raise ValueError(f"bits must be one of {GPTQ_BITS}, got {bits!r}")
    in_features = weight.shape[1]
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
        if in_features % group_size:
            raise ValueError(f"group_size ({group_size}) must divide in_features ({in_features})")
    finite_float("damp", damp, minimum=0.0)
    positive_int("block_size", block_size)
    if not isinstance(hessian, torch.Tensor) or not hessian.is_floating_point():
        raise ValueError("hessian must be a float tensor")
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"hessian must have shape ({in_features}, {in_features}), "
                         f"got {tuple(hessian.shape)}")
    h = hessian.detach().float()
    if not torch.isfinite(h).all() or (h.diagonal() < 0).any():
        raise ValueError("hessian must be finite with a nonnegative diagonal")
    if (h - h.T).abs().max() > 1e-4 * h.abs().max():
        raise ValueError("hessian must be symmetric")


def _grid_scales(columns: torch.Tensor, q_max: int) -> torch.Tensor:
    """The stored (bfloat16) scales ``(..., 1)`` of ``columns`` ``(..., k)``, in float32, as RTN has them."""
    return scales_for(columns.abs().amax(dim=-1, keepdim=True), q_max).float()


def _round(column: torch.Tensor, scale: torch.Tensor, q_max: int) -> torch.Tensor:
    """Integers (as float) of ``column`` ``(out,)`` on the grid of ``scale`` ``(out,)`` (0 scale: step 1)."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.round(column / safe).clamp_(-q_max, q_max)


def _inverse_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) I)^-1 = U^T U`` for a float32
    ``(in, in)`` Hessian, after giving dead columns (zero diagonal) a diagonal of 1
    (:func:`~moe_lab.compress.calibration.dampen`).

    The mean is over the live columns only: the reference code averages the dead columns' 1s in too,
    which makes the damping (and the result) depend on the units of the inputs.
    """
    h, _ = dampen(hessian, damp)
    factor, info = torch.linalg.cholesky_ex(h)  # lower: H = L L^T
    if info.item() == 0:
        factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
    if info.item() != 0:
        raise ValueError(f"hessian is not positive definite after damping (damp={damp}): increase damp")
    return factor


@torch.no_grad()
def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4,
                         group_size: int | None = None, damp: float = 0.01, act_order: bool = False,
                         block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ-round a ``(out, in)`` weight (any float dtype) given the ``(in, in)`` input Hessian.

    Returns int8 ``values`` ``(out, in)`` in ``[-q_max, q_max]`` and float32 ``scales`` ``(out, groups)``
    (bfloat16-representable, so they are stored without change), on the weight's device; work is done
    in float32. ``block_size`` only batches the updates (lazy block updates): it does not change the
    result beyond float rounding. Dead columns (``diag(H) = 0``: inputs always zero) are set to 0.
    """
    _check_arguments(weight, hessian, bits, group_size, damp, block_size)
    w = weight.detach().float().clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32)
    h = (h + h.T) / 2
    out_features, n = w.shape
    q_max, g = 2 ** (bits - 1) - 1, group_size or n
    dead = h.diagonal() == 0
    w[:, dead] = 0.0
    dynamic = group_size is not None and not act_order  # group scales taken as the groups are reached
    scales = _grid_scales(w.reshape(out_features, n // g, g), q_max).squeeze(-1)  # static: (out, groups)
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(n)
    perm = perm.to(w.device)  # dead columns (diagonal 0) come last
    w, h = w[:, perm], h[perm][:, perm]
    u = _inverse_factor(h, damp)
    group_of = (perm // g).tolist()  # stored group of each visited column
    values = torch.zeros_like(w)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        block, errors = w[:, i1:i2].clone(), torch.zeros(out_features, i2 - i1, device=w.device)
        for i in range(i2 - i1):
            j = i1 + i
            if dynamic and j % g == 0:  # the group's columns with all pending updates applied
                later = w[:, i2:j + g] - errors[:, :i] @ u[i1:j, i2:j + g]
                scales[:, j // g] = _grid_scales(torch.cat([block[:, i:i + g], later], 1), q_max)[:, 0]
            scale = scales[:, group_of[j]]
            values[:, j] = _round(block[:, i], scale, q_max)
            errors[:, i] = (block[:, i] - values[:, j] * scale) / u[j, j]
            block[:, i:] -= errors[:, i:i + 1] * u[j, j:i2]
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    return values[:, torch.argsort(perm)].to(torch.int8), scales


def gptq_quantize(linear: nn.Linear, inputs: torch.Tensor | HessianAccumulator, bits: int = 4,
                  group_size: int | None = None, damp: float = 0.01, act_order: bool = False,
                  weights: torch.Tensor | None = None) -> QuantizedLinear:
    """GPTQ-quantize a trained ``nn.Linear`` into a :class:`QuantizedLinear` (same grid and storage as
    :meth:`QuantizedLinear.from_linear`), given its calibration ``inputs`` ``(..., in)`` (optionally
    token-weighted by ``weights`` ``(...)``) or a :class:`HessianAccumulator` already fed with them."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    if bits not in _storage.SUPPORTED_BITS:  # looked up now: the storage may learn more widths
        raise ValueError(f"bits={bits!r}: QuantizedLinear stores only {_storage.SUPPORTED_BITS} bits; "
                         "use gptq_quantize_weight and pack_bits for other widths")
    if isinstance(inputs, HessianAccumulator):
        if weights is not None:
            raise ValueError("weights must be None when inputs is a HessianAccumulator (it holds its own)")
        hessian = inputs.hessian
    else:
        last_dim("inputs", inputs, linear.in_features)
        hessian = hessian_from_inputs(inputs, weights)
    has_bias = linear.bias is not None
    layer = QuantizedLinear(linear.in_features, linear.out_features, bits, group_size, has_bias)
    values, scales = gptq_quantize_weight(linear.weight, hessian, bits, group_size, damp, act_order)
    layer.to(linear.weight.device)
    layer.qweight.copy_(values if layer.qweight.dtype == torch.int8 else pack_bits(values, bits))
    layer.scales.copy_(scales)
    if has_bias:
        layer.bias.copy_(linear.bias.detach())
    return layer


def _group_for(linear: nn.Linear, group_size: int | None) -> int | None:
    """The group size :func:`~moe_lab.compress.quantize.quantize_experts` uses for ``linear``: a matrix
    no wider than one group (a thin low-rank factor, say) is quantized per channel."""
    return None if group_size is not None and linear.in_features <= group_size else group_size


def gptq_layer(layer: nn.Module, x: torch.Tensor, bits: int = 4, group_size: int | None = None, *,
               damp: float = 0.01, act_order: bool = False, coverage: str = "fallback",
               min_tokens: int | None = None, weight_by_gate: bool = False, name: str = "") -> list[dict]:
    """GPTQ every linear of one mixture layer in place (routers and gates stay in float), given the
    layer's calibration inputs ``x`` ``(..., d)``: each expert on the tokens routed to it (the
    Hessian weighted by their gates if ``weight_by_gate``, as MoEQuant does), a SwiGLU expert's
    ``down_proj`` on the intermediate activations of its quantized ``gate_up_proj``, and the rest
    of the layer after the experts. An expert with fewer than ``min_tokens`` routed tokens follows
    ``coverage`` (``"all"``, ``"fallback"`` to round-to-nearest, ``"error"``). Returns the per-expert
    report of :func:`~moe_lab.compress.calibration.calibrate_mixture` (``method`` ``"gptq"`` or ``"rtn"``).
    """
    _storage._check_bits_and_groups(bits, group_size, group_size or 1)  # the storage's widths, read now
    finite_float("damp", damp, minimum=0.0)

    def transform(path: str, linear: nn.Linear, accumulator: HessianAccumulator) -> QuantizedLinear:
        return gptq_quantize(linear, accumulator, bits, _group_for(linear, group_size), damp, act_order)

    def fallback(path: str, linear: nn.Linear) -> QuantizedLinear:
        return QuantizedLinear.from_linear(linear, bits, _group_for(linear, group_size))

    return calibrate_mixture(layer, x, transform, fallback, method="gptq", fallback_method="rtn",
                             weight_by_gate=weight_by_gate, coverage=coverage, min_tokens=min_tokens,
                             name=name)


def gptq_experts(model: nn.Module, calibration: torch.Tensor, bits: int = 4, group_size: int | None = None,
                 **options) -> list[dict]:
    """GPTQ the mixture layers of ``model`` in place, layer by layer: each layer is calibrated on
    the inputs it receives when ``model`` runs on ``calibration`` with the layers before it
    already quantized (GPTQ's sequential scheme). ``options`` are those of :func:`gptq_layer`.
    Returns every layer's report rows, in order."""
    return calibrate_layers(model, calibration, lambda name, layer, x: gptq_layer(layer, x, bits, group_size,
                                                                                  name=name, **options))
