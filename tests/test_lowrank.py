"""Truncated-SVD low-rank experts against the exact SVD."""

import pytest
import torch
import torch.nn as nn

from moe_lab.compress.lowrank import low_rank_from_linear, rank_for_energy


def test_full_rank_reproduces_the_layer():
    linear = nn.Linear(24, 16)
    low = low_rank_from_linear(linear, rank=16)
    x = torch.randn(9, 24)
    torch.testing.assert_close(low(x), linear(x), rtol=1e-5, atol=1e-5)


def test_truncation_error_is_the_eckart_young_optimum():
    linear = nn.Linear(30, 20)
    s = torch.linalg.svdvals(linear.weight.detach().double())
    for rank in (1, 5, 12):
        low = low_rank_from_linear(linear, rank=rank)
        error = torch.linalg.matrix_norm((low.weight - linear.weight).double())
        assert error.item() == pytest.approx(s[rank:].square().sum().sqrt().item(), rel=1e-4)


def test_rank_for_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 0.7) == 2
    assert rank_for_energy(s, 1.0) == 3
    low = low_rank_from_linear(nn.Linear(8, 8), energy=1.0)
    assert low.rank == 8


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rank=0), ValueError, "rank must be >= 1"), (dict(rank=17), ValueError, "rank must be <="),
    (dict(), ValueError, "exactly one"), (dict(rank=2, energy=0.5), ValueError, "exactly one"),
    (dict(energy=1.5), ValueError, "energy must be <= 1"),
    (dict(energy=0.0), ValueError, "energy must be > 0"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        low_rank_from_linear(nn.Linear(24, 16), **kwargs)


def test_low_rank_experts_replaces_experts_only():
    from moe_lab import DenseMoE, LowRankLinear
    from moe_lab.compress import low_rank_experts

    layer = DenseMoE(3, 32, 32, 8)
    x = torch.randn(6, 32)
    half = low_rank_experts(DenseMoE(3, 32, 32, 8), energy=0.5)
    assert all(isinstance(e, LowRankLinear) and e.rank < 16 for e in half.experts)
    reference = layer(x)
    low_rank_experts(layer, 15)
    assert all(e.rank == 15 for e in layer.experts) and type(layer.output) is nn.Linear
    assert layer(x).shape == reference.shape
    with pytest.raises(ValueError, match="does not shrink"):
        low_rank_experts(DenseMoE(3, 32, 32, 8), 16)
    with pytest.raises(ValueError, match="no MoE layer"):
        low_rank_experts(nn.Linear(3, 3), 1)


def test_low_rank_of_a_quantized_expert_uses_its_dequantized_weight():
    from moe_lab import TopKMoE, model_bytes
    from moe_lab.compress import QuantizedLinear, low_rank_experts, quantize_experts

    layer = quantize_experts(TopKMoE(4, 64, 64, 8), 8)
    q = layer.experts[0]
    low = low_rank_from_linear(q, rank=64)
    x = torch.randn(5, 64)
    torch.testing.assert_close(low(x), q(x), rtol=1e-4, atol=1e-4)
    before = model_bytes(layer)
    low_rank_experts(layer, 4)  # float factors: rank 8 would already cost as much as the int8 matrix
    assert not isinstance(layer.experts[0], QuantizedLinear)
    assert model_bytes(layer) < before


def test_energy_that_would_grow_a_matrix_leaves_it_dense():
    from moe_lab import DenseMoE
    from moe_lab.compress import low_rank_experts

    layer = low_rank_experts(DenseMoE(2, 16, 16, 4), energy=1.0)  # full rank 16 > break-even 8
    assert all(type(e) is nn.Linear for e in layer.experts)
