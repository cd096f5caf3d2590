"""Compression recipes written as short strings, for the command line and quick experiments.

``"prune-experts=0.25,lowrank=0.5,int8,finetune=1"`` means: remove a quarter of each MoE
layer's experts (by routing frequency), replace expert matrices by truncated SVDs keeping
50% of their spectral energy, quantize to int8, then fine-tune for one epoch. Items:

=====================  ==========================================================
``prune-experts=F``    :class:`~moe_lab.compress.ExpertPrune` of fraction ``F``
``merge=N``            :class:`~moe_lab.compress.MergeExperts` into ``N`` experts
``sparsity=F``         :class:`~moe_lab.compress.MagnitudePrune` (sparse storage)
``lowrank=X``          :class:`~moe_lab.compress.LowRank`: energy if ``X < 1``, else rank
``int8`` / ``int4``    :class:`~moe_lab.compress.Quantize`; ``int4-g32``: groups of 32
``finetune=N``         a fine-tune of ``N`` epochs at the end (needs training data)
=====================  ==========================================================
"""

from __future__ import annotations

import re

from moe_lab.compress.pipeline import ExpertPrune, LowRank, MagnitudePrune, MergeExperts, Quantize

_QUANT = re.compile(r"^int(4|8)(?:-g(\d+))?$")


def _number(item: str, value: str, kind=float):
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"recipe item {item!r}: {value!r} is not a {kind.__name__}") from None


def parse_recipe(recipe: str) -> tuple[list, int]:
    """Stages and fine-tune epochs (0 if none) for a recipe string; ``ValueError`` naming the
    bad item otherwise."""
    if not isinstance(recipe, str) or not recipe.strip():
        raise ValueError("recipe must be a non-empty string such as 'prune-experts=0.25,int8'")
    stages, finetune = [], 0
    for item in (part.strip() for part in recipe.split(",")):
        name, _, value = item.partition("=")
        quant = _QUANT.match(item)
        if quant:
            stages.append(Quantize(int(quant.group(1)), int(quant.group(2)) if quant.group(2) else None))
        elif name == "prune-experts" and value:
            fraction = _number(item, value)
            if not 0 <= fraction < 1:
                raise ValueError(f"recipe item {item!r}: the fraction must be in [0, 1)")
            stages.append(ExpertPrune(fraction))
        elif name == "merge" and value:
            stages.append(MergeExperts(_number(item, value, int)))
        elif name == "sparsity" and value:
            stages.append(MagnitudePrune(_number(item, value)))
        elif name == "lowrank" and value:
            amount = _number(item, value)
            if amount <= 0:
                raise ValueError(f"recipe item {item!r}: must be an energy in (0, 1) or a rank >= 1")
            stages.append(LowRank(energy=amount) if amount < 1 else LowRank(rank=int(amount)))
        elif name == "finetune" and value:
            finetune = _number(item, value, int)
            if finetune < 1:
                raise ValueError(f"recipe item {item!r}: epochs must be >= 1")
        else:
            raise ValueError(f"unknown recipe item {item!r}; use prune-experts=F, merge=N, sparsity=F, "
                             f"lowrank=X, int8, int4, int4-gN, finetune=N")
    if not stages:
        raise ValueError(f"recipe {recipe!r} has no compression stage")
    return stages, finetune
