"""The shared dispatch against a per-assignment loop: values, dtypes, capacity drops, empty experts and
gradients (the gate product is taken in place only when autograd does not need the expert output)."""

import pytest
import torch
import torch.nn as nn

from moe_lab.layers.dispatch import routed_mixture
from moe_lab.layers.routing import plan_dispatch, top_k_routing


def loop_reference(flat, plan, experts, out_features):
    """One expert call per kept assignment, in the plan's order."""
    out = torch.zeros(flat.shape[0], out_features, dtype=flat.dtype)
    start = 0
    for e, count in enumerate(plan.counts):
        for position in range(start, start + count):
            t = int(plan.token_index[position])
            out[t] = out[t] + plan.gate[position] * experts[e](flat[t:t + 1])[0]
        start += count
    return out


def make(num_experts, d, out_features, dtype, activation):
    torch.manual_seed(0)
    linears = [nn.Linear(d, out_features).to(dtype) for _ in range(num_experts)]
    return linears, [nn.Sequential(linear, activation) for linear in linears]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12),
                                              (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("capacity", [None, 3])
def test_matches_a_loop_over_assignments(dtype, tolerance, capacity):
    _, experts = make(5, 6, 7, dtype, nn.ReLU())
    flat = torch.randn(20, 6).to(dtype)
    logits = torch.randn(20, 5)
    logits[:, 4] = -1e9  # expert 4 receives no token
    routing = top_k_routing(logits, 2)
    plan = plan_dispatch(routing.indices, routing.gates.to(dtype), 5, capacity)
    assert plan.counts[4] == 0 and (capacity is None or plan.dropped > 0)
    with torch.no_grad():
        out = routed_mixture(flat, plan, experts, 7)
        expected = loop_reference(flat, plan, experts, 7)
    assert out.dtype == dtype and out.shape == (20, 7)
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    empty = plan_dispatch(routing.indices[:0], routing.gates[:0], 5)
    assert routed_mixture(flat[:0], empty, experts, 7).shape == (0, 7)


@pytest.mark.parametrize("activation", [nn.ReLU(), nn.Sigmoid(), nn.Identity()])
def test_gradients_survive_the_in_place_gate_product(activation):
    """ReLU and sigmoid save their output for the backward pass: an in-place product would corrupt it."""
    linears, experts = make(4, 6, 5, torch.float64, activation)
    flat = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    routing = top_k_routing(logits, 2)
    plan = plan_dispatch(routing.indices, routing.gates, 4)
    grads = []
    for fn in (routed_mixture, loop_reference):
        fn(flat, plan, experts, 5).sin().sum().backward(retain_graph=True)
        grads.append([flat.grad.clone(), logits.grad.clone()]
                     + [p.grad.clone() for p in linears[0].parameters()])
        flat.grad, logits.grad = None, None
        for linear in linears:
            linear.zero_grad()
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
