import numpy as np
import pytest
import torch

from moe_lab import DenseMoE
from moe_lab.exercises.image_classifier import check_class_expert_share, class_expert_share
from moe_lab.viz import routing_matrix


def right(probs, labels, num_classes):
    return torch.stack([probs[labels == c].mean(0) for c in range(num_classes)])


def test_accepts_right_answers(capsys):
    assert check_class_expert_share(right)
    assert check_class_expert_share(lambda p, y, c: right(p, y, c).numpy())            # numpy is fine
    assert check_class_expert_share(lambda p, y, c: right(p, y, c).tolist())           # so is a list
    assert check_class_expert_share(class_expert_share)
    assert "Correct" in capsys.readouterr().out


def test_hint_on_none(capsys):
    assert check_class_expert_share(None) is False
    assert "Hint" in capsys.readouterr().out
    assert check_class_expert_share(lambda p, y, c: None) is False
    assert "returned None" in capsys.readouterr().out


def test_rejects_wrong_answers(capsys):
    def sums(p, y, c):
        return torch.stack([p[y == k].sum(0) for k in range(c)])

    def per_expert(p, y, c):                       # columns normalised: each expert's load over classes
        s = sums(p, y, c)
        return s / s.sum(0, keepdim=True)

    def top1(p, y, c):                             # hard counts instead of mean probabilities
        return right(torch.nn.functional.one_hot(p.argmax(1), p.shape[1]).float(), y, c)

    def transposed(p, y, c):
        return right(p, y, c).T

    def unshuffled(p, y, c):                       # ignores labels' order
        return right(p, torch.sort(y).values, c)

    def raises(p, y, c):
        raise IndexError("boom")

    for wrong in (sums, per_expert, top1, transposed, unshuffled, raises, lambda p, y, c: "share"):
        assert check_class_expert_share(wrong) is False, wrong
    assert check_class_expert_share(3) is False
    out = capsys.readouterr().out
    assert "columns sum to one" in out and "do not sum to one" in out and "raised" in out


def test_reference_matches_routing_matrix():
    torch.manual_seed(0)
    layer = DenseMoE(4, 16, 8, 3)
    x, y = torch.randn(90, 16), torch.arange(90) % 5
    with torch.no_grad():
        share = class_expert_share(layer.gate_probs(x), y, 5)
    assert torch.allclose(share, routing_matrix(layer, x, y), atol=1e-6)
    assert torch.allclose(share.sum(1), torch.ones(5), atol=1e-5)


@pytest.mark.parametrize("args", [
    (torch.rand(4), torch.zeros(4, dtype=torch.long), 1),            # probs not 2-D
    (torch.rand(4, 2), torch.zeros(3, dtype=torch.long), 1),         # wrong number of labels
    (torch.rand(4, 2), torch.tensor([0, 0, 1, 1]), 3),               # class 2 never occurs
    (torch.rand(4, 2), torch.tensor([0, 1, 2, 1]), 2),               # label out of range
    (torch.rand(4, 2), torch.tensor([0, 1, 0, 1]), True),            # bool is no class count
])
def test_reference_validates(args):
    with pytest.raises(ValueError):
        class_expert_share(*args)


def test_numpy_labels_accepted():
    probs = torch.softmax(torch.randn(6, 3), -1)
    assert class_expert_share(probs, np.array([0, 1, 0, 1, 2, 2]), 3).shape == (3, 3)
