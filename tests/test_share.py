"""Expert merging and shared-base-plus-delta experts."""

import copy

import pytest
import torch

from moe_lab import DenseMoE, SharedTrunkMoE, TopKMoE, load, model_bytes, param_count, save
from moe_lab.compress.share import base_delta_experts, group_experts, merge_experts
from moe_lab.layers.compact import BaseDeltaLinear


def duplicated_layer(cls=DenseMoE):
    """4 experts where 0 == 2 and 1 == 3 (weights and router rows)."""
    torch.manual_seed(0)
    layer = cls(4, 8, 12, 5) if cls is not TopKMoE else cls(4, 8, 12, 5, k=2)
    with torch.no_grad():
        for a, b in [(0, 2), (1, 3)]:
            layer.experts[b].load_state_dict(layer.experts[a].state_dict())
            layer.gating.weight[b] = layer.gating.weight[a]
            layer.gating.bias[b] = layer.gating.bias[a]
    return layer


def test_grouping_finds_duplicates():
    layer = duplicated_layer()
    assert group_experts(layer, torch.randn(64, 8), 2) == [[0, 2], [1, 3]]


def test_merging_identical_experts_is_exact_for_a_dense_layer():
    layer = duplicated_layer()
    x = torch.randn(64, 8)
    merged = merge_experts(layer, x, 2)
    assert merged.num_experts == 2
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)


def test_merged_topk_layer_and_weighting():
    layer = TopKMoE(6, 8, 12, 5, k=2)
    x = torch.randn(64, 8)
    merged = merge_experts(layer, x, 3)
    assert merged.num_experts == 3 and merged.k == 2 and merged(x).shape == (64, 5)
    groups = [[0, 1], [2], [3, 4, 5]]
    merged = merge_experts(layer, x, 3, groups=groups)
    torch.testing.assert_close(merged.experts[1].weight, layer.experts[2].weight)
    assert model_bytes(merged) < model_bytes(layer)
    with pytest.raises(ValueError, match="partition"):
        merge_experts(layer, x, 2, groups=[[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="num_groups must be <="):
        group_experts(layer, x, 7)


def test_base_delta_at_full_rank_is_exact_and_stores_the_base_once(tmp_path):
    layer = TopKMoE(4, 16, 16, 4, k=2)
    x = torch.randn(20, 16)
    reference = layer(x)
    full = base_delta_experts(copy.deepcopy(layer), rank=16, x=x)
    torch.testing.assert_close(full(x), reference, rtol=1e-4, atol=1e-5)
    small = base_delta_experts(copy.deepcopy(layer), rank=2)
    assert all(e.base is small.experts[0].base for e in small.experts)
    assert param_count(small) < param_count(layer)
    assert model_bytes(small) < model_bytes(layer)
    loaded = load(save(small, tmp_path))
    assert all(e.base is loaded.experts[0].base for e in loaded.experts)
    assert torch.equal(loaded(x), small(x))
    assert model_bytes(loaded) == model_bytes(small)


def test_shared_trunk_layers_merge_too():
    layer = SharedTrunkMoE(4, 10, 8, 3, shared_size=6)
    merged = merge_experts(layer, torch.randn(30, 10), 2)
    assert len(merged.expert_layers) == 2 and merged(torch.randn(3, 10)).shape == (3, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank must be <="):
        BaseDeltaLinear(4, 3, rank=4)
    layer = TopKMoE(4, 8, 8, 4)
    base_delta_experts(layer, 2)
    with pytest.raises(TypeError, match="built from nn.Linear layers"):
        merge_experts(layer, torch.randn(5, 8), 2)
