"""Bytes, parameter counts, active work per token and latency."""

import pytest
import torch
import torch.nn as nn

from moe_lab import (
    DenseMoE,
    ImageClassifierMoE,
    LanguageModelMoE,
    TopKMoE,
    active_params_per_token,
    flops_per_token,
    latency,
    model_bytes,
    param_count,
)


def test_model_bytes_is_about_four_bytes_per_parameter():
    layer = DenseMoE(8, 64, 128, 32)
    size = model_bytes(layer)
    assert 4 * param_count(layer) < size < 4 * param_count(layer) + 8_000  # header + JSON config


def test_zeroed_weights_cost_the_same_bytes_but_fewer_nonzeros():
    layer = DenseMoE(4, 32, 64, 16)
    before = model_bytes(layer)
    with torch.no_grad():
        for expert in layer.experts:
            expert.weight.mul_(expert.weight.abs() > 0.1)
    assert model_bytes(layer) == before
    assert param_count(layer, nonzero=True) < param_count(layer)


def test_tied_weights_are_stored_and_counted_once():
    tied = LanguageModelMoE(500, num_experts=2, expert_size=32, embedding_dim=16, num_layers=1,
                            num_heads=2, tie_weights=True)
    untied = LanguageModelMoE(500, num_experts=2, expert_size=32, embedding_dim=16, num_layers=1,
                              num_heads=2, tie_weights=False)
    assert param_count(untied) - param_count(tied) == 500 * 16
    assert model_bytes(untied) - model_bytes(tied) == pytest.approx(500 * 16 * 4, abs=600)


def test_active_params_of_topk_layer():
    E, d, h, o, k = 8, 16, 32, 8, 2
    layer = TopKMoE(E, d, h, o, k=k)
    expected = (d * E + E) + k * (d * h + h) + (h * o + o)
    assert active_params_per_token(layer) == expected
    assert active_params_per_token(DenseMoE(E, d, h, o)) == param_count(DenseMoE(E, d, h, o))


def test_active_params_of_language_model_count_one_embedding_row_and_the_tied_head():
    model = LanguageModelMoE(300, num_experts=4, expert_size=32, embedding_dim=16, num_layers=1,
                             num_heads=2, k=1, tie_weights=False)
    moe = model.blocks[0].moe
    inactive = 3 * sum(p.numel() for p in moe.experts[0].parameters())
    embedding_rows = (300 - 1) * 16 + (model.config["context_size"] - 1) * 16
    assert active_params_per_token(model) == param_count(model) - inactive - embedding_rows
    tied = LanguageModelMoE(300, num_experts=4, expert_size=32, embedding_dim=16, num_layers=1,
                            num_heads=2, k=1, tie_weights=True)
    assert active_params_per_token(tied) == active_params_per_token(model) - 16  # head reads it all


@pytest.mark.parametrize("k", [1, 2, 3])
def test_measured_flops_of_topk_count_only_routed_experts(k):
    E, d, h, o, n = 6, 16, 32, 8, 50
    layer = TopKMoE(E, d, h, o, k=k)
    assert flops_per_token(layer, torch.randn(n, d)) == 2 * (d * E + k * d * h + h * o)


def test_measured_flops_of_soft_moe_count_every_expert():
    E, d, h, o, n = 6, 16, 32, 8, 50
    # all expert matmuls, plus the (1 x E) @ (E x h) mixing product per token
    expected = 2 * (d * E + E * d * h + h * o) + 2 * E * h
    assert flops_per_token(DenseMoE(E, d, h, o), torch.randn(n, d)) == expected


def test_flops_per_token_counts_tokens_images_and_override():
    model = ImageClassifierMoE(channels=(8,), expert_size=16, hidden_size=16)
    one = flops_per_token(model, torch.randn(1, 3, 32, 32))
    assert flops_per_token(model, torch.randn(3, 3, 32, 32)) == pytest.approx(one)
    lm = LanguageModelMoE(100, num_experts=2, expert_size=16, embedding_dim=16, num_layers=1, num_heads=2)
    tokens = torch.randint(0, 100, (2, 8))
    assert flops_per_token(lm, tokens, tokens=8) == pytest.approx(2 * flops_per_token(lm, tokens))
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        flops_per_token(lm, tokens, tokens=0)


def test_latency_is_a_positive_median_and_validates():
    layer = nn.Linear(8, 8)
    assert latency(layer, torch.randn(4, 8), warmup=1, repeats=3) > 0
    with pytest.raises(ValueError, match="repeats"):
        latency(layer, torch.randn(4, 8), repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        latency(layer, torch.randn(4, 8), warmup=-1)


def test_active_params_count_quantized_weights_at_their_logical_size():
    from moe_lab.compress import quantize_experts

    layer = TopKMoE(8, 16, 32, 8, k=2)
    before = active_params_per_token(layer)
    quantize_experts(layer, 4)
    assert active_params_per_token(layer) == before
