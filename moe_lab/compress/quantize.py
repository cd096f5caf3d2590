"""Quantizing a model's mixture layers: every expert linear to int8 / int4, by round-to-nearest or
by GPTQ calibrated on each expert's routed tokens, mixed precision by expert usage or measured
sensitivity. The storage format itself is
:class:`~moe_lab.layers.compact.quantized.QuantizedLinear`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from moe_lab._checks import finite_float, positive_int
from moe_lab.compress.calibration import COVERAGES
from moe_lab.compress.gptq import gptq_experts
from moe_lab.compress.registry import Stage, number, register_stage
from moe_lab.compress.targets import expert_linears, moe_layers, replace_module
from moe_lab.layers.compact.quantized import SUPPORTED_BITS, QuantizedLinear, _check_bits_and_groups
from moe_lab.layers.compact.sparse import SparseLinear


def _check_not_sparse(model: nn.Module) -> None:
    if any(isinstance(m, SparseLinear) for _, layer in moe_layers(model) for m in layer.modules()):
        raise ValueError("the MoE layers hold sparse (bitmask) weights, which this int8/int4 format cannot "
                         "store: quantize instead of storing sparsely, or quantize before magnitude pruning")


def quantize_experts(model: nn.Module, bits: int | list[int] = 8, group_size: int | None = None, *,
                     include_router: bool = False) -> nn.Module:
    """Replace the linear maps of every MoE layer with :class:`QuantizedLinear`, in place.

    Like ``torchao.quantization.quantize_``: it edits ``model`` and returns it. The router
    stays in float unless ``include_router`` (its logits decide where every token goes).
    ``bits`` may be a list with one entry per expert (mixed precision, see
    :func:`bits_by_usage`); the output projection then gets the largest of them.
    Expert modules that already hold factors (low-rank) have each factor quantized; a matrix
    no wider than ``group_size`` (a rank-4 factor, say) is quantized per channel.
    """
    _check_not_sparse(model)
    per_expert = list(bits) if isinstance(bits, (list, tuple)) else None
    for bits_value in per_expert or [bits]:
        _check_bits_and_groups(bits_value, None, 2)
    for name, module in list(expert_linears(model, include_router)):
        chosen = bits
        if per_expert is not None:
            chosen = max(per_expert)
            for prefix, layer in moe_layers(model):
                experts = layer.EXPERTS
                head = f"{prefix}.{experts}." if prefix else f"{experts}."
                if name.startswith(head):
                    if len(per_expert) != layer.num_experts:
                        raise ValueError(f"bits has {len(per_expert)} entries but {prefix or 'the layer'} "
                                         f"has {layer.num_experts} experts")
                    chosen = per_expert[int(name[len(head):].split(".")[0])]
        narrow = group_size is not None and module.in_features <= group_size  # one group = one row
        quantized = QuantizedLinear.from_linear(module, chosen, None if narrow else group_size)
        replace_module(model, name, quantized)
    return model


def bits_by_usage(usage: torch.Tensor, high_bits: int = 8, low_bits: int = 4,
                  high_fraction: float = 0.5) -> list[int]:
    """Mixed precision from a per-expert score (routing frequency or sensitivity): the top
    ``high_fraction`` of experts by ``usage`` get ``high_bits``, the rest ``low_bits``."""
    for name, value in (("high_bits", high_bits), ("low_bits", low_bits)):
        if value not in SUPPORTED_BITS:
            raise ValueError(f"{name} must be one of {SUPPORTED_BITS}, got {value!r}")
    if not 0 <= high_fraction <= 1:
        raise ValueError(f"high_fraction must be in [0, 1], got {high_fraction}")
    usage = torch.as_tensor(usage).reshape(-1)
    count = round(high_fraction * usage.numel())
    high = set(usage.topk(count).indices.tolist()) if count else set()
    return [high_bits if e in high else low_bits for e in range(usage.numel())]


@torch.no_grad()
def expert_sensitivity(layer: nn.Module, x: torch.Tensor, bits: int = 4,
                       group_size: int | None = None) -> torch.Tensor:
    """Output error ``(E,)`` of quantizing each expert alone to ``bits`` (mean squared
    difference from the float layer on calibration inputs ``x``): a higher value means the
    expert deserves more bits."""
    reference = layer(x)
    errors = []
    for e in range(layer.num_experts):
        trial = copy.deepcopy(layer)
        experts = trial.expert_modules()
        if type(experts[e]) is nn.Linear:
            experts[e] = QuantizedLinear.from_linear(experts[e], bits, group_size)
        else:  # an expert made of several linears (SwiGLU): quantize each
            quantize_experts(experts[e], bits, group_size)
        errors.append(float((trial(x) - reference).square().mean()))
    return torch.tensor(errors)


QUANTIZE_METHODS = ("rtn", "gptq")


@register_stage(r"(?P<method>int|gptq)(?P<bits>\d+)(?:-g(?P<group>\d+))?(?::(?P<coverage>[a-z]+))?",
                "int8 | int4[-gN] | gptq4[-gN][:coverage]")
@dataclass
class Quantize(Stage):
    """Weight-only integer quantization of the MoE layers; routers and gates stay in float.

    ``method="rtn"`` (recipe ``int4``) rounds every weight to the nearest grid point and needs no
    data. ``method="gptq"`` (recipe ``gptq4``) picks the grid points with GPTQ, calibrating each
    expert on the tokens the router sends to it, layer by layer on the quantized layers' outputs
    (:func:`~moe_lab.compress.gptq.gptq_experts`), same storage. Its options: ``coverage`` and
    ``min_tokens`` (what to do with an expert that receives fewer than ``min_tokens`` calibration
    tokens: ``"all"``, ``"fallback"`` to round-to-nearest with a warning, ``"error"``), ``damp``,
    ``act_order`` and ``weight_by_gate`` (weight each expert's Hessian by the gates, as MoEQuant).
    After ``apply``, ``last_report`` holds GPTQ's per-expert report (tokens seen, method used,
    relative output error; see :func:`~moe_lab.compress.calibration.calibrate_mixture`), ``None``
    for round-to-nearest; applied block by block (:func:`moe_lab.hf.compress_model`), the last
    block's. The recipe item spells bits, groups and a non-default coverage only.
    """

    bits: int = 8
    group_size: int | None = None
    accepts = frozenset({"float", "lowrank"})  # not sparse storage; quantizing twice does nothing
    output_format = "quantized"
    method: str = "rtn"
    coverage: str = "fallback"
    min_tokens: int | None = None
    damp: float = 0.01
    act_order: bool = False
    weight_by_gate: bool = False
    last_report: list | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self):
        _check_bits_and_groups(self.bits, self.group_size, self.group_size or 1)
        if self.method not in QUANTIZE_METHODS:
            raise ValueError(f"method must be one of {QUANTIZE_METHODS}, got {self.method!r}")
        if self.coverage not in COVERAGES:
            raise ValueError(f"coverage must be one of {COVERAGES}, got {self.coverage!r}")
        if self.min_tokens is not None:
            positive_int("min_tokens", self.min_tokens)
        finite_float("damp", self.damp, minimum=0.0)
        for flag in ("act_order", "weight_by_gate"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {type(getattr(self, flag)).__name__}")

    @property
    def name(self) -> str:
        return (f"int{self.bits} weights" + (f" (groups of {self.group_size})" if self.group_size else "")
                + (" by GPTQ" if self.method == "gptq" else ""))

    @property
    def recipe(self) -> str:
        prefix = "gptq" if self.method == "gptq" else "int"
        suffix = f":{self.coverage}" if self.method == "gptq" and self.coverage != "fallback" else ""
        return f"{prefix}{self.bits}" + (f"-g{self.group_size}" if self.group_size else "") + suffix

    @classmethod
    def from_recipe(cls, item: str, bits: str, method: str = "int", group: str | None = None,
                    coverage: str | None = None) -> Quantize:
        bits_value = number(item, bits, int)
        if bits_value not in SUPPORTED_BITS:
            raise ValueError(f"recipe item {item!r}: bits must be one of {SUPPORTED_BITS}")
        if coverage is not None and (method != "gptq" or coverage not in COVERAGES):
            raise ValueError(f"recipe item {item!r}: ':coverage' is one of {COVERAGES}, after a gptq item")
        group_size = None if group is None else number(item, group, int, what="the group size", low=1)
        if method == "int":
            return cls(bits_value, group_size)
        return cls(bits_value, group_size, method="gptq", coverage=coverage or "fallback")

    def apply(self, model: nn.Module, calibration: torch.Tensor) -> nn.Module:
        if self.method == "rtn":
            self.last_report = None
            return quantize_experts(model, self.bits, self.group_size)
        _check_not_sparse(model)
        self.last_report = gptq_experts(model, calibration, self.bits, self.group_size, damp=self.damp,
                                        act_order=self.act_order, coverage=self.coverage,
                                        min_tokens=self.min_tokens, weight_by_gate=self.weight_by_gate)
        return model
