import torch

from moe_lab.compress.lowrank import low_rank_from_linear
from moe_lab.exercises.low_rank import check_low_rank_factors, optimal_error


def right(weight, rank):
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


def via_moe_lab(weight, rank):
    low = low_rank_from_linear(_linear(weight), rank)
    return low.U.weight.detach(), low.V.weight.detach()


def _linear(weight):
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


def test_accepts_right_answers(capsys):
    assert check_low_rank_factors(right)
    assert check_low_rank_factors(via_moe_lab)

    def all_s_in_up(weight, rank):  # any split of S between the factors is optimal
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        return vh[:rank], u[:, :rank] * s[:rank]

    assert check_low_rank_factors(all_s_in_up)
    assert "Correct" in capsys.readouterr().out


def test_hint_on_none(capsys):
    assert check_low_rank_factors(None) is False
    assert "Hint" in capsys.readouterr().out
    assert check_low_rank_factors(lambda w, r: None) is False
    assert "returned None" in capsys.readouterr().out


def test_rejects_wrong_answers(capsys):
    def smallest_values(weight, rank):
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = s[-rank:].sqrt()
        return root[:, None] * vh[-rank:], u[:, -rank:] * root

    def forgot_s(weight, rank):
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        return vh[:rank], u[:, :rank]

    def s_twice(weight, rank):
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        return s[:rank, None] * vh[:rank], u[:, :rank] * s[:rank]

    def swapped(weight, rank):
        down, up = right(weight, rank)
        return up, down

    def random_init(weight, rank):  # the deck: fresh factors
        return torch.randn(rank, weight.shape[1]), torch.randn(weight.shape[0], rank)

    def raises(weight, rank):
        raise RuntimeError("boom")

    for wrong in (smallest_values, forgot_s, s_twice, swapped, random_init, raises,
                  lambda w, r: right(w, r)[0]):
        assert check_low_rank_factors(wrong) is False
    assert check_low_rank_factors(42) is False
    out = capsys.readouterr().out
    assert "Eckart-Young" in out and "Wrong shapes" in out and "raised" in out


def test_optimal_error_is_the_tail_of_the_spectrum():
    weight = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    assert abs(optimal_error(weight, 1) - 5 ** 0.5) < 1e-6
    assert optimal_error(weight, 3) == 0.0
