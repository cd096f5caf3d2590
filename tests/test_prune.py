"""Pruning: magnitude (via torch.nn.utils.prune), sparse storage, hidden units, experts."""

import pytest
import torch
import torch.nn as nn

from moe_lab import (
    DenseMoE,
    ImageClassifierMoE,
    SharedTrunkMoE,
    TopKMoE,
    load,
    model_bytes,
    param_count,
    save,
)
from moe_lab.compress.prune import (
    expert_usage,
    magnitude_prune,
    prune_experts,
    prune_hidden_units,
    prune_model_experts,
    select_experts,
    to_sparse,
)
from moe_lab.layers.compact.sparse import SparseLinear, pack_mask, sparse_bytes, unpack_mask


def test_layer_scope_prunes_each_matrix_and_keeps_the_router():
    layer = TopKMoE(4, 16, 32, 8)
    router = layer.gating.weight.clone()
    magnitude_prune(layer, 0.75)
    for expert in layer.experts:
        assert (expert.weight == 0).float().mean().item() == pytest.approx(0.75, abs=1 / 512)
    assert torch.equal(layer.gating.weight, router)
    assert not any(hasattr(m, "weight_orig") for m in layer.modules())  # made permanent


def test_pruned_weights_are_the_smallest():
    layer = DenseMoE(2, 8, 8, 4)
    original = layer.experts[0].weight.detach().clone()
    magnitude_prune(layer, 0.5)
    kept = layer.experts[0].weight != 0
    assert original[~kept].abs().max() <= original[kept].abs().min()


def test_global_scope_shares_one_threshold():
    layer = DenseMoE(2, 8, 8, 4)
    with torch.no_grad():
        layer.experts[0].weight.mul_(100)  # expert 0 is big: global pruning spares it
    magnitude_prune(layer, 0.5, scope="global")
    assert (layer.experts[0].weight == 0).float().mean() < (layer.experts[1].weight == 0).float().mean()


def test_zeros_cost_dense_bytes_until_stored_sparsely():
    layer = DenseMoE(4, 64, 128, 32)
    dense = model_bytes(layer)
    magnitude_prune(layer, 0.9)
    assert model_bytes(layer) == dense
    x = torch.randn(5, 64)
    before = layer(x)
    to_sparse(layer)
    assert isinstance(layer.experts[0], SparseLinear)
    torch.testing.assert_close(layer(x), before)
    assert model_bytes(layer) < 0.25 * dense


