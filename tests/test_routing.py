"""Routing functions against dense, obviously-correct computations."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lab.layers.routing import (
    expert_capacity,
    load_balancing_loss,
    noisy_logits,
    plan_dispatch,
    router_z_loss,
    top_k_routing,
)

shapes = st.tuples(st.integers(1, 40), st.integers(1, 9)).flatmap(
    lambda ne: st.tuples(st.just(ne[0]), st.just(ne[1]), st.integers(1, ne[1]), st.integers(0, 10_000)))


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_gates_sum_to_one_and_indices_are_the_top_k(case):
    n, E, k, seed = case
    logits = torch.randn(n, E, generator=torch.Generator().manual_seed(seed))
    r = top_k_routing(logits, k)
    torch.testing.assert_close(r.gates.sum(-1), torch.ones(n), rtol=0, atol=1e-6)
    assert r.indices.shape == (n, k)
    # the chosen experts are distinct and hold the k largest logits
    assert all(len(set(row.tolist())) == k for row in r.indices)
    chosen = logits.gather(1, r.indices)
    kth = chosen.min(dim=1, keepdim=True).values
    assert ((logits > kth).sum(1) <= k - 1).all()


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_deck_rule_equals_mixtral_rule(case):
    n, E, k, seed = case
    logits = torch.randn(n, E, generator=torch.Generator().manual_seed(seed)) * 3
    deck = top_k_routing(logits, k, routing="topk_softmax")
    mixtral = top_k_routing(logits, k, routing="softmax_topk", normalize=True)
    assert torch.equal(deck.indices, mixtral.indices)
    torch.testing.assert_close(deck.gates, mixtral.gates, rtol=1e-5, atol=1e-6)


def test_unnormalised_gates_are_the_softmax_probabilities():
    logits = torch.randn(50, 6)
    r = top_k_routing(logits, 2, routing="softmax_topk", normalize=False)
    torch.testing.assert_close(r.gates, logits.softmax(-1).gather(1, r.indices))
    assert (r.gates.sum(-1) < 1).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), "k must be >= 1"), (dict(k=5), "k must be <= num_experts"),
    (dict(k=2, routing="bogus"), "routing must be one of"),
    (dict(k=2, routing="topk_softmax", normalize=False), "normalize=False"),
])
def test_bad_routing_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        top_k_routing(torch.randn(3, 4), **kwargs)


def test_balance_loss_is_one_when_uniform_and_E_when_collapsed():
    E, n, k = 8, 64, 2
    uniform_probs = torch.full((n, E), 1 / E)
    spread = torch.arange(n * k).remainder(E).view(n, k)
    assert load_balancing_loss(uniform_probs, spread).item() == pytest.approx(1.0, abs=1e-6)
    collapsed_probs = torch.zeros(n, E)
    collapsed_probs[:, 3] = 1.0
    collapsed = torch.full((n, 1), 3)
    assert load_balancing_loss(collapsed_probs, collapsed).item() == pytest.approx(E)


def test_balance_loss_matches_a_literal_sum():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(30, 5, generator=g)
    r = top_k_routing(logits, 2)
    f = [sum(int((row == i).sum()) for row in r.indices) / (30 * 2) for i in range(5)]
    P = [r.probs[:, i].mean().item() for i in range(5)]
    expected = 5 * sum(fi * pi for fi, pi in zip(f, P))
    assert load_balancing_loss(r.probs, r.indices).item() == pytest.approx(expected, rel=1e-5)


def test_z_loss_is_mean_squared_logsumexp():
    logits = torch.randn(7, 4)
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 7
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-5)


def test_noisy_logits_add_scaled_gaussian_noise():
    clean = torch.zeros(1000, 4)
    out = noisy_logits(clean, torch.full((1000, 4), -30.0), generator=torch.Generator().manual_seed(0))
    assert out.abs().max() < 1e-9  # softplus(-30) ~ 0: no noise
    out = noisy_logits(clean, torch.zeros(1000, 4), generator=torch.Generator().manual_seed(0))
    assert out.std().item() == pytest.approx(math.log(2), rel=0.05)  # softplus(0) = log 2


def test_capacity_formula_and_validation():
    assert expert_capacity(100, 2, 8, 1.0) == 25
    assert expert_capacity(10, 1, 3, 1.0) == 4
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="capacity_factor"):
            expert_capacity(10, 1, 3, bad)


@settings(max_examples=60, deadline=None)
@given(shapes, st.one_of(st.none(), st.integers(0, 12)))
def test_plan_dispatch_bookkeeping(case, capacity):
    n, E, k, seed = case
    logits = torch.randn(n, E, generator=torch.Generator().manual_seed(seed))
    r = top_k_routing(logits, k)
    plan = plan_dispatch(r.indices, r.gates, E, capacity)
    expected_counts = torch.bincount(r.indices.reshape(-1), minlength=E)
    assert torch.equal(plan.tokens_per_expert, expected_counts)
    limit = expected_counts if capacity is None else expected_counts.clamp(max=capacity)
    assert plan.counts == limit.tolist()
    assert plan.dropped == int((expected_counts - limit).sum())
    assert plan.token_index.numel() == plan.gate.numel() == sum(plan.counts)
    # each kept assignment is a real (token, expert, gate) triple, grouped by expert
    start = 0
    for e, c in enumerate(plan.counts):
        for t, g in zip(plan.token_index[start:start + c].tolist(), plan.gate[start:start + c].tolist()):
            slot = (r.indices[t] == e).nonzero()
            assert slot.numel() == 1
            assert g == pytest.approx(r.gates[t, slot.item()].item())
        start += c


def test_capacity_serves_first_choices_first():
    # every token picks expert 0 first and expert 1 second; expert 1 is also some tokens' first choice
    indices = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]])
    gates = torch.full((4, 2), 0.5)
    plan = plan_dispatch(indices, gates, num_experts=2, capacity=2)
    expert0 = plan.token_index[:2].tolist()
    assert sorted(expert0) == [0, 2]  # the two tokens whose first choice is expert 0
    assert plan.dropped == 4
