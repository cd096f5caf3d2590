"""Sharing weights across experts after training: merging similar experts, and a shared base
expert plus small per-expert low-rank deltas.

* :func:`merge_experts` groups experts whose outputs on calibration data are similar
  (average-linkage clustering on cosine similarity) and replaces each group by one expert,
  the usage-weighted average of its members (MC-SMoE, Li et al. 2024; HC-SMoE, Chen et al.
  2024). The router rows of a group are averaged the same way and ``log(group size)`` is
  added to the bias, so a group of identical experts keeps exactly the probability mass
  its members had.
* :func:`base_delta_experts` stores ``W_e = W_base + B_e A_e`` with one shared ``W_base``
  (the usage-weighted mean expert) and rank-``r`` deltas (the D2-MoE idea, Gu et al. 2025).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab._checks import last_dim, positive_int
from moe_lab.compress.prune import expert_usage
from moe_lab.compress.registry import Stage, number, register_stage
from moe_lab.compress.targets import check_mixture, layer_inputs, moe_layers, replace_module
from moe_lab.layers.compact.base_delta import BaseDeltaLinear


def _experts(layer: nn.Module, linear_only: bool = False) -> tuple[str, nn.ModuleList]:
    name = layer.EXPERTS
    experts = getattr(layer, name)
    kinds = {tuple(type(m) for m in e.modules()) for e in experts}
    if len(kinds) != 1 or not all(isinstance(m, (nn.Linear, nn.ModuleList)) or not list(m.parameters(False))
                                  for e in experts for m in e.modules()):
        raise TypeError("sharing needs float experts built from nn.Linear layers, all alike "
                        "(apply it before low-rank or quantization)")
    if linear_only and not all(type(e) is nn.Linear for e in experts):
        raise TypeError("base_delta_experts needs nn.Linear experts")
    return name, experts


def _weighted_sum(weights: torch.Tensor, tensors: list[torch.Tensor], shift: float = 0.0) -> torch.Tensor:
    """``sum_i weights[i] * tensors[i] + shift``, accumulated in at least float32 and returned in
    the tensors' dtype (a bfloat16 sum of many experts would round at every step)."""
    dtype = tensors[0].dtype
    wide = torch.promote_types(dtype, torch.float32)
    total = sum(w.to(wide) * t.to(wide) for w, t in zip(weights, tensors))
    return (total + shift).to(dtype)


def group_experts(layer: nn.Module, x: torch.Tensor, num_groups: int) -> list[list[int]]:
    """Cluster the experts into ``num_groups`` groups by the cosine similarity of their
    outputs on calibration inputs ``x`` ``(n, d)`` (average linkage, merging the most
    similar pair of groups until ``num_groups`` remain). Groups are sorted lists."""
    check_mixture(layer)
    last_dim("x", x, layer.input_size)
    positive_int("num_groups", num_groups)
    _, experts = _experts(layer)
    if num_groups > len(experts):
        raise ValueError(f"num_groups must be <= num_experts ({len(experts)}), got {num_groups}")
    with torch.no_grad():
        inputs = layer.expert_input(x.reshape(-1, x.shape[-1]))
        wide = torch.promote_types(inputs.dtype, torch.float32)  # long dot products: not in bfloat16
        outputs = torch.stack([F.normalize(e(inputs).reshape(-1).to(wide), dim=0) for e in experts])
    similarity = outputs @ outputs.T
    groups = [[e] for e in range(len(experts))]
    while len(groups) > num_groups:
        best, pair = -math.inf, None
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                score = similarity[groups[i]][:, groups[j]].mean().item()
                if score > best:
                    best, pair = score, (i, j)
        i, j = pair
        groups[i] = sorted(groups[i] + groups.pop(j))
    return sorted(groups)


