"""Low-rank experts initialised from the trained weights by truncated SVD (slide 9 done right), or
fitted to the experts' routed inputs (activation-aware, :func:`activation_low_rank`).

The deck builds a new, randomly initialised low-rank expert, which throws the trained
weights away. Here ``W = U S V^T`` is truncated to its ``rank`` largest singular values, the
best rank-``r`` approximation in Frobenius and spectral norm (Eckart-Young), and split
evenly: ``LowRankLinear.U.weight = sqrt(S_r) V_r^T`` and ``V.weight = U_r sqrt(S_r)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from moe_lab._checks import finite_float, positive_int
from moe_lab.compress.calibration import COVERAGES, calibrate_layers, calibrate_mixture, dampen
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


@torch.no_grad()
def activation_low_rank(linear: nn.Linear, hessian: torch.Tensor, rank: int | None = None, *,
                        energy: float | None = None, damp: float = 0.01) -> LowRankLinear:
    """A :class:`LowRankLinear` whose outputs on the calibration inputs are closest to ``linear``'s
    (activation-aware low rank with whitening, as SVD-LLM): the rank-``r`` ``W_r`` minimising
    ``mean_t ||(W - W_r) x_t||^2`` for inputs whose ``(in, in)`` second moment ``mean(x x^T)`` is
    ``hessian`` (:class:`~moe_lab.compress.calibration.HessianAccumulator`).

    With ``H = L L^T`` (Cholesky), ``mean_t ||D x_t||^2 = ||D L||_F^2``, so by Eckart-Young the best
    ``W_r`` is ``U_r S_r V_r^T L^-1`` for the SVD ``W L = U S V^T``; it is stored as
    ``U.weight = sqrt(S_r) V_r^T L^-1`` and ``V.weight = U_r sqrt(S_r)``. ``energy`` is the fraction of
    ``sum(S^2)`` kept, i.e. of the output energy on the calibration inputs. ``H`` is first damped
    (:func:`~moe_lab.compress.calibration.dampen`: ``damp * mean(diag H)`` on the diagonal, dead
    inputs given a unit variance and their weights set to 0, as GPTQ does), which keeps a singular
    covariance (fewer tokens than inputs) factorisable and adds ``damp * mean(diag H) *
    ||W - W_r||_F^2`` to the loss: a large ``damp`` tends to the plain SVD, ``damp=0`` is the exact
    minimiser (it needs a positive definite ``H``). Computed in float64; the factors take the weight's
    dtype and device.
    """
    if type(linear) is not nn.Linear:
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank or energy")
    if not isinstance(hessian, torch.Tensor) or hessian.shape != (linear.in_features, linear.in_features):
        raise ValueError(f"hessian must be a ({linear.in_features}, {linear.in_features}) tensor, "
                         f"got {tuple(getattr(hessian, 'shape', ()))}")
    if not torch.isfinite(hessian).all() or (hessian.diagonal() < 0).any():
        raise ValueError("hessian must be finite with a nonnegative diagonal")
    weight = linear.weight.detach()
    damped, dead = dampen(hessian.detach().to(weight.device, torch.float64), damp)
    damped = (damped + damped.T) / 2
    factor, info = torch.linalg.cholesky_ex(damped)
    # an eigenvalue at the rounding level of the Hessian's own dtype is a singular direction, not data
    eigenvalues = torch.linalg.eigvalsh(damped)
    floor = linear.in_features * torch.finfo(hessian.dtype).eps * eigenvalues[-1]
    if info.item() != 0 or eigenvalues[0] <= floor:
        raise ValueError(f"the input covariance is singular with damp={damp} (fewer independent tokens "
                         f"than inputs): increase damp")
    target = weight.double().clone()
    target[:, dead] = 0.0  # inputs that are always zero: their weights spend no rank (as in GPTQ)
    u, s, vh = torch.linalg.svd(target @ factor, full_matrices=False)
    if energy is not None:
        rank = rank_for_energy(s, energy)
    layer = LowRankLinear(linear.in_features, linear.out_features, rank, bias=linear.bias is not None)
    layer.to(device=weight.device, dtype=weight.dtype)
    root = s[:rank].sqrt()
    right = torch.linalg.solve_triangular(factor, root[:, None] * vh[:rank], upper=False, left=False)
    layer.U.weight.copy_(right.to(weight.dtype))  # sqrt(S_r) V_r^T L^-1
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


def _shrinks(module: nn.Module, low: LowRankLinear, explicit_rank: bool) -> bool:
    """Whether ``low`` is smaller than the full ``module``; an explicit rank that is not raises."""
    out_f, in_f = module.out_features, module.in_features
    if low.rank * (in_f + out_f) < in_f * out_f:
        return True
    if explicit_rank:
        raise ValueError(f"rank {low.rank} does not shrink a {out_f}x{in_f} matrix "
                         f"(break-even rank {in_f * out_f // (in_f + out_f)})")
    return False


def activation_low_rank_experts(model: nn.Module, calibration: torch.Tensor, rank: int | None = None, *,
                                energy: float | None = None, damp: float = 0.01, coverage: str = "fallback",
                                min_tokens: int | None = None) -> list[dict]:
    """Replace every expert ``nn.Linear`` of the model's MoE layers, in place, by the low-rank
    factorisation with the least output error on its routed calibration inputs
    (:func:`activation_low_rank`): each expert on the tokens the router sends to it, a SwiGLU
    expert's ``down_proj`` on the intermediate activations of its factorised ``gate_up_proj``,
    layer by layer on the outputs of the already-factorised layers (see
    :func:`~moe_lab.compress.calibration.calibrate_mixture` for ``coverage`` and ``min_tokens``; the
    fallback is the plain SVD). Routers and output projections stay. The break-even rule of
    :func:`low_rank_experts` applies. Returns the per-expert report (``method`` ``"activation"``
    or ``"svd"``).
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank or energy")
    for _, layer in moe_layers(model):
        experts = layer.expert_modules().modules()
        if any(isinstance(m, CompactLinear) and m.WEIGHT_IN_BUFFERS for m in experts):
            raise ValueError("the experts are already quantized or stored sparsely: apply activation-aware "
                             "low rank to the float experts, then quantize")

    def transform(path: str, linear: nn.Linear, accumulator) -> nn.Module:
        low = activation_low_rank(linear, accumulator.hessian, rank, energy=energy, damp=damp)
        return low if _shrinks(linear, low, rank is not None) else linear

    def fallback(path: str, linear: nn.Linear) -> nn.Module:
        low = low_rank_from_linear(linear, rank, energy=energy)
        return low if _shrinks(linear, low, rank is not None) else linear

    return calibrate_layers(model, calibration, lambda name, layer, x: calibrate_mixture(
        layer, x, transform, fallback, method="activation", fallback_method="svd", experts_only=True,
        coverage=coverage, min_tokens=min_tokens, name=name))


