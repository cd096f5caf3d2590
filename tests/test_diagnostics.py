"""Utilisation statistics."""

import math

import pytest
import torch

from moe_lab.diagnostics import expert_share, utilisation_entropy


def test_share_and_entropy_of_even_and_collapsed_routing():
    assert expert_share(torch.tensor([2, 2, 4])).tolist() == [0.25, 0.25, 0.5]
    assert utilisation_entropy(torch.tensor([5, 5, 5, 5])) == pytest.approx(1.0)
    assert utilisation_entropy(torch.tensor([0, 9, 0, 0])) == pytest.approx(0.0)
    assert utilisation_entropy(torch.tensor([1, 1]), normalized=False) == pytest.approx(math.log(2))
    assert 0 < utilisation_entropy(torch.tensor([10, 1, 1, 1])) < 1


def test_bad_counts():
    for bad in (torch.tensor([]), torch.tensor([1, -1]), torch.tensor([0, 0])):
        with pytest.raises(ValueError, match="counts"):
            expert_share(bad)
