"""Activation-aware low rank (SVD-LLM whitening) against the Eckart-Young optimum of the outputs, plain
SVD at equal bytes, singular covariances, the routed inputs of each expert, and the recipe."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab import LowRankLinear, SwiGLUMoE, TopKMoE, model_bytes
from moe_lab.compress import LowRank, Quantize, activation_low_rank, low_rank_from_linear, routed_tokens
from moe_lab.compress.calibration import hessian_from_inputs
from moe_lab.compress.recipes import normalize_recipe, parse_recipe


def correlated(n: int, width: int, rank: int = 6, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, width, generator=g, dtype=torch.float64)
    x = torch.randn(n, rank, generator=g, dtype=torch.float64) @ basis
    return (x + 0.05 * torch.randn(n, width, generator=g, dtype=torch.float64)).to(dtype)


def output_error(linear: nn.Module, low: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((low(x) - linear(x)).double().norm())


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_output_error_is_the_eckart_young_optimum_of_the_outputs(rank):
    torch.manual_seed(0)
    linear = nn.Linear(20, 14, dtype=torch.float64)
    x = correlated(300, 20, dtype=torch.float64)
    low = activation_low_rank(linear, hessian_from_inputs(x).double(), rank, damp=0.0)
    # min over rank-r W_r of ||X W^T - X W_r^T||_F: any rank-r Y_r = X W_r^T is reachable (X has full
    # column rank), so the optimum is the tail of the singular values of Y = X W^T itself
    y = x @ linear.weight.detach().T
    optimum = torch.linalg.svdvals(y)[rank:].square().sum().sqrt()
    assert output_error(linear, low, x) == pytest.approx(float(optimum), rel=1e-6)
    assert low.rank == rank and isinstance(low, LowRankLinear) and low.U.weight.dtype == torch.float64
    torch.testing.assert_close(low.V.bias, linear.bias)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2),
                                              (torch.float16, 5e-3)])
def test_lower_output_error_than_plain_svd_at_equal_bytes(dtype, tolerance):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(dtype)
    x = correlated(2000, 64, dtype=dtype)
    held_out = correlated(2500, 64, dtype=dtype)[2000:]  # the same subspace, tokens not calibrated on
    for rank in (4, 8):
        ours = activation_low_rank(linear, hessian_from_inputs(x), rank)
        plain = low_rank_from_linear(linear, rank).to(dtype)
        assert ours.U.weight.dtype == dtype and model_bytes(ours) == model_bytes(plain)
        assert output_error(linear, ours, x) < 0.5 * output_error(linear, plain, x)
        assert output_error(linear, ours, held_out) < 0.5 * output_error(linear, plain, held_out)
    full = activation_low_rank(linear, hessian_from_inputs(x), 48)  # full rank: the layer itself
    reference = linear(held_out).float()
    assert (full(held_out).float() - reference).norm() / reference.norm() < tolerance


def test_singular_covariance_needs_damping():
    torch.manual_seed(0)
    linear = nn.Linear(32, 40)
    for tokens in (10, 31):  # fewer tokens than inputs: X^T X is singular
        few = torch.randn(tokens, 32)
        with pytest.raises(ValueError, match="increase damp"):
            activation_low_rank(linear, hessian_from_inputs(few), 4, damp=0.0)
    few = torch.randn(10, 32)
    low = activation_low_rank(linear, hessian_from_inputs(few), 10)  # default damping: ~fits 10 tokens
    assert output_error(linear, low, few) < 0.05 * output_error(linear, low_rank_from_linear(linear, 10), few)


def test_dead_inputs_need_no_damping_and_cost_nothing():
    torch.manual_seed(0)
    linear = nn.Linear(24, 16, dtype=torch.float64)
    x = correlated(300, 24, dtype=torch.float64)
    x[:, 5] = 0  # an input that is always zero: its column of W does not matter
    low = activation_low_rank(linear, hessian_from_inputs(x).double(), 4, damp=0.0)
    optimum = torch.linalg.svdvals(x @ linear.weight.detach().T)[4:].square().sum().sqrt()
    assert output_error(linear, low, x) == pytest.approx(float(optimum), rel=1e-6)


def test_damping_tends_to_the_plain_svd():
    torch.manual_seed(0)
    linear, x = nn.Linear(24, 16), correlated(200, 24)
    heavy = activation_low_rank(linear, hessian_from_inputs(x), 5, damp=1e6)
    torch.testing.assert_close(heavy.weight, low_rank_from_linear(linear, 5).weight, rtol=1e-3, atol=1e-4)


def test_energy_is_the_share_of_output_energy_kept():
    torch.manual_seed(0)
    linear, x = nn.Linear(24, 16, dtype=torch.float64), correlated(400, 24, dtype=torch.float64)
    low = activation_low_rank(linear, hessian_from_inputs(x).double(), energy=0.9, damp=0.0)
    y = x @ linear.weight.detach().T
    s = torch.linalg.svdvals(y).square()
    kept = torch.cumsum(s, 0) / s.sum()
    assert low.rank == int((kept < 0.9).sum()) + 1


def test_stage_fits_each_expert_to_its_routed_inputs():
    torch.manual_seed(0)
    layer = SwiGLUMoE(4, 32, 24, k=2)
    x = correlated(800, 32)
    stage = LowRank(rank=4, method="activation")
    ours = stage.apply(copy.deepcopy(layer), x)
    for tokens in routed_tokens(layer, x):
        expert, compact = layer.experts[tokens.expert], ours.experts[tokens.expert]
        gate_up = activation_low_rank(expert.gate_up_proj, hessian_from_inputs(tokens.inputs), 4)
        torch.testing.assert_close(compact.gate_up_proj.weight, gate_up.weight)
        with torch.no_grad():
            gate, up = gate_up(tokens.inputs).chunk(2, dim=-1)
        down = activation_low_rank(expert.down_proj, hessian_from_inputs(F.silu(gate) * up), 4)
        torch.testing.assert_close(compact.down_proj.weight, down.weight)
    assert [r["method"] for r in stage.last_report] == ["activation"] * 4
    assert type(ours.gate) is nn.Linear
    plain = LowRank(rank=4).apply(copy.deepcopy(layer), x)
    assert model_bytes(plain) == model_bytes(ours)
    with torch.no_grad():
        reference = layer(x)
        assert (ours(x) - reference).norm() < 0.7 * (plain(x) - reference).norm()


def test_stage_keeps_the_break_even_rule_and_refuses_quantized_experts():
    torch.manual_seed(0)
    layer, x = TopKMoE(3, 16, 16, 8, k=2), correlated(300, 16)
    kept = LowRank(energy=0.999999, method="activation").apply(copy.deepcopy(layer), x)
    assert all(type(e) is nn.Linear for e in kept.experts)  # would need a rank above break-even
    with pytest.raises(ValueError, match="does not shrink"):
        LowRank(rank=8, method="activation").apply(copy.deepcopy(layer), x)
    with pytest.raises(ValueError, match="already quantized"):
        LowRank(rank=2, method="activation").apply(Quantize(8).apply(copy.deepcopy(layer), x), x)


def test_recipes_and_bad_arguments():
    (stage,), _ = parse_recipe("lowrank-act=0.5")
    assert stage.method == "activation" and stage.energy == 0.5 and stage.recipe == "lowrank-act=0.5"
    assert normalize_recipe("lowrank-act=8, lowrank=.5") == "lowrank-act=8,lowrank=0.5"
    assert "activation-aware" in stage.name
    with pytest.raises(ValueError, match="method must be one of"):
        LowRank(rank=2, method="asvd")
    with pytest.raises(ValueError, match="coverage must be one of"):
        LowRank(rank=2, method="activation", coverage="some")
    with pytest.raises(ValueError, match="hessian must be a \\(8, 8\\)"):
        activation_low_rank(nn.Linear(8, 4), torch.eye(7), 2)
    with pytest.raises(TypeError, match="nn.Linear"):
        activation_low_rank(LowRankLinear(8, 4, 2), torch.eye(8), 2)
