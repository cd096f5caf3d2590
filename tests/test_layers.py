"""Mixture layers against the deck's slow layers and dense masked references."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lab import DenseMoE, LowRankLinear, SharedTrunkMoE, TopKMoE, collect_aux_loss
from moe_lab.layers.reference import DeckConditionalMoE, DeckMoE


def dense_topk_reference(layer: TopKMoE, x: torch.Tensor, dropped=()) -> torch.Tensor:
    """Every expert on every token, masked to the routed ones: slow and obviously correct."""
    r = layer.route(x)
    hidden = torch.stack([expert(x) for expert in layer.experts], dim=1)  # (n, E, h)
    if layer._act is not None:
        hidden = layer._act(hidden)
    weights = torch.zeros(x.shape[0], layer.num_experts)
    weights.scatter_(1, r.indices, r.gates)
    for token, expert in dropped:
        weights[token, expert] = 0.0
    return layer.output((weights.unsqueeze(-1) * hidden).sum(1))


def test_soft_moe_loads_deck_state_dict_and_matches():
    deck = DeckMoE(5, 12, 20, 7)
    ours = DenseMoE(5, 12, 20, 7)
    ours.load_state_dict(deck.state_dict())
    x = torch.randn(33, 12)
    torch.testing.assert_close(ours(x), deck(x), rtol=1e-5, atol=1e-6)


def test_soft_moe_accepts_leading_dimensions_and_gates_sum_to_one():
    layer = DenseMoE(4, 8, 16, 3, activation="gelu")
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(layer(x), layer(x.reshape(10, 8)).reshape(2, 5, 3))
    torch.testing.assert_close(layer.gate_probs(x).sum(-1), torch.ones(2, 5))


def test_topk_moe_matches_the_deck_loop():
    deck = DeckConditionalMoE(6, 12, 20, 7, k=2)
    ours = TopKMoE(6, 12, 20, 7, k=2)
    ours.load_state_dict(deck.state_dict())
    x = torch.randn(40, 12)
    torch.testing.assert_close(ours(x), deck(x), rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8).flatmap(lambda E: st.tuples(st.just(E), st.integers(1, E))),
       st.integers(1, 50), st.sampled_from([None, "relu", "gelu"]),
       st.sampled_from([("topk_softmax", True), ("softmax_topk", True), ("softmax_topk", False)]))
def test_topk_moe_equals_dense_masked_computation(ek, n, activation, routing):
    E, k = ek
    torch.manual_seed(n * 10 + E)
    layer = TopKMoE(E, 6, 10, 4, k=k, activation=activation, routing=routing[0], normalize=routing[1])
    x = torch.randn(n, 6)
    torch.testing.assert_close(layer(x), dense_topk_reference(layer, x), rtol=1e-5, atol=1e-5)
    assert int(layer.tokens_per_expert.sum()) == n * k
    assert layer.dropped_tokens == 0


def test_topk_moe_capacity_drops_tokens_and_output_matches_reference():
    torch.manual_seed(3)
    layer = TopKMoE(4, 6, 10, 4, k=2, capacity_factor=0.5)
    with torch.no_grad():
        layer.gating.bias.copy_(torch.tensor([3.0, 2.0, 0.0, -3.0]))  # skewed: experts 0, 1 overloaded
    x = torch.randn(64, 6)
    out = layer(x)
    assert layer.dropped_tokens > 0
    capacity = 16  # ceil(0.5 * 64 * 2 / 4)
    r = layer.route(x)
    # rebuild which assignments were dropped: rank-major priority, then token order
    seen, dropped = [0] * 4, []
    for slot in range(2):
        for token in range(64):
            e = int(r.indices[token, slot])
            seen[e] += 1
            if seen[e] > capacity:
                dropped.append((token, e))
    assert len(dropped) == layer.dropped_tokens
    torch.testing.assert_close(out, dense_topk_reference(layer, x, dropped), rtol=1e-5, atol=1e-5)


def test_topk_moe_leading_dims_and_empty_input():
    layer = TopKMoE(4, 8, 16, 3, k=2)
    x = torch.randn(3, 7, 8)
    torch.testing.assert_close(layer(x), layer(x.reshape(21, 8)).reshape(3, 7, 3))
    assert layer(torch.randn(0, 8)).shape == (0, 3)


def test_balance_loss_is_alpha_at_uniform_routing_and_z_loss_is_weighted():
    layer = TopKMoE(8, 6, 10, 4, k=2, balance_loss_weight=0.01, z_loss_weight=0.001)
    with torch.no_grad():
        layer.gating.weight.zero_()
        layer.gating.bias.zero_()
    layer(torch.randn(32, 6))
    assert layer.load_balancing_loss.item() == pytest.approx(0.01, rel=1e-6)
    assert layer.router_z_loss.item() == pytest.approx(0.001 * torch.log(torch.tensor(8.0)).item() ** 2,
                                                       rel=1e-5)
    assert layer.aux_loss.item() == pytest.approx(layer.load_balancing_loss.item() +
                                                  layer.router_z_loss.item())


def test_aux_loss_reaches_the_router_gradient():
    torch.manual_seed(0)
    layer = TopKMoE(4, 6, 10, 4, k=1, routing="softmax_topk", balance_loss_weight=1.0)
    layer(torch.randn(32, 6))
    collect_aux_loss(nn.Sequential(layer)).backward()
    assert layer.gating.weight.grad.abs().sum() > 0
    assert all(e.weight.grad is None for e in layer.experts)  # the balance loss never touches experts


def test_deck_rule_with_k1_gives_the_router_no_gradient():
    layer = TopKMoE(4, 6, 10, 4, k=1)
    layer(torch.randn(16, 6)).sum().backward()
    assert torch.count_nonzero(layer.gating.weight.grad) == 0
    switch = TopKMoE(4, 6, 10, 4, k=1, routing="softmax_topk", normalize=False)
    switch(torch.randn(16, 6)).sum().backward()
    assert torch.count_nonzero(switch.gating.weight.grad) > 0


def test_noisy_gating_only_in_training():
    layer = TopKMoE(4, 6, 10, 4, k=1, noisy_gating=True)
    x = torch.randn(200, 6)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    first = layer.route(x).indices
    second = layer.route(x).indices
    assert not torch.equal(first, second)
    assert torch.count_nonzero(layer.noise_gating.weight) == 0


def test_layer_deepcopies_after_a_training_forward():
    layer = TopKMoE(4, 6, 10, 4, k=2, balance_loss_weight=0.1)
    layer(torch.randn(8, 6))
    clone = copy.deepcopy(layer)
    x = torch.randn(5, 6)
    torch.testing.assert_close(clone(x), layer(x))


def test_shared_trunk_matches_the_deck_formula():
    layer = SharedTrunkMoE(3, 10, 8, 4, shared_size=6)
    x = torch.randn(11, 10)
    trunk = layer.shared_layer(x)
    outputs = torch.stack([e(trunk) for e in layer.expert_layers], dim=1)
    gates = torch.softmax(layer.gating(x), dim=-1)
    expected = layer.output((gates.unsqueeze(-1) * outputs).sum(1))
    torch.testing.assert_close(layer(x), expected)


def test_low_rank_linear_is_two_factors():
    layer = LowRankLinear(12, 9, rank=3)
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert torch.linalg.matrix_rank(layer.weight) <= 3


@pytest.mark.parametrize("make, match", [
    (lambda: TopKMoE(4, 8, 8, 8, k=5), "k must be <= num_experts"),
    (lambda: TopKMoE(4, 8, 8, 8, k=0), "k must be >= 1"),
    (lambda: TopKMoE(0, 8, 8, 8), "num_experts must be >= 1"),
    (lambda: TopKMoE(4, 8, 0, 8), "expert_size must be >= 1"),
    (lambda: TopKMoE(4, 8, 8, 8, capacity_factor=float("nan")), "capacity_factor must be finite"),
    (lambda: TopKMoE(4, 8, 8, 8, capacity_factor=-1.0), "capacity_factor must be > 0"),
    (lambda: TopKMoE(4, 8, 8, 8, balance_loss_weight=-0.1), "balance_loss_weight must be >= 0"),
    (lambda: TopKMoE(4, 8, 8, 8, routing="nope"), "routing must be one of"),
    (lambda: TopKMoE(4, 8, 8, 8, activation="tanh"), "activation must be None or one of"),
    (lambda: DenseMoE(4, 0, 8, 8), "input_size must be >= 1"),
    (lambda: SharedTrunkMoE(4, 8, 8, 8, shared_size=0), "shared_size must be >= 1"),
    (lambda: LowRankLinear(8, 4, rank=5), "rank must be <="),
    (lambda: LowRankLinear(8, 4, rank=0), "rank must be >= 1"),
])
def test_bad_constructor_arguments_name_the_parameter(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_types_and_inputs():
    with pytest.raises(TypeError, match="k must be an int"):
        TopKMoE(4, 8, 8, 8, k=2.0)
    for layer in (DenseMoE(4, 8, 8, 2), TopKMoE(4, 8, 8, 2), SharedTrunkMoE(4, 8, 8, 2, 4),
                  LowRankLinear(8, 2, 1)):
        with pytest.raises(ValueError, match="x must have last dimension 8"):
            layer(torch.randn(3, 7))
        with pytest.raises(TypeError, match="x must be a floating-point tensor"):
            layer(torch.ones(3, 8, dtype=torch.long))


def test_experts_can_be_any_module_of_the_right_shape():
    torch.manual_seed(2)
    topk, soft = TopKMoE(4, 6, 10, 4, k=2), DenseMoE(4, 6, 10, 4)
    for layer in (topk, soft):
        layer.experts[1] = LowRankLinear(6, 10, rank=2)
    x = torch.randn(30, 6)
    torch.testing.assert_close(topk(x), dense_topk_reference(topk, x), rtol=1e-5, atol=1e-5)
    gates = soft.gate_probs(x)
    expected = soft.output(sum(gates[:, e:e + 1] * soft.experts[e](x) for e in range(4)))
    torch.testing.assert_close(soft(x), expected, rtol=1e-5, atol=1e-5)
