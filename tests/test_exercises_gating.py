import torch

from moe_lab.exercises.gating import check_balance_loss
from moe_lab.layers.routing import load_balancing_loss


def right(probs, indices):
    num_experts = probs.shape[1]
    f = torch.bincount(indices.reshape(-1), minlength=num_experts).float() / indices.numel()
    return num_experts * (f * probs.mean(0)).sum()


def test_accepts_reference_and_own_solution(capsys):
    assert check_balance_loss(load_balancing_loss)
    assert check_balance_loss(right)
    assert "Correct" in capsys.readouterr().out


def test_hint_on_none(capsys):
    assert check_balance_loss(None) is False
    assert "Hint" in capsys.readouterr().out


def test_rejects_wrong_answers(capsys):
    def no_factor_e(probs, indices):
        return right(probs, indices) / probs.shape[1]

    def divide_by_n_not_nk(probs, indices):
        return right(probs, indices) * indices.shape[1]

    def gates_from_first_choice_only(probs, indices):
        return right(probs, indices[:, :1])

    def raises(probs, indices):
        raise RuntimeError("boom")

    for wrong in (no_factor_e, divide_by_n_not_nk, gates_from_first_choice_only, raises,
                  lambda p, i: torch.tensor(1.0)):
        assert check_balance_loss(wrong) is False
    assert check_balance_loss(42) is False
    out = capsys.readouterr().out
    assert "expected" in out and "raised" in out