def merge_experts(layer: nn.Module, x: torch.Tensor, num_groups: int,
                  groups: list[list[int]] | None = None) -> nn.Module:
    """A new layer with ``num_groups`` experts, each the usage-weighted average of a group of
    similar experts (see :func:`group_experts`, or pass ``groups``), router rows merged to
    match. Usage is the gate weight each expert receives on ``x``."""
    groups = groups or group_experts(layer, x, num_groups)
    if sorted(e for g in groups for e in g) != list(range(layer.num_experts)):
        raise ValueError("groups must partition the experts")
    usage = expert_usage(layer, x)["gate_weight"].clamp_min(1e-6)
    name, experts = _experts(layer)
    config = {**layer.config, "num_experts": len(groups)}
    if "k" in config:
        config["k"] = min(config["k"], len(groups))
    routers = [r for r in layer.ROUTERS if isinstance(getattr(layer, r, None), nn.Linear)
               and getattr(layer, r).out_features == layer.num_experts]
    with torch.device("meta"):  # the structure only: every tensor is set from the old layer below
        new = type(layer)(**config)
    with torch.no_grad():
        for child_name, child in layer.named_children():
            if child_name != name:
                setattr(new, child_name, copy.deepcopy(child))
        merged_experts = []
        for members in groups:
            weights = usage[members] / usage[members].sum()
            states = [experts[e].state_dict() for e in members]
            expert = copy.deepcopy(experts[members[0]])
            expert.load_state_dict({key: _weighted_sum(weights, [s[key] for s in states])
                                    for key in states[0]})
            merged_experts.append(expert)
        setattr(new, name, nn.ModuleList(merged_experts))
        for router in routers:
            old, merged = getattr(layer, router), getattr(new, router)
            rows, biases = [], []
            for members in groups:
                weights = usage[members] / usage[members].sum()
                rows.append(_weighted_sum(weights, [old.weight[e] for e in members]))
                if old.bias is not None:
                    biases.append(_weighted_sum(weights, [old.bias[e] for e in members],
                                                shift=math.log(len(members))))
            merged.weight = nn.Parameter(torch.stack(rows), old.weight.requires_grad)
            if old.bias is not None:
                merged.bias = nn.Parameter(torch.stack(biases), old.bias.requires_grad)
            merged.out_features = len(groups)
        for param_name, value in layer.named_parameters(recurse=False):
            setattr(new, param_name, nn.Parameter(value.detach().clone(), value.requires_grad))
        for buffer_name, value in layer.named_buffers(recurse=False):
            if buffer_name in layer.EXPERT_BUFFERS:  # one entry per group: float ones averaged by
                value = torch.stack([  # usage, others (a group id) from the most used member
                    (usage[g] / usage[g].sum()).to(value.dtype) @ value[g] if value.is_floating_point()
                    else value[g[int(usage[g].argmax())]] for g in groups])
            new.register_buffer(buffer_name, value.clone())
    return new


def base_delta_experts(layer: nn.Module, rank: int, x: torch.Tensor | None = None) -> nn.Module:
    """Rewrite a layer's experts, in place, as one shared base plus rank-``rank`` deltas
    (truncated SVD of ``W_e - W_base``). ``W_base`` is the mean expert, weighted by gate usage
    on ``x`` if given. Returns the layer."""
    name, experts = _experts(layer, linear_only=True)
    positive_int("rank", rank)
    weight = experts[0].weight
    usage = (expert_usage(layer, x)["gate_weight"] if x is not None
             else torch.full((len(experts),), 1 / len(experts), device=weight.device))
    with torch.no_grad():
        base = nn.Parameter(_weighted_sum(usage, [e.weight for e in experts]))
        new = []
        for expert in experts:
            delta = BaseDeltaLinear(expert.in_features, expert.out_features, rank,
                                    bias=expert.bias is not None, device=weight.device, dtype=weight.dtype)
            u, s, vh = torch.linalg.svd(expert.weight.double() - base.double(), full_matrices=False)
            root = s[:rank].sqrt()
            delta.delta_in.copy_(root[:, None] * vh[:rank])
            delta.delta_out.copy_(u[:, :rank] * root)
            if expert.bias is not None:
                delta.bias.copy_(expert.bias)
            delta.base = base  # one tensor shared by every expert
            new.append(delta)
    setattr(layer, name, nn.ModuleList(new))
    return layer


@register_stage(r"merge=(?P<groups>.+)", "merge=N")
@dataclass
class MergeExperts(Stage):
    """Merge each MoE layer's experts into ``num_groups`` by output similarity."""

    num_groups: int
    accepts = frozenset({"float"})  # averages nn.Linear experts: before low-rank, quantization, sparsity

    def __post_init__(self):
        positive_int("num_groups", self.num_groups)

    @property
    def name(self) -> str:
        return f"merge experts into {self.num_groups}"

    @property
    def recipe(self) -> str:
        return f"merge={self.num_groups}"

    @classmethod
    def from_recipe(cls, item: str, groups: str) -> MergeExperts:
        return cls(number(item, groups, int, what="the number of experts", low=1))

    def apply(self, model: nn.Module, calibration: torch.Tensor) -> nn.Module:
        for name, layer in moe_layers(model):
            x = calibration if not name else layer_inputs(model, layer, calibration)
            merged = merge_experts(layer, x, self.num_groups)
            if not name:
                return merged
            replace_module(model, name, merged)
        return model
