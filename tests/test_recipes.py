"""Recipe strings: parsing, normalising, and refusing bad items and orders before anything runs."""

import itertools

import pytest
import torch

from moe_lab import TopKMoE
from moe_lab.compress import ExpertPrune, LowRank, MagnitudePrune, MergeExperts, Quantize, compress
from moe_lab.compress.recipes import normalize_recipe, parse_recipe
from moe_lab.compress.registry import check_composition


def test_parse_recipe():
    stages, finetune = parse_recipe("prune-experts=0.25, lowrank=0.5,int8,finetune=2")
    assert [type(s) for s in stages] == [ExpertPrune, LowRank, Quantize]
    assert stages[0].fraction == 0.25 and stages[1].energy == 0.5 and stages[2].bits == 8 and finetune == 2
    stages, finetune = parse_recipe("merge=4,sparsity=0.5,lowrank=8")
    assert [type(s) for s in stages] == [MergeExperts, MagnitudePrune, LowRank]
    assert stages[2].rank == 8 and finetune == 0
    assert parse_recipe("lowrank=8,int4-g32")[0][1].group_size == 32


@pytest.mark.parametrize("recipe, match", [
    ("", "non-empty"), ("int5", "bits must be one of"), ("quant8", "unknown recipe item 'quant8'"),
    ("prune-experts=x", "is not a float"), ("prune-experts=1.5", "in \\[0, 1\\)"),
    ("lowrank=0", "energy or rank must be in"), ("finetune=1", "no compression stage"),
    ("merge=2.5", "is not a int"), ("finetune=0,int8", "epochs must be in"),
    # the inputs of the issue: each refused with the item named, before any training
    ("int4-g0", "'int4-g0'.*group size"), ("merge=0", "'merge=0'"), ("merge=-3", "'merge=-3'"),
    ("sparsity=1.5", "'sparsity=1.5'"), ("sparsity=-0.2", "'sparsity=-0.2'"), ("sparsity=nan", "finite"),
    ("lowrank=inf", "finite"), ("lowrank=1.5", "whole number"), ("lowrank=1e400", "finite"),
    ("int8,merge=2", "'merge=2' cannot come after 'int8'.*float experts"),
    ("int8,int4", "already quantized"), ("sparsity=0.5,int8", "leaves them sparse"),
    ("lowrank=0.5,merge=2", "'merge=2' cannot come after 'lowrank=0.5'"),
    ("int8,finetune=1,finetune=2", "fine-tunes twice"),
])
def test_bad_recipes(recipe, match):
    with pytest.raises(ValueError, match=match):
        parse_recipe(recipe)


def test_two_spellings_normalise_to_one_recipe():
    assert normalize_recipe(" int8 , prune-experts=.25") == normalize_recipe("int8,prune-experts=0.250")
    assert normalize_recipe("lowrank=8.0,int4-g32") == "lowrank=8,int4-g32"
    spelled = "prune-experts=0.5:gate_weight,finetune=1"
    assert normalize_recipe(spelled) == spelled


STAGES = [ExpertPrune(0.25), MergeExperts(4), MagnitudePrune(0.5), LowRank(energy=0.9), Quantize(8),
          Quantize(4, group_size=4)]


@pytest.mark.parametrize("first, second", list(itertools.product(STAGES, STAGES)),
                         ids=lambda s: s.recipe)
def test_every_order_the_check_accepts_runs(first, second):
    """The static check agrees with the stages: what it accepts runs; what it refuses either
    fails at run time or would silently do nothing useful (quantizing twice, merging quantized
    or factorised experts by averaging their stored numbers)."""
    try:
        check_composition([first, second])
    except ValueError:
        return
    model = TopKMoE(8, 16, 32, 4, k=2)
    x = torch.randn(64, 16)
    result = compress(model, [first, second], x)
    assert result.model(x).shape == (64, 4)
