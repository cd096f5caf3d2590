"""Checkers of notebook 06: they accept right answers, reject wrong ones with feedback, hint on None."""

import pytest
import torch

from moe_lab import TopKMoE, flops_per_token
from moe_lab.exercises.dispatch import check_group_by_expert, check_topk_flops, topk_flops_per_token
from moe_lab.layers.routing import plan_dispatch


def group_argsort(indices, num_experts):
    n, k = indices.shape
    flat = indices.reshape(-1)  # row-major: token 0's choices first
    order = torch.argsort(flat, stable=True)
    tokens = torch.arange(n).repeat_interleave(k)
    return tokens[order], torch.bincount(flat, minlength=num_experts)


def group_python(indices, num_experts):  # a different but valid within-group order, plain lists
    groups = [[] for _ in range(num_experts)]
    for token, row in reversed(list(enumerate(indices.tolist()))):
        for expert in row:
            groups[expert].append(token)
    return [t for g in groups for t in g], [len(g) for g in groups]


def group_plan(indices, num_experts):
    plan = plan_dispatch(indices, torch.ones(indices.shape), num_experts)
    return plan.token_index, plan.counts


@pytest.mark.parametrize("answer", [group_argsort, group_python, group_plan])
def test_group_accepts_right_answers(answer, capsys):
    assert check_group_by_expert(answer) is True
    assert "Correct" in capsys.readouterr().out


def no_minlength(indices, num_experts):
    tokens, _ = group_argsort(indices, num_experts)
    return tokens, torch.bincount(indices.reshape(-1))


def expert_order_not_tokens(indices, num_experts):  # returns sorted experts instead of tokens
    flat = indices.reshape(-1)
    return flat.sort().values, torch.bincount(flat, minlength=num_experts)


def wrong_token_map(indices, num_experts):  # repeat instead of repeat_interleave for a row-major flatten
    n, k = indices.shape
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return torch.arange(n).repeat(k)[order], torch.bincount(flat, minlength=num_experts)


def first_choice_only(indices, num_experts):
    first = indices[:, 0]
    return torch.argsort(first, stable=True), torch.bincount(first, minlength=num_experts)


def raises(indices, num_experts):
    raise IndexError("oops")


@pytest.mark.parametrize("answer, message", [
    (no_minlength, "minlength"),
    (expert_order_not_tokens, "group should hold tokens"),
    (wrong_token_map, "group should hold tokens"),
    (first_choice_only, "counts should be"),
    (raises, "raised IndexError"),
    (lambda indices, num_experts: None, "Hint"),
    (lambda indices, num_experts: indices, "Return two things"),
    (lambda indices, num_experts: (indices.float().reshape(-1), [0]), "integer tensor"),
    (42, "Expected a function"),
])
def test_group_rejects_wrong_answers(answer, message, capsys):
    assert check_group_by_expert(answer) is False
    assert message in capsys.readouterr().out


def test_group_hint_on_none(capsys):
    assert check_group_by_expert(None) is False
    assert "Hint" in capsys.readouterr().out


SIZES = dict(num_experts=10, input_size=100, expert_size=50, output_size=10, k=2)


def test_formula_matches_flop_counter():
    for k in (1, 2, 5, 10):
        sizes = SIZES | {"k": k}
        model = TopKMoE(*[sizes[n] for n in ("num_experts", "input_size", "expert_size", "output_size")], k=k)
        assert flops_per_token(model, torch.randn(32, 100)) == topk_flops_per_token(**sizes)


def test_flops_accepts_right_answer(capsys):
    right = 2 * 100 * 10 + 2 * 2 * 100 * 50 + 2 * 50 * 10
    assert check_topk_flops(right, **SIZES) is True
    assert check_topk_flops(float(right) * 1.001, **SIZES) is True
    assert "Correct" in capsys.readouterr().out


@pytest.mark.parametrize("answer, message", [
    (23000 // 2, "multiply-adds"),
    (23000 - 2000, "router"),
    (23000 - 1000, "output layer"),
    (20000, "only the experts"),
    (2000 + 10 * 10000 + 1000, "all E experts"),
    (13000, "k experts, not one"),
    (5, "off by"),
    ("23000", "Expected a number"),
    (float("nan"), "Expected a number"),
    (True, "Expected a number"),
])
def test_flops_rejects_wrong_answers(answer, message, capsys):
    assert check_topk_flops(answer, **SIZES) is False
    assert message in capsys.readouterr().out


def test_flops_hint_on_none(capsys):
    assert check_topk_flops(None, **SIZES) is False
    assert "Hint" in capsys.readouterr().out


def test_formula_validates_arguments():
    with pytest.raises(ValueError, match="k"):
        topk_flops_per_token(4, 8, 8, 8, k=5)
    with pytest.raises(TypeError, match="input_size"):
        topk_flops_per_token(4, 8.0, 8, 8, k=1)
