"""Checker for notebook 03 (pruning): remove one expert together with its router row."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from moe_lab.compress.prune import prune_experts
from moe_lab.exercises._feedback import ready
from moe_lab.layers.dense import DenseMoE
from moe_lab.layers.topk import TopKMoE

HINT = ("Hint: keep = [i for i in range(layer.num_experts) if i != e]. Build the new layer from a copy: "
        "experts = nn.ModuleList of the kept experts, a new gating nn.Linear(d, len(keep)) whose weight and "
        "bias are the kept rows of the old router (weight[keep], bias[keep]), and update num_experts "
        "(and config['num_experts']). moe_lab.compress.prune.prune_experts(layer, keep) is the reference.")


def _cases() -> list[tuple[str, nn.Module, int]]:
    """``(name, layer, expert to remove)``, built from a fixed seed without moving the learner's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return [("TopKMoE(E=6, k=2), remove expert 0", TopKMoE(6, 8, 12, 3, k=2), 0),
                ("TopKMoE(E=6, k=2), remove expert 5 (the last)", TopKMoE(6, 8, 12, 3, k=2), 5),
                ("TopKMoE(E=4, k=1), remove expert 2", TopKMoE(4, 8, 12, 3, k=1), 2),
                ("DenseMoE(E=5), remove expert 3", DenseMoE(5, 8, 12, 3), 3)]


def _check_case(fn, name: str, layer: nn.Module, e: int, x: torch.Tensor) -> bool:
    keep = [i for i in range(layer.num_experts) if i != e]
    expected_layer = prune_experts(layer, keep)
    given = copy.deepcopy(layer)
    try:
        new = fn(given, e)
    except Exception as error:  # a learner's bug should print, not stop the notebook
        print(f"{name}: your function raised {type(error).__name__}: {error}")
        return False
    if not isinstance(new, nn.Module):
        print(f"{name}: expected a layer (nn.Module), got {type(new).__name__}.")
        return False
    if any(not torch.equal(a, b) for a, b in zip(given.state_dict().values(), layer.state_dict().values())):
        print(f"{name}: your function changed the layer it was given; build and return a new one.")
        return False
    E = len(keep)
    if getattr(new, "num_experts", None) != E or len(getattr(new, "experts", [])) != E:
        print(f"{name}: expected num_experts == len(experts) == {E}, got num_experts="
              f"{getattr(new, 'num_experts', None)} and {len(getattr(new, 'experts', []))} experts.")
        return False
    gating = getattr(new, "gating", None)
    if not isinstance(gating, nn.Linear) or gating.weight.shape != (E, x.shape[-1]):
        shape = tuple(gating.weight.shape) if isinstance(gating, nn.Linear) else None
        print(f"{name}: the router must have one row per remaining expert, shape {(E, x.shape[-1])}, "
              f"got {shape}. A router row left behind sends tokens to an expert that is gone.")
        return False
    try:
        with torch.no_grad():
            got = new.eval()(x)
    except Exception as error:
        print(f"{name}: running your layer raised {type(error).__name__}: {error}")
        return False
    with torch.no_grad():
        expected = expected_layer.eval()(x)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-5, atol=1e-6):
        print(f"{name}: outputs differ from the layer with expert {e} removed. Did you keep the router "
              f"rows of the same experts you kept (weight[keep] and bias[keep]), in the same order?")
        return False
    if isinstance(new, TopKMoE) and tuple(new.tokens_per_expert.shape) != (E,):
        print(f"{name}: after a forward, tokens_per_expert should have {E} entries.")
        return False
    return True


def check_remove_expert(fn) -> bool:
    """Check ``fn(layer, e) -> new layer`` without expert ``e`` and without its router row.

    Compared on several ``TopKMoE`` and ``DenseMoE`` layers with
    :func:`moe_lab.compress.prune.prune_experts`: the number of experts, the router's shape,
    that the given layer is left unchanged, and the outputs (to 1e-5). Prints what differs;
    returns ``True`` only if every case matches.
    """
    if not ready(fn, HINT, "fn(layer, e)"):
        return False
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(30))
    with torch.random.fork_rng(devices=[]):  # building layers must not move the learner's seed
        for name, layer, e in _cases():
            if not _check_case(fn, name, layer, e, x):
                return False
    print("Correct: every layer lost exactly one expert and its router row, and its outputs match "
          "moe_lab.compress.prune.prune_experts.")
    return True
