import pytest
import torch
import torch.nn as nn

from moe_lab import TopKMoE
from moe_lab.data.synthetic import make_clustered_task
from moe_lab.diagnostics import measure_shares, train_recording_shares


def test_records_one_row_per_epoch_plus_init():
    task = make_clustered_task(200, 100, seed=0)
    layer = TopKMoE(4, 16, 8, 4, k=2)
    history = train_recording_shares(layer, task.train, epochs=3, lr=1e-2, batch_size=64,
                                     test_data=task.test)
    assert history.shares.shape == (4, 4)
    torch.testing.assert_close(history.shares.sum(1), torch.ones(4, dtype=torch.float64))
    assert len(history.entropy) == 4 and len(history.losses) == 3
    assert all(0.0 <= e <= 1.0 + 1e-9 for e in history.entropy)
    assert 0.0 <= history.accuracy <= 1.0


def test_measure_shares_counts_routing_in_eval_mode_and_restores_mode():
    layer = TopKMoE(4, 3, 5, 2, k=1)
    with torch.no_grad():
        layer.gating.weight.zero_()
        layer.gating.bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0]))
    layer.train()
    share = measure_shares(nn.Sequential(layer), torch.randn(10, 3))
    torch.testing.assert_close(share, torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    assert layer.training


def test_rejects_models_without_one_topk_layer_and_bad_args():
    task = make_clustered_task(50, 10, seed=0)
    with pytest.raises(ValueError, match="exactly one mixture layer"):
        train_recording_shares(torch.nn.Linear(16, 4), task.train, epochs=1, lr=1e-3, batch_size=8)
    with pytest.raises(ValueError, match="epochs"):
        train_recording_shares(TopKMoE(2, 16, 4, 4, k=1), task.train, epochs=0, lr=1e-3, batch_size=8)
