import copy

import pytest
import torch
import torch.nn as nn

from moe_lab import DenseMoE
from moe_lab.compress.prune import magnitude_prune
from moe_lab.sweeps import sweep


def nonzero_fraction(model):
    weights = [m.weight for m in model.experts]
    return sum(int((w != 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_each_setting_gets_a_fresh_model_and_a_record():
    base = DenseMoE(2, 8, 16, 4)
    records = sweep(lambda: copy.deepcopy(base), [0.0, 0.5, 0.75],
                    lambda m, s: magnitude_prune(m, s), nonzero_fraction)
    assert [r["setting"] for r in records] == [0.0, 0.5, 0.75]
    assert [r["metric"] for r in records] == pytest.approx([1.0, 0.5, 0.25])
    assert nonzero_fraction(base) == 1.0  # the trained model itself is untouched


def test_in_place_apply_and_dict_metrics():
    def apply(model, value):
        with torch.no_grad():
            model.weight.fill_(value)  # returns None: changed in place

    records = sweep(lambda: nn.Linear(2, 2), (1, 2),
                    apply, lambda m: {"total": float(m.weight.detach().sum()), "n": m.weight.numel()})
    assert records == [{"setting": 1, "total": 4.0, "n": 4}, {"setting": 2, "total": 8.0, "n": 4}]


@pytest.mark.parametrize("args, error, match", [
    ((None, [1], lambda m, s: m, lambda m: 1.0), TypeError, "make_model must be callable"),
    ((lambda: nn.Linear(1, 1), [1], 3, lambda m: 1.0), TypeError, "apply must be callable"),
    ((lambda: nn.Linear(1, 1), [], lambda m, s: m, lambda m: 1.0), ValueError, "settings must hold"),
    ((lambda: 3, [1], lambda m, s: m, lambda m: 1.0), TypeError, "make_model must return"),
    ((lambda: nn.Linear(1, 1), [1], lambda m, s: m, lambda m: "high"), TypeError, "evaluate must return"),
])
def test_bad_arguments_name_the_parameter(args, error, match):
    with pytest.raises(error, match=match):
        sweep(*args)
