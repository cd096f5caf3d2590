"""Pruning MoE layers: weights by magnitude, hidden units, and whole experts.

The deck (slide 3) zeroes small weights and swaps an all-small expert for ``nn.Identity``:
the zeros cost as many bytes as before, and the router still sends tokens to the identity,
which returns the input (the wrong width) instead of an expert output. Here an expert is
removed together with its router row, so no token can be routed to it.
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

from moe_lab._checks import last_dim, positive_int
from moe_lab.compress.sparse import SparseLinear
from moe_lab.compress.targets import (
    MOE_TYPES,
    expert_linears,
    experts_name,
    input_size,
    layer_inputs,
    moe_layers,
    replace_module,
    router_names,
)
from moe_lab.soft_moe import SoftMoE
from moe_lab.topk_moe import TopKMoE

EXPERT_SCORES = ("frequency", "gate_weight", "reconstruction")


def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def magnitude_prune(model: nn.Module, sparsity: float, *, scope: str = "layer",
                    include_router: bool = False) -> nn.Module:
    """Zero the smallest-magnitude weights of the MoE layers' linear maps, in place.

    ``scope="layer"``: each matrix loses ``sparsity`` of its weights; ``scope="global"``: the
    threshold is shared, so ``sparsity`` of all targeted weights go. Built on
    ``torch.nn.utils.prune`` and made permanent (no masks or hooks left). Routers are left
    alone unless ``include_router``. Returns ``model``.
    """
    sparsity = _check_sparsity(sparsity)
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    from moe_lab.compress.quantize import QuantizedLinear

    compressed = (QuantizedLinear, SparseLinear)
    if any(isinstance(m, compressed) for _, layer in moe_layers(model) for m in layer.modules()):
        raise ValueError("the MoE layers are already quantized or stored sparsely: magnitude-prune the float "
                         "weights first, then quantize or store them sparsely")
    targets = [module for _, module in expert_linears(model, include_router)]
    if not targets or sparsity == 0:
        return model
    if scope == "global":
        torch_prune.global_unstructured([(m, "weight") for m in targets],
                                        pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    else:
        for module in targets:
            torch_prune.l1_unstructured(module, "weight", amount=sparsity)
    for module in targets:
        torch_prune.remove(module, "weight")
    return model


def to_sparse(model: nn.Module, include_router: bool = False) -> nn.Module:
    """Replace the MoE layers' linear maps with :class:`SparseLinear` (bitmask + values), in
    place, so that pruned zeros stop costing bytes. Outputs are unchanged. Returns ``model``."""
    for name, module in list(expert_linears(model, include_router)):
        replace_module(model, name, SparseLinear.from_linear(module))
    return model


def _hidden_importance(layer: nn.Module) -> torch.Tensor:
    """Weight-based importance of each hidden unit ``j``: ``sum_e |W_e[j]| * |W_out[:, j]|``."""
    rows = torch.stack([expert.weight.detach().norm(dim=1) for expert in layer.experts]).sum(0)
    return rows * layer.output.weight.detach().norm(dim=0)


def prune_hidden_units(layer: nn.Module, keep: int) -> nn.Module:
    """Structured pruning: keep the ``keep`` most important hidden units (of ``expert_size``),
    dropping the same rows from every expert and columns from ``output``. Returns a new,
    smaller layer of the same class; matrices really shrink."""
    if not isinstance(layer, (SoftMoE, TopKMoE)) or not all(type(e) is nn.Linear for e in layer.experts):
        raise TypeError("prune_hidden_units needs a SoftMoE or TopKMoE with nn.Linear experts")
    hidden = layer.config["expert_size"]
    positive_int("keep", keep)
    if keep > hidden:
        raise ValueError(f"keep must be <= expert_size ({hidden}), got {keep}")
    units = _hidden_importance(layer).topk(keep).indices.sort().values
    new = copy.deepcopy(layer)
    new.config = {**layer.config, "expert_size": keep}
    with torch.no_grad():
        for old, expert in zip(layer.experts, new.experts):
            expert.weight = nn.Parameter(old.weight[units].clone())
            expert.bias = nn.Parameter(old.bias[units].clone())
            expert.out_features = keep
        new.output.weight = nn.Parameter(layer.output.weight[:, units].clone())
        new.output.in_features = keep
    return new


@torch.no_grad()
def expert_usage(layer: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """How much a layer uses each expert on calibration inputs ``x`` ``(..., d)``.

    ``frequency``: fraction of routed assignments per expert (a dense layer's top-1 choice);
    ``gate_weight``: mean gate weight per expert over tokens. Both ``(E,)``, summing to one.
    """
    if not isinstance(layer, MOE_TYPES):
        raise TypeError(f"layer must be a mixture layer, got {type(layer).__name__}")
    last_dim("x", x, input_size(layer))
    E = layer.num_experts
    if hasattr(layer, "route"):
        routing = layer.route(x)
        indices, gates = routing.indices, routing.gates
    else:
        probs = layer.gate_probs(x).reshape(-1, E)
        indices, gates = probs.argmax(-1, keepdim=True), probs
    counts = torch.bincount(indices.reshape(-1), minlength=E).float()
    if hasattr(layer, "route"):
        weight = torch.zeros(E).index_add_(0, indices.reshape(-1), gates.reshape(-1).float())
    else:
        weight = gates.sum(0)
    return {"frequency": counts / counts.sum(), "gate_weight": weight / weight.sum()}


def prune_experts(layer: nn.Module, keep: list[int]) -> nn.Module:
    """A new layer with only the experts ``keep`` (their trained weights) and the matching
    router rows; ``num_experts`` (and a top-k layer's ``k``, if it exceeds the experts left)
    updated. No token can be routed to a removed expert."""
    if not isinstance(layer, MOE_TYPES):
        raise TypeError(f"layer must be a mixture layer, got {type(layer).__name__}")
    keep = [int(e) for e in keep]
    E = layer.num_experts
    if not keep:
        raise ValueError("keep must name at least one expert: pruning all experts leaves no layer")
    if len(set(keep)) != len(keep) or not all(0 <= e < E for e in keep):
        raise ValueError(f"keep must be distinct expert indices in [0, {E}), got {keep}")
    config = {**layer.config, "num_experts": len(keep)}
    if "k" in config:
        config["k"] = min(config["k"], len(keep))
    new = type(layer)(**config)
    index = torch.tensor(keep)
    with torch.no_grad():
        for name, child in layer.named_children():
            if name == experts_name(layer):
                setattr(new, name, nn.ModuleList(copy.deepcopy(child[e]) for e in keep))
            elif name in router_names(layer) and child.out_features == E:
                router = getattr(new, name)
                router.weight.copy_(child.weight[index])
                if child.bias is not None:
                    router.bias.copy_(child.bias[index])
            else:
                setattr(new, name, copy.deepcopy(child))
    return new


def _reconstruction_error(layer, candidate, x, reference) -> float:
    with torch.no_grad():
        return float((candidate(x) - reference).square().mean())


def select_experts(layer: nn.Module, x: torch.Tensor, num_keep: int, score: str = "frequency",
                   max_subsets: int = 5000) -> list[int]:
    """Which ``num_keep`` experts to keep, judged on calibration inputs ``x``.

    ``"frequency"`` / ``"gate_weight"``: the most used (see :func:`expert_usage`).
    ``"reconstruction"``: try every subset of size ``num_keep`` and keep the one whose
    pruned layer reproduces the full layer's outputs best (mean squared error), the
    NAEE idea (Lu et al. 2024); only for small ``E`` (at most ``max_subsets`` subsets).
    """
    positive_int("num_keep", num_keep)
    if score not in EXPERT_SCORES:
        raise ValueError(f"score must be one of {EXPERT_SCORES}, got {score!r}")
    E = layer.num_experts
    if num_keep > E:
        raise ValueError(f"num_keep must be <= num_experts ({E}), got {num_keep}")
    if score != "reconstruction":
        usage = expert_usage(layer, x)[score]
        return sorted(usage.topk(num_keep).indices.tolist())
    if math.comb(E, num_keep) > max_subsets:
        raise ValueError(f"{math.comb(E, num_keep)} subsets of {num_keep} of {E} experts exceed "
                         f"max_subsets={max_subsets}; use score='frequency' or 'gate_weight'")
    with torch.no_grad():
        reference = layer(x)
    errors = {subset: _reconstruction_error(layer, prune_experts(layer, list(subset)), x, reference)
              for subset in itertools.combinations(range(E), num_keep)}
    return list(min(errors, key=errors.get))


def prune_model_experts(model: nn.Module, calibration: torch.Tensor, num_keep: int,
                        score: str = "frequency") -> nn.Module:
    """Prune every MoE layer of ``model`` to ``num_keep`` experts, in place, layer by layer:
    each layer's calibration inputs are captured by running ``model`` on ``calibration``
    after the layers before it were pruned. Returns ``model``."""
    for name, layer in moe_layers(model):
        x = calibration if not name else layer_inputs(model, layer, calibration)
        pruned = prune_experts(layer, select_experts(layer, x, num_keep, score))
        if not name:
            return pruned
        replace_module(model, name, pruned)
    return model
