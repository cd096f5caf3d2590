"""Compression recipes written as short strings, for the command line and quick experiments.

``"prune-experts=0.25,lowrank=0.5,int8,finetune=1"`` means: remove a quarter of each MoE
layer's experts (by routing frequency), replace expert matrices by truncated SVDs keeping
50% of their spectral energy, quantize to int8, then fine-tune for one epoch. Items:

=====================  ==========================================================
``prune-experts=F``    :class:`~moe_lab.compress.ExpertPrune` of fraction ``F``
                       (``prune-experts=F:score`` picks the expert score, e.g. ``:reap``)
``merge=N``            :class:`~moe_lab.compress.MergeExperts` into ``N`` experts
``sparsity=F``         :class:`~moe_lab.compress.MagnitudePrune` (sparse storage)
``lowrank=X``          :class:`~moe_lab.compress.LowRank`: energy if ``X < 1``, else a whole rank
``lowrank-act=X``      the same, activation-aware (fitted to each expert's routed inputs)
``int8`` / ``int4``    :class:`~moe_lab.compress.Quantize`; ``int4-g32``: groups of 32
``gptq4`` / ``gptq8``  :class:`~moe_lab.compress.Quantize` by GPTQ (``gptq4-g32``; ``gptq4:all``
                       or ``:error`` for experts with too few calibration tokens)
``finetune=N``         a fine-tune of ``N`` epochs at the end (needs training data)
=====================  ==========================================================

Every item is parsed by the stage registered for it (:mod:`moe_lab.compress.registry`), so a
new technique's recipe item works here as soon as its stage is registered.
"""

from __future__ import annotations

from moe_lab.compress.registry import Stage, check_composition, number, parse_stage


def parse_recipe(recipe: str) -> tuple[list[Stage], int]:
    """Stages and fine-tune epochs (0 if none) for a recipe string; ``ValueError`` naming the
    bad item otherwise. Every item, and the order of the items (see
    :func:`~moe_lab.compress.registry.check_composition`), is checked before anything runs."""
    if not isinstance(recipe, str) or not recipe.strip():
        raise ValueError("recipe must be a non-empty string such as 'prune-experts=0.25,int8'")
    stages, finetune = [], 0
    for item in (part.strip() for part in recipe.split(",")):
        if item.startswith("finetune="):
            if finetune:
                raise ValueError(f"recipe {recipe!r} fine-tunes twice")
            finetune = number(item, item.partition("=")[2], int, what="the fine-tune epochs", low=1)
        else:
            stages.append(parse_stage(item))
    if not stages:
        raise ValueError(f"recipe {recipe!r} has no compression stage")
    try:
        check_composition(stages)
    except ValueError as error:
        raise ValueError(f"recipe {recipe!r}: {error}") from None
    return stages, finetune


def normalize_recipe(recipe: str) -> str:
    """The canonical spelling of a recipe (``"int8, prune-experts=.25"`` ->
    ``"int8,prune-experts=0.25"``): two spellings of one recipe give the same string."""
    stages, finetune = parse_recipe(recipe)
    return ",".join([stage.recipe for stage in stages] + ([f"finetune={finetune}"] if finetune else []))
