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
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

from moe_lab._checks import last_dim, positive_int
from moe_lab.compress.calibration import expert_contributions, routed_tokens
from moe_lab.compress.registry import Stage, number, register_stage
from moe_lab.compress.targets import check_mixture, expert_linears, layer_inputs, moe_layers, replace_module
from moe_lab.layers.compact.base import CompactLinear
from moe_lab.layers.compact.sparse import SparseLinear
from moe_lab.layers.dense import DenseMoE
from moe_lab.layers.topk import TopKMoE

EXPERT_SCORES = ("frequency", "gate_weight", "reconstruction", "reap")


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
    if any(isinstance(m, CompactLinear) and m.WEIGHT_IN_BUFFERS
           for _, layer in moe_layers(model) for m in layer.modules()):
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
    if type(layer) not in (DenseMoE, TopKMoE) or not all(type(e) is nn.Linear for e in layer.experts):
        raise TypeError("prune_hidden_units needs a DenseMoE or TopKMoE with nn.Linear experts")
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
    ``gate_weight``: mean gate weight per expert over tokens. Both ``(E,)`` float32, summing to
    one, on ``x``'s device (see :meth:`moe_lab.MixtureLayer.expert_load`).
    """
    check_mixture(layer)
    last_dim("x", x, layer.input_size)
    load = layer.expert_load(x)
    return {"frequency": load.frequency.float(), "gate_weight": load.mean_gate.float()}


def prune_experts(layer: nn.Module, keep: list[int]) -> nn.Module:
    """A new layer with only the experts ``keep`` (their trained weights) and the matching
    router rows; ``num_experts`` (and a top-k layer's ``k``, if it exceeds the experts left)
    updated. No token can be routed to a removed expert."""
    check_mixture(layer)
    keep = [int(e) for e in keep]
    E = layer.num_experts
    if not keep:
        raise ValueError("keep must name at least one expert: pruning all experts leaves no layer")
    if len(set(keep)) != len(keep) or not all(0 <= e < E for e in keep):
        raise ValueError(f"keep must be distinct expert indices in [0, {E}), got {keep}")
    routers = {name: getattr(layer, name) for name in layer.ROUTERS if getattr(layer, name, None) is not None}
    if not all(isinstance(r, nn.Linear) and r.out_features == E for r in routers.values()):
        raise TypeError(f"{type(layer).__name__} does not route with a linear router of one row per expert: "
                        f"its experts cannot be pruned by removing router rows")
    config = {**layer.config, "num_experts": len(keep)}
    if "k" in config:
        config["k"] = min(config["k"], len(keep))
    with torch.device("meta"):  # the structure only: every tensor is copied from the old layer below
        new = type(layer)(**config)
    index = torch.tensor(keep, device=layer.router.weight.device)
    with torch.no_grad():
        for name, child in layer.named_children():
            if name == layer.EXPERTS:
                setattr(new, name, nn.ModuleList(copy.deepcopy(child[e]) for e in keep))
            elif name in routers:
                router = copy.deepcopy(child)
                router.weight = nn.Parameter(child.weight[index].clone(), child.weight.requires_grad)
                if child.bias is not None:
                    router.bias = nn.Parameter(child.bias[index].clone(), child.bias.requires_grad)
                router.out_features = len(keep)
                setattr(new, name, router)
            else:
                setattr(new, name, copy.deepcopy(child))
        for name, value in layer.named_parameters(recurse=False):
            setattr(new, name, nn.Parameter(value.detach().clone(), value.requires_grad))
        for name, value in layer.named_buffers(recurse=False):
            per_expert = name in layer.EXPERT_BUFFERS
            new.register_buffer(name, value[index.to(value.device)].clone() if per_expert else value.clone())
    return new.train(layer.training)


@torch.no_grad()
def reap_scores(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """REAP (Router-weighted Expert Activation Pruning, Cerebras 2025): per expert ``e``, the mean over
    the tokens of ``x`` ``(..., d)`` routed to ``e`` of ``gate_e(x) * ||expert_e(x)||_2``, the expert's
    gated output measured in the layer's output (:func:`~moe_lab.compress.calibration.expert_contributions`);
    0 for an expert no token reaches. ``(E,)`` float64.

    Pruning then removes the experts' router rows (:func:`prune_experts`), so the router is
    renormalised over the kept experts: a softmax router's probabilities become the softmax of the
    kept logits (the old probabilities divided by the mass kept); top-k gates renormalised to sum to
    one (``normalize=True``, ``topk_softmax``) are renormalised over the top-k among the kept experts;
    unnormalised top-k gates (``normalize=False``) are the kept softmax probabilities, so each grows
    by the mass the removed experts held.
    """
    check_mixture(layer)
    contributions = expert_contributions(layer, x)  # (n, E), zero off the routed tokens
    return torch.stack([contributions[tokens.index.to(contributions.device), tokens.expert].mean()
                        if tokens.count else contributions.new_zeros(())
                        for tokens in routed_tokens(layer, x)])


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
    ``"reap"``: the largest :func:`reap_scores` (router-weighted expert output norms).
    """
    positive_int("num_keep", num_keep)
    if score not in EXPERT_SCORES:
        raise ValueError(f"score must be one of {EXPERT_SCORES}, got {score!r}")
    E = layer.num_experts
    if num_keep > E:
        raise ValueError(f"num_keep must be <= num_experts ({E}), got {num_keep}")
    if score == "reap":
        return sorted(reap_scores(layer, x).topk(num_keep).indices.tolist())
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


@register_stage(r"prune-experts=(?P<fraction>[^:]+)(?::(?P<score>[a-z_]+))?", "prune-experts=F[:score]")
@dataclass
class ExpertPrune(Stage):
    """Remove ``fraction`` of each MoE layer's experts (at least one stays), chosen by
    ``score`` on the calibration data: one of :data:`EXPERT_SCORES`."""

    fraction: float
    score: str = "frequency"

    def __post_init__(self):
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                or not 0 <= self.fraction < 1:
            raise ValueError(f"fraction must be a number in [0, 1), got {self.fraction!r}")
        if self.score not in EXPERT_SCORES:
            raise ValueError(f"score must be one of {EXPERT_SCORES}, got {self.score!r}")

    @property
    def name(self) -> str:
        return f"prune {self.fraction:.0%} of experts ({self.score})"

    @property
    def recipe(self) -> str:
        return f"prune-experts={self.fraction:g}" + ("" if self.score == "frequency" else f":{self.score}")

    @classmethod
    def from_recipe(cls, item: str, fraction: str, score: str = "frequency") -> ExpertPrune:
        if score not in EXPERT_SCORES:
            raise ValueError(f"recipe item {item!r}: the score must be one of {EXPERT_SCORES}")
        return cls(number(item, fraction, what="the fraction", low=0, high=1, high_open=True), score)

    def apply(self, model: nn.Module, calibration: torch.Tensor) -> nn.Module:
        experts = moe_layers(model)[0][1].num_experts
        keep = max(1, round(experts * (1 - self.fraction)))
        return prune_model_experts(model, calibration, keep, self.score)


@register_stage(r"sparsity=(?P<sparsity>.+)", "sparsity=F")
@dataclass
class MagnitudePrune(Stage):
    """Zero ``sparsity`` of the MoE weights by magnitude; store them sparsely if ``sparse_storage``."""

    sparsity: float
    scope: str = "layer"
    sparse_storage: bool = True
    accepts = frozenset({"float", "lowrank"})  # zeros float weights, not quantized or sparse ones

    @property
    def output_format(self) -> str | None:
        return "sparse" if self.sparse_storage else None

    def __post_init__(self):
        _check_sparsity(self.sparsity)
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {self.scope!r}")

    @property
    def name(self) -> str:
        return f"magnitude prune {self.sparsity:.0%}" + (" + sparse storage" if self.sparse_storage else "")

    @property
    def recipe(self) -> str:
        return f"sparsity={self.sparsity:g}"

    @classmethod
    def from_recipe(cls, item: str, sparsity: str) -> MagnitudePrune:
        return cls(number(item, sparsity, what="the sparsity", low=0, high=1, high_open=True))

    def apply(self, model: nn.Module, calibration: torch.Tensor) -> nn.Module:
        magnitude_prune(model, self.sparsity, scope=self.scope)
        return to_sparse(model) if self.sparse_storage else model
