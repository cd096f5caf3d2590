"""Training helpers, seeding and profiles."""

import math

import pytest
import torch
import torch.nn as nn

from moe_lab import TopKMoE, evaluate, get_profile, seed_everything, train
from moe_lab.data import make_clustered_task
from moe_lab.training import as_loader, task_loss


def test_seed_everything_makes_runs_repeat():
    seed_everything(3)
    a = torch.randn(4)
    seed_everything(3)
    assert torch.equal(a, torch.randn(4))
    with pytest.raises(TypeError, match="seed must be an int"):
        seed_everything("3")


def test_training_a_topk_layer_beats_a_linear_model_on_clustered_data():
    task = make_clustered_task(1200, 400, seed=1)
    results = {}
    for name, model in [("moe", TopKMoE(4, 16, 16, 4, k=2, balance_loss_weight=0.01)),
                        ("linear", nn.Linear(16, 4))]:
        seed_everything(0)
        history = train(model, task.train, epochs=12, lr=3e-3, batch_size=64, progress=False)
        assert history[-1] < history[0]
        results[name] = evaluate(model, task.test)
    assert results["moe"]["n"] == 400
    assert results["moe"]["accuracy"] > results["linear"]["accuracy"] + 0.15


def test_language_model_loss_and_perplexity():
    logits = torch.zeros(2, 3, 5)
    targets = torch.zeros(2, 3, dtype=torch.long)
    assert task_loss(logits, targets, "language_model").item() == pytest.approx(math.log(5))
    model = nn.Sequential(nn.Embedding(5, 5))
    with torch.no_grad():
        model[0].weight.zero_()
    result = evaluate(model, (torch.zeros(4, 3, dtype=torch.long), targets.repeat(2, 1)),
                      task="language_model")
    assert result["perplexity"] == pytest.approx(5.0)
    assert result["n"] == 12


def test_max_steps_stops_early_and_bad_arguments():
    task = make_clustered_task(256, 16)
    model = nn.Linear(16, 4)
    assert len(train(model, task.train, epochs=5, max_steps=2, batch_size=64, progress=False)) == 1
    with pytest.raises(ValueError, match="task must be one of"):
        train(model, task.train, task="regression")
    with pytest.raises(ValueError, match="lr must be > 0"):
        train(model, task.train, lr=0.0)
    with pytest.raises(TypeError, match="DataLoader or a pair"):
        as_loader([1, 2, 3], 4, shuffle=False)
    with pytest.raises(ValueError, match="inputs but"):
        as_loader((torch.zeros(3, 2), torch.zeros(2)), 4, shuffle=False)


def test_profiles(monkeypatch):
    monkeypatch.setenv("MOE_LAB_PROFILE", "ci")
    assert get_profile().name == "ci"
    assert get_profile("default").synthetic_train > get_profile("ci").synthetic_train
    monkeypatch.setenv("MOE_LAB_PROFILE", "huge")
    with pytest.raises(ValueError, match="MOE_LAB_PROFILE"):
        get_profile()


def test_transform_and_schedule():
    task = make_clustered_task(256, 16)
    model = nn.Linear(16, 4)
    seen = []

    def transform(x):
        seen.append(x.shape[0])
        return x + 0.0

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, task.train, epochs=2, batch_size=64, progress=False, transform=transform, schedule=True,
          optimizer=optimizer)
    assert sum(seen) == 512
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine decayed to zero
