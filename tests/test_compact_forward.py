"""The compact linears' forward against ``F.linear`` with the weight each one stands for: shapes,
dtypes and gradients (their forwards are written for speed, so they must stay the same map)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab.compress.lowrank import low_rank_from_linear
from moe_lab.layers.compact import BaseDeltaLinear, SparseLinear

# largest error allowed, relative to the largest output: a few roundings of the dtype
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2 ** -5}


def base_delta(dtype):
    layer = BaseDeltaLinear(24, 10, rank=3)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer.to(dtype)


def low_rank(dtype):
    return low_rank_from_linear(nn.Linear(24, 10), 3).to(dtype)


def sparse(dtype):
    linear = nn.Linear(24, 10)
    with torch.no_grad():
        linear.weight[linear.weight.abs() < 0.1] = 0.0
    return SparseLinear.from_linear(linear).to(dtype)


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("make", [base_delta, low_rank, sparse])
def test_forward_is_the_linear_map_of_its_weight(make, dtype):
    layer = make(dtype)
    exact = copy.deepcopy(layer).double()  # the same stored numbers, in float64
    for shape in [(1, 24), (5, 24), (2, 3, 24), (0, 24)]:
        x = torch.randn(shape).to(dtype)
        out = layer(x)
        assert out.dtype == dtype and out.shape == (*shape[:-1], 10)
        reference = F.linear(x.double(), exact.weight, exact.bias)
        if out.numel():
            error = float((out.double() - reference).detach().abs().amax())
            assert error <= TOLERANCE[dtype] * max(1.0, float(reference.detach().abs().amax()))


def test_base_delta_gradients_match_the_plain_formula():
    layer = base_delta(torch.float64)
    x = torch.randn(2, 4, 24, dtype=torch.float64, requires_grad=True)
    layer(x).sin().sum().backward()
    ours = [x.grad] + [p.grad for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    delta = F.linear(F.linear(x, layer.delta_in), layer.delta_out)
    (F.linear(x, layer.base, layer.bias) + delta).sin().sum().backward()
    for a, b in zip(ours, [x.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
