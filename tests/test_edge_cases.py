"""Edge cases that used to fail or give nonsense: no tokens, no data, zero budgets, zero matrices."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from moe_lab import DenseMoE, SharedTrunkMoE, SlotSoftMoE, SwiGLUMoE, TopKMoE, evaluate, train
from moe_lab.compress import rank_for_energy
from moe_lab.evaluation import report
from moe_lab.layers.routing import expert_capacity, load_balancing_loss, router_z_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("make, shape, out", [
    (lambda: DenseMoE(3, 8, 16, 4, activation="relu"), (0, 8), (0, 4)),
    (lambda: DenseMoE(3, 8, 16, 4), (2, 0, 8), (2, 0, 4)),
    (lambda: SharedTrunkMoE(3, 8, 16, 4, shared_size=6), (0, 8), (0, 4)),
    (lambda: SlotSoftMoE(4, 2, 8, 16, 4), (2, 0, 8), (2, 0, 4)),
    (lambda: SlotSoftMoE(4, 2, 8, 16, 4), (0, 3, 8), (0, 3, 4)),
    (lambda: TopKMoE(4, 8, 16, 4, k=2, capacity_factor=1.0), (0, 8), (0, 4)),
    (lambda: SwiGLUMoE(4, 8, 16, k=2), (0, 8), (0, 8)),
])
def test_no_tokens_give_an_empty_output_of_the_right_shape(make, shape, out, dtype):
    layer = make().to(dtype)
    y = layer(torch.zeros(shape, dtype=dtype))
    assert y.shape == out and y.dtype == dtype


def test_balance_and_z_losses_on_no_tokens_are_zero_not_nan():
    layer = TopKMoE(4, 8, 16, 4, k=2, balance_loss_weight=0.01, z_loss_weight=0.1).train()
    x = torch.zeros(0, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 4) and layer.aux_loss.item() == 0.0
    (y.sum() + layer.aux_loss).backward()  # the graph still backpropagates
    assert torch.isfinite(layer.gating.weight.grad).all()
    assert load_balancing_loss(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long)).item() == 0.0
    assert router_z_loss(torch.zeros(0, 4)).item() == 0.0


@pytest.mark.parametrize("args, match", [
    ((-5, 2, 4, 1.0), "num_tokens"), ((5.5, 2, 4, 1.0), "num_tokens"), ((5, 0, 4, 1.0), "k"),
    ((5, 2, 0, 1.0), "num_experts"), ((5, 2, 4, 0.0), "capacity_factor"),
])
def test_expert_capacity_rejects_bad_arguments(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        expert_capacity(*args)


def test_expert_capacity_counts():
    assert expert_capacity(0, 2, 4, 1.0) == 0
    assert expert_capacity(10, 2, 4, 1.0) == 5 and expert_capacity(10, 2, 4, 1.25) == 7


def test_rank_for_energy_edge_cases():
    assert rank_for_energy(torch.zeros(8), 0.9) == 1  # a zero matrix: the smallest valid rank
    s = torch.tensor([4.0, 2.0, 1.0, 1e-30])
    assert rank_for_energy(s, 1.0) <= 4
    assert rank_for_energy(s, 16 / 22) == 1 and rank_for_energy(s, 0.9) == 2
    with pytest.raises(ValueError, match="non-empty"):
        rank_for_energy(torch.zeros(0), 0.5)
    with pytest.raises(ValueError, match="finite"):
        rank_for_energy(torch.tensor([1.0, float("nan")]), 0.5)


def test_empty_data_raises_instead_of_scoring():
    model = TopKMoE(4, 8, 16, 3)
    empty = (torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    for call in (lambda: evaluate(model, empty), lambda: train(model, empty, progress=False),
                 lambda: report({"m": model}, empty),
                 lambda: evaluate(model, DataLoader(TensorDataset(*empty), batch_size=4))):
        with pytest.raises(ValueError, match="empty"):
            call()


def test_max_steps_zero_trains_nothing():
    model = TopKMoE(4, 8, 16, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = (torch.randn(32, 8), torch.randint(0, 3, (32,)))
    assert train(model, data, max_steps=0, progress=False) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(train(model, data, max_steps=1, batch_size=8, progress=False)) == 1
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_steps"):
            train(model, data, max_steps=bad, progress=False)
