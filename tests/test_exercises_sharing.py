import math

import torch

from moe_lab.exercises.sharing import check_merged_router


def right(weight, bias, usage, members):
    w = usage[members] / usage[members].sum()
    return (w[:, None] * weight[members]).sum(0), (w * bias[members]).sum() + math.log(len(members))


def test_accepts_right_answer(capsys):
    assert check_merged_router(right)
    assert "Correct" in capsys.readouterr().out


def test_hint_on_none(capsys):
    assert check_merged_router(None) is False
    assert "Hint" in capsys.readouterr().out


def test_rejects_wrong_answers(capsys):
    def plain_mean(weight, bias, usage, members):
        return weight[members].mean(0), bias[members].mean() + math.log(len(members))

    def no_log_bias(weight, bias, usage, members):
        row, b = right(weight, bias, usage, members)
        return row, b - math.log(len(members))

    def usage_not_renormalised(weight, bias, usage, members):
        w = usage[members]
        return (w[:, None] * weight[members]).sum(0), (w * bias[members]).sum() + math.log(len(members))

    def first_member_only(weight, bias, usage, members):
        return weight[members[0]], bias[members[0]] + math.log(len(members))

    def wrong_shape(weight, bias, usage, members):
        row, b = right(weight, bias, usage, members)
        return row[:-1], b

    def raises(weight, bias, usage, members):
        raise IndexError("boom")

    for wrong in (plain_mean, no_log_bias, usage_not_renormalised, first_member_only, wrong_shape, raises):
        assert check_merged_router(wrong) is False, wrong
    assert check_merged_router(3) is False
    out = capsys.readouterr().out
    assert "differs" in out and "bias" in out and "raised" in out and "shape" in out


def test_checker_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    check_merged_router(right)
    assert torch.equal(before, torch.get_rng_state())


def test_hint_for_the_unedited_starter(capsys):
    def starter(weight, bias, usage, members):
        return None

    assert check_merged_router(starter) is False
    assert "Hint" in capsys.readouterr().out
