"""Distillation loss against its formula, and a distilled student beating labels alone."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab import DenseMoE, TopKMoE, evaluate, seed_everything, train
from moe_lab.compress.distill import distill, distillation_loss
from moe_lab.data import make_clustered_task


def test_loss_matches_the_formula():
    s, t = torch.randn(6, 4), torch.randn(6, 4)
    y = torch.randint(0, 4, (6,))
    T, alpha = 3.0, 0.3
    p_t = F.softmax(t / T, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, dim=1))).sum(1).mean()
    expected = alpha * T * T * kl + (1 - alpha) * F.cross_entropy(s, y)
    assert distillation_loss(s, t, y, T, alpha).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(t, t, None, T, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_bad_arguments():
    s = torch.randn(2, 3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distillation_loss(s, s, None, 0.0, 1.0)
    with pytest.raises(ValueError, match="alpha must be in"):
        distillation_loss(s, s, None, 1.0, 1.5)
    with pytest.raises(ValueError, match="targets are needed"):
        distillation_loss(s, s, None, 1.0, 0.5)


def test_student_learns_from_the_teacher():
    task = make_clustered_task(1500, 500, seed=2)
    seed_everything(0)
    teacher = DenseMoE(4, 16, 32, 4)
    train(teacher, task.train, epochs=15, lr=3e-3, batch_size=64, progress=False)
    seed_everything(1)
    student = TopKMoE(4, 16, 8, 4, k=1, routing="softmax_topk", normalize=False)
    history = distill(teacher, student, task.train, temperature=2.0, alpha=0.7, epochs=10, lr=3e-3,
                      batch_size=64, progress=False)
    assert history[-1] < history[0] and all(math.isfinite(h) for h in history)
    assert evaluate(student, task.test)["accuracy"] > 0.6
    assert not teacher.training
    linear = nn.Linear(16, 4)
    distill(teacher, linear, task.train, epochs=1, progress=False)
