"""Quantizing a model's mixture layers: every expert linear to int8 / int4, mixed precision by
expert usage or measured sensitivity. The storage format itself is
:class:`~moe_lab.layers.compact.quantized.QuantizedLinear`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from moe_lab.compress.registry import Stage, number, register_stage
from moe_lab.compress.targets import expert_linears, moe_layers, replace_module
from moe_lab.layers.compact.quantized import SUPPORTED_BITS, QuantizedLinear, _check_bits_and_groups
from moe_lab.layers.compact.sparse import SparseLinear


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
    if any(isinstance(m, SparseLinear) for _, layer in moe_layers(model) for m in layer.modules()):
        raise ValueError("the MoE layers hold sparse (bitmask) weights, which this int8/int4 format cannot "
                         "store: quantize instead of storing sparsely, or quantize before magnitude pruning")
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


@register_stage(r"int(?P<bits>\d+)(?:-g(?P<group>\d+))?", "int8 | int4[-gN]")
@dataclass
class Quantize(Stage):
    """Weight-only int8 / int4 quantization of the MoE layers; the router stays in float."""

    bits: int = 8
    group_size: int | None = None
    accepts = frozenset({"float", "lowrank"})  # not sparse storage; quantizing twice does nothing
    output_format = "quantized"

    def __post_init__(self):
        _check_bits_and_groups(self.bits, self.group_size, self.group_size or 1)

    @property
    def name(self) -> str:
        return f"int{self.bits} weights" + (f" (groups of {self.group_size})" if self.group_size else "")

    @property
    def recipe(self) -> str:
        return f"int{self.bits}" + (f"-g{self.group_size}" if self.group_size else "")

    @classmethod
    def from_recipe(cls, item: str, bits: str, group: str | None = None) -> Quantize:
        bits_value = number(item, bits, int)
        if bits_value not in SUPPORTED_BITS:
            raise ValueError(f"recipe item {item!r}: bits must be one of {SUPPORTED_BITS}")
        group_size = None if group is None else number(item, group, int, what="the group size", low=1)
        return cls(bits_value, group_size)

    def apply(self, model: nn.Module, calibration: torch.Tensor) -> nn.Module:
        return quantize_experts(model, self.bits, self.group_size)
