"""SlotSoftMoE (Soft MoE, Puigcerver et al. 2023) against a slow, obviously-correct loop."""

import math

import pytest
import torch

from moe_lab import flops_per_token, load, save
from moe_lab.data import group_into_sequences
from moe_lab.layers.slot import SlotSoftMoE


def loop_reference(layer: SlotSoftMoE, x: torch.Tensor) -> torch.Tensor:
    """One sequence, one slot, one token at a time, with scalar softmaxes written out."""
    act = layer._act or (lambda v: v)
    phi, S = layer.phi.detach(), layer.slots_per_expert
    batch, tokens, _ = x.shape
    out = []
    for b in range(batch):
        logits = [[float(x[b, t] @ phi[:, i]) for i in range(layer.num_slots)] for t in range(tokens)]
        slot_outputs = []
        for i in range(layer.num_slots):
            column = [math.exp(logits[t][i]) for t in range(tokens)]
            slot = sum(column[t] / sum(column) * x[b, t] for t in range(tokens))
            slot_outputs.append(act(layer.experts[i // S](slot)))
        rows = []
        for t in range(tokens):
            row = [math.exp(v) for v in logits[t]]
            mixed = sum(row[i] / sum(row) * slot_outputs[i] for i in range(layer.num_slots))
            rows.append(layer.output(mixed))
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize("experts,slots,tokens", [(1, 1, 1), (3, 2, 5), (4, 1, 9)])
def test_matches_the_loop_reference(activation, experts, slots, tokens):
    layer = SlotSoftMoE(experts, slots, 6, 5, 3, activation=activation)
    x = torch.randn(2, tokens, 6)
    with torch.no_grad():
        assert torch.allclose(layer(x), loop_reference(layer, x), atol=1e-5)


def test_shapes_and_weights_sum_to_one():
    layer = SlotSoftMoE(4, 3, 8, 16, 5)
    x = torch.randn(7, 11, 8)
    assert layer(x).shape == (7, 11, 5)
    dispatch, combine = layer.routing_weights(x)
    assert dispatch.shape == combine.shape == (7, 11, 12)
    assert torch.allclose(dispatch.sum(dim=1), torch.ones(7, 12))  # each slot: a weighted average of tokens
    assert torch.allclose(combine.sum(dim=2), torch.ones(7, 11))   # each token: a weighted average of slots
    assert layer.num_slots == 12


def test_fully_differentiable_and_every_token_and_expert_gets_gradient():
    layer = SlotSoftMoE(3, 2, 4, 6, 2, activation="relu")
    x = torch.randn(2, 5, 4, requires_grad=True)
    layer(x).square().sum().backward()
    assert (x.grad.abs().sum(dim=-1) > 0).all()  # no token dropped
    assert all(e.weight.grad.abs().sum() > 0 for e in layer.experts)
    assert layer.phi.grad.abs().sum() > 0


def test_no_leakage_across_the_batch_but_mixing_within_a_sequence():
    layer = SlotSoftMoE(2, 2, 4, 6, 3)
    x = torch.randn(3, 6, 4)
    changed = x.clone()
    changed[1] = torch.randn(6, 4) * 3          # another sequence entirely
    changed_last = x.clone()
    changed_last[0, -1] += 5.0                  # the last token of sequence 0
    with torch.no_grad():
        base, other, last = layer(x), layer(changed), layer(changed_last)
        alone = layer(x[2:3])
    assert torch.equal(base[0], other[0]) and torch.equal(base[2], other[2])
    assert torch.allclose(base[2:3], alone, atol=1e-6)  # a sequence's output ignores its batch-mates
    assert (last[0, 0] - base[0, 0]).abs().max() > 1e-3  # not causal: a later token changes an earlier output


def test_permutation_equivariant_over_tokens():
    layer = SlotSoftMoE(3, 2, 4, 6, 3, activation="silu")
    x = torch.randn(2, 7, 4)
    perm = torch.randperm(7)
    with torch.no_grad():
        assert torch.allclose(layer(x)[:, perm], layer(x[:, perm]), atol=1e-6)


def test_expert_flops_depend_on_slots_not_on_experts():
    x = torch.randn(4, 16, 32)
    flops = [flops_per_token(SlotSoftMoE(e, 16 // e, 32, 64, 8), x) for e in (1, 2, 4, 8, 16)]
    assert max(flops) == min(flops)  # 16 slots in all: the same work whatever the number of experts


def test_save_load_round_trip(tmp_path):
    layer = SlotSoftMoE(3, 2, 5, 7, 4, activation="gelu")
    x = torch.randn(2, 6, 5)
    loaded = load(save(layer, tmp_path / "slot"))
    assert isinstance(loaded, SlotSoftMoE) and loaded.config == layer.config
    with torch.no_grad():
        assert torch.equal(loaded(x), layer(x))


@pytest.mark.parametrize("args,error,match", [
    ((0, 1, 4, 4, 4), ValueError, "num_experts"),
    ((2, 0, 4, 4, 4), ValueError, "slots_per_expert"),
    ((2, 1.5, 4, 4, 4), TypeError, "slots_per_expert"),
    ((2, 1, 4, -1, 4), ValueError, "expert_size"),
    ((2, 1, True, 4, 4), TypeError, "input_size"),
])
def test_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        SlotSoftMoE(*args)


def test_bad_activation_and_inputs():
    with pytest.raises(ValueError, match="activation"):
        SlotSoftMoE(2, 1, 4, 4, 4, activation="tanh")
    layer = SlotSoftMoE(2, 1, 4, 4, 4)
    with pytest.raises(ValueError, match=r"\(batch, tokens, 4\)"):
        layer(torch.randn(5, 4))               # a flat batch of tokens: no sequences to mix
    assert layer(torch.randn(2, 0, 4)).shape == (2, 0, 4)  # no tokens: an empty output
    with pytest.raises(ValueError, match="last dimension 4"):
        layer(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([[0.0] * 4])


def test_group_into_sequences_keeps_groups_together():
    x = torch.arange(23, dtype=torch.float32)[:, None].repeat(1, 3)
    y = torch.arange(23) % 5
    groups = torch.tensor([0, 1, 2] * 7 + [0, 0])
    xs, ys = group_into_sequences(x, y, groups, tokens=4, seed=1)
    assert xs.shape == (4, 4, 3) and ys.shape == (4, 4)     # groups of 9, 7, 7 -> 2 + 1 + 1 sequences
    ids = xs[..., 0].long()
    assert all(len(set(groups[row].tolist())) == 1 for row in ids)  # one group per sequence
    assert torch.equal(ys, y[ids]) and len(set(ids.flatten().tolist())) == 16  # labels follow, no repeats
    again, _ = group_into_sequences(x, y, groups, tokens=4, seed=1)
    assert torch.equal(again, xs)
    with pytest.raises(ValueError, match="same length"):
        group_into_sequences(x, y[:-1], groups, tokens=4)
    with pytest.raises(ValueError, match="no group"):
        group_into_sequences(x, y, groups, tokens=10)
    with pytest.raises(TypeError, match="tokens"):
        group_into_sequences(x, y, groups, tokens=2.0)