def test_sparse_format_bytes_and_mask_packing():
    mask = torch.rand(37) > 0.5
    assert torch.equal(unpack_mask(pack_mask(mask), 37), mask)
    assert sparse_bytes(512, 256, 0) == 512 * 256 // 8
    dense = sparse_bytes(512, 256, 0, "dense")
    assert sparse_bytes(512, 256, 512 * 256 * 31 // 32) == dense  # break-even at density 31/32
    assert sparse_bytes(512, 256, 512 * 256 * 30 // 32) < dense
    assert sparse_bytes(512, 256, 512 * 256 // 2 + 600, "csr") > sparse_bytes(512, 256, 0, "dense")
    with pytest.raises(ValueError, match="format must be"):
        sparse_bytes(1, 1, 1, "coo")


def test_hidden_unit_pruning_shrinks_matrices_and_keeps_a_full_selection_exact():
    layer = TopKMoE(4, 16, 32, 8, k=2)
    same = prune_hidden_units(layer, 32)
    x = torch.randn(10, 16)
    torch.testing.assert_close(same(x), layer(x))
    small = prune_hidden_units(layer, 12)
    assert small.experts[0].weight.shape == (12, 16) and small.output.weight.shape == (8, 12)
    assert param_count(small) < param_count(layer)
    assert small(x).shape == (10, 8)
    loaded = load(save(small, "/tmp/moe_lab_test_hidden"))
    assert torch.equal(loaded(x), small(x))


def test_deck_identity_replacement_breaks_shapes():
    layer = TopKMoE(4, 16, 32, 8, k=2)
    layer.experts[2] = nn.Identity()  # the deck's "pruned expert": returns 16 values, not 32
    with pytest.raises(RuntimeError):
        layer(torch.randn(64, 16))


@pytest.mark.parametrize("cls", [DenseMoE, TopKMoE, SharedTrunkMoE])
def test_prune_experts_keeps_trained_experts_and_router_rows(cls):
    args = (5, 12, 16, 6) + ((8,) if cls is SharedTrunkMoE else ())
    layer = cls(*args)
    pruned = prune_experts(layer, [0, 2, 3])
    assert pruned.num_experts == 3 and pruned.gating.weight.shape == (3, 12)
    x = torch.randn(20, 12)
    experts = "expert_layers" if cls is SharedTrunkMoE else "experts"
    assert torch.equal(getattr(pruned, experts)[1].weight, getattr(layer, experts)[2].weight)
    # the pruned layer equals the full layer with the removed experts' logits at -inf
    with torch.no_grad():
        masked = prune_experts(layer, [0, 1, 2, 3, 4])
        masked.gating.bias[[1, 4]] = -float("inf")
        torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-6)


def test_routing_never_reaches_a_pruned_expert():
    layer = TopKMoE(6, 8, 8, 4, k=3)
    pruned = prune_experts(layer, [1, 4])
    assert pruned.k == 2
    pruned(torch.randn(100, 8))
    assert pruned.tokens_per_expert.shape == (2,) and int(pruned.tokens_per_expert.sum()) == 200


def test_expert_usage_and_selection():
    layer = TopKMoE(4, 8, 8, 4, k=1)
    with torch.no_grad():
        layer.gating.bias.copy_(torch.tensor([5.0, 0.0, 3.0, -5.0]))
    x = torch.randn(200, 8)
    usage = expert_usage(layer, x)
    assert usage["frequency"].sum().item() == pytest.approx(1.0)
    assert usage["frequency"].argmax() == 0
    assert select_experts(layer, x, 2, "frequency") == [0, 2]
    assert select_experts(layer, x, 2, "gate_weight") == [0, 2]
    best = select_experts(layer, x, 2, "reconstruction")
    errors = {}
    with torch.no_grad():
        ref = layer(x)
        for a in range(4):
            for b in range(a + 1, 4):
                errors[(a, b)] = (prune_experts(layer, [a, b])(x) - ref).square().mean().item()
    assert tuple(best) == min(errors, key=errors.get)


def test_prune_model_experts_on_an_image_classifier():
    model = ImageClassifierMoE(num_experts=4, channels=(8,), expert_size=16, hidden_size=16, moe="topk")
    images = torch.randn(16, 3, 32, 32)
    prune_model_experts(model, images, 2, "gate_weight")
    assert model.moe.num_experts == 2 and model(images).shape == (16, 10)
    loaded = load(save(model, "/tmp/moe_lab_test_pruned_model"))
    assert loaded.moe.num_experts == 2
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), model.eval()(images))


@pytest.mark.parametrize("call, match", [
    (lambda l: magnitude_prune(l, 1.0), "sparsity must be a number in"),
    (lambda l: magnitude_prune(l, -0.1), "sparsity must be a number in"),
    (lambda l: magnitude_prune(l, 0.5, scope="row"), "scope must be"),
    (lambda l: prune_experts(l, []), "pruning all experts"),
    (lambda l: prune_experts(l, [0, 0]), "distinct expert indices"),
    (lambda l: prune_experts(l, [7]), "distinct expert indices"),
    (lambda l: select_experts(l, torch.randn(4, 8), 5), "num_keep must be <="),
    (lambda l: select_experts(l, torch.randn(4, 8), 2, "random"), "score must be one of"),
    (lambda l: prune_hidden_units(l, 9), "keep must be <="),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(TopKMoE(4, 8, 8, 4))
