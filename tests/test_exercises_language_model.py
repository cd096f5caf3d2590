import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab.exercises.language_model import check_next_token_loss, reference_loss
from moe_lab.training import task_loss


def test_accepts_right_answers(capsys):
    assert check_next_token_loss(lambda lg, t: F.cross_entropy(lg.reshape(-1, lg.shape[-1]), t.reshape(-1)))
    assert check_next_token_loss(lambda lg, t: F.cross_entropy(lg.transpose(1, 2), t))  # classes on dim 1
    assert check_next_token_loss(lambda lg, t: task_loss(lg, t, "language_model").item())
    assert check_next_token_loss(lambda lg, t: -lg.log_softmax(-1).gather(-1, t[..., None]).mean())
    assert "Correct" in capsys.readouterr().out


def test_hint_on_none(capsys):
    assert check_next_token_loss(None) is False
    assert "Hint" in capsys.readouterr().out
    assert check_next_token_loss(lambda lg, t: None) is False
    assert "returned None" in capsys.readouterr().out


def test_rejects_wrong_answers(capsys):
    wrong = [
        lambda lg, t: nn.CrossEntropyLoss()(lg, t),                      # the deck: no reshape
        lambda lg, t: F.cross_entropy(lg.reshape(-1, lg.shape[-1]), t.reshape(-1), reduction="sum"),
        lambda lg, t: F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), t[:, 1:].reshape(-1)),  # shift x2
        lambda lg, t: F.nll_loss(lg.softmax(-1).reshape(-1, lg.shape[-1]), t.reshape(-1)),  # no log
        lambda lg, t: F.cross_entropy(lg.reshape(-1, lg.shape[-1]), t.reshape(-1), reduction="none"),
        lambda lg, t: "1.0",
        lambda lg, t: float("nan"),
    ]
    for fn in wrong:
        assert check_next_token_loss(fn) is False
    assert check_next_token_loss(3) is False
    out = capsys.readouterr().out
    assert "raised" in out and "expected a loss" in out and "sum over tokens" in out


def test_unreshaped_loss_is_silently_wrong_when_time_equals_vocab():
    logits, targets = torch.randn(4, 6, 6), torch.randint(6, (4, 6))
    assert not torch.isclose(nn.CrossEntropyLoss()(logits, targets), reference_loss(logits, targets))
