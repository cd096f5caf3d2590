import copy

import torch
import torch.nn as nn

from moe_lab.compress.prune import prune_experts
from moe_lab.exercises.pruning import check_remove_expert


def by_hand(layer, e):
    keep = [i for i in range(layer.num_experts) if i != e]
    new = copy.deepcopy(layer)
    new.experts = nn.ModuleList(new.experts[i] for i in keep)
    new.gating = nn.Linear(layer.gating.in_features, len(keep))
    with torch.no_grad():
        new.gating.weight.copy_(layer.gating.weight[keep])
        new.gating.bias.copy_(layer.gating.bias[keep])
    new.num_experts = len(keep)
    new.config = {**layer.config, "num_experts": len(keep)}
    return new


def test_accepts_reference_and_hand_written_solution(capsys):
    assert check_remove_expert(lambda layer, e: prune_experts(
        layer, [i for i in range(layer.num_experts) if i != e]))
    assert check_remove_expert(by_hand)
    assert "Correct" in capsys.readouterr().out


def test_hint_on_none(capsys):
    assert check_remove_expert(None) is False
    assert "Hint" in capsys.readouterr().out


def test_rejects_wrong_answers(capsys):
    def deck_identity(layer, e):  # the deck: the expert becomes nn.Identity, the router keeps its row
        new = copy.deepcopy(layer)
        new.experts[e] = nn.Identity()
        return new

    def router_row_left(layer, e):
        new = by_hand(layer, e)
        new.gating = copy.deepcopy(layer.gating)
        return new

    def wrong_row_removed(layer, e):
        new = by_hand(layer, e)
        with torch.no_grad():
            keep = list(range(layer.num_experts - 1))  # always drops the last row
            new.gating.weight.copy_(layer.gating.weight[keep])
            new.gating.bias.copy_(layer.gating.bias[keep])
        return new

    def in_place(layer, e):
        keep = [i for i in range(layer.num_experts) if i != e]
        with torch.no_grad():
            layer.gating.weight[e] = 0.0
        return prune_experts(layer, keep)

    def raises(layer, e):
        raise RuntimeError("boom")

    for wrong in (deck_identity, router_row_left, wrong_row_removed, in_place, raises, lambda l, e: 3):
        assert check_remove_expert(wrong) is False
    assert check_remove_expert("expert 2") is False
    out = capsys.readouterr().out
    assert "router" in out and "raised" in out and "changed the layer" in out


def test_checker_does_not_move_the_global_seed():
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    check_remove_expert(None)
    check_remove_expert(by_hand)
    assert torch.equal(torch.rand(1), before)
