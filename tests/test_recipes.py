"""Recipe strings."""

import pytest

from moe_lab.compress import ExpertPrune, LowRank, MagnitudePrune, MergeExperts, Quantize
from moe_lab.compress.recipes import parse_recipe


def test_parse_recipe():
    stages, finetune = parse_recipe("prune-experts=0.25, lowrank=0.5,int8,finetune=2")
    assert [type(s) for s in stages] == [ExpertPrune, LowRank, Quantize]
    assert stages[0].fraction == 0.25 and stages[1].energy == 0.5 and stages[2].bits == 8 and finetune == 2
    stages, finetune = parse_recipe("merge=4,sparsity=0.5,lowrank=8,int4-g32")
    assert [type(s) for s in stages] == [MergeExperts, MagnitudePrune, LowRank, Quantize]
    assert stages[2].rank == 8 and stages[3].group_size == 32 and finetune == 0


@pytest.mark.parametrize("recipe, match", [
    ("", "non-empty"), ("int5", "bits must be one of"), ("quant8", "unknown recipe item 'quant8'"),
    ("prune-experts=x", "is not a float"),
    ("prune-experts=1.5", "in \\[0, 1\\)"), ("lowrank=0", "energy or rank must be in"),
    ("finetune=1", "no compression stage"),
    ("merge=2.5", "is not a int"), ("finetune=0,int8", "epochs must be in"),
])
def test_bad_recipes(recipe, match):
    with pytest.raises(ValueError, match=match):
        parse_recipe(recipe)