LOW_RANK_METHODS = ("svd", "activation")


@register_stage(r"lowrank(?P<act>-act)?=(?P<amount>.+)", "lowrank[-act]=X")
@dataclass
class LowRank(Stage):
    """Replace expert matrices by low-rank factorisations of their trained weights (``rank``, or
    the ``energy`` to keep). ``method="svd"`` (recipe ``lowrank=X``): truncated SVD of the weight,
    no data needed. ``method="activation"`` (recipe ``lowrank-act=X``): least output error on each
    expert's routed calibration inputs (:func:`activation_low_rank_experts`; ``energy`` is then the
    output energy kept), with ``damp``, ``coverage`` and ``min_tokens``; ``last_report`` holds its
    per-expert report after ``apply`` (``None`` for ``"svd"``)."""

    rank: int | None = None
    energy: float | None = None
    output_format = "lowrank"  # factorises float, quantized or sparse matrices (as float factors)
    method: str = "svd"
    damp: float = 0.01
    coverage: str = "fallback"
    min_tokens: int | None = None
    last_report: list | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self):
        if (self.rank is None) == (self.energy is None):
            raise ValueError("give exactly one of rank or energy")
        if self.rank is not None:
            positive_int("rank", self.rank)
        else:
            finite_float("energy", self.energy, minimum=0.0, strict=True)
            if self.energy > 1:
                raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.method not in LOW_RANK_METHODS:
            raise ValueError(f"method must be one of {LOW_RANK_METHODS}, got {self.method!r}")
        finite_float("damp", self.damp, minimum=0.0)
        if self.coverage not in COVERAGES:
            raise ValueError(f"coverage must be one of {COVERAGES}, got {self.coverage!r}")
        if self.min_tokens is not None:
            positive_int("min_tokens", self.min_tokens)

    @property
    def name(self) -> str:
        amount = f"rank {self.rank}" if self.rank else f"{self.energy:.0%} energy"
        return f"low-rank experts ({amount}{', activation-aware' if self.method == 'activation' else ''})"

    @property
    def recipe(self) -> str:
        head = "lowrank-act" if self.method == "activation" else "lowrank"
        return f"{head}={self.rank}" if self.rank else f"{head}={self.energy:g}"

    @classmethod
    def from_recipe(cls, item: str, amount: str, act: str | None = None) -> LowRank:
        method = "activation" if act else "svd"
        value = number(item, amount, what="the energy or rank", low=0, low_open=True)
        if value < 1:
            return cls(energy=value, method=method)
        if value != int(value):
            raise ValueError(f"recipe item {item!r}: a value >= 1 is a rank and must be a whole number "
                             f"(an energy must be below 1)")
        return cls(rank=int(value), method=method)

    def apply(self, model: nn.Module, calibration: torch.Tensor) -> nn.Module:
        if self.method == "svd":
            self.last_report = None
            return low_rank_experts(model, self.rank, energy=self.energy)
        self.last_report = activation_low_rank_experts(model, calibration, self.rank, energy=self.energy,
                                                       damp=self.damp, coverage=self.coverage,
                                                       min_tokens=self.min_tokens)
        return model
