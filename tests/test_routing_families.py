"""The routing rules of today's MoE families, each against a slow per-token loop, and SwiGLUMoE's
family options against a dense reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe_lab import load, save
from moe_lab.compress import ExpertPrune, MergeExperts, Quantize, compress
from moe_lab.compress.prune import prune_experts
from moe_lab.compress.share import merge_experts
from moe_lab.layers.routing import (
    contiguous_groups,
    group_limited_routing,
    sigmoid_top_k_routing,
    top_k_routing,
)
from moe_lab.layers.swiglu import SwiGLUExpert, SwiGLUMoE


def slow_group_limited(logits, k, n_group, topk_group, bias, groups, normalize, scale):
    """DeepSeek-V3's rule, one token at a time, in plain Python."""
    chosen, gates = [], []
    for row in logits.tolist():
        scores = [1 / (1 + math.exp(-v)) for v in row]
        choice = [s + float(b) for s, b in zip(scores, bias)]
        group_score = {}
        for g in range(n_group):
            members = sorted((choice[e] for e in range(len(row)) if groups[e] == g), reverse=True)
            group_score[g] = sum(members[:2]) if members else -math.inf
        best_groups = sorted(group_score, key=group_score.get, reverse=True)[:topk_group]
        candidates = [e for e in range(len(row)) if groups[e] in best_groups]
        top = sorted(candidates, key=lambda e: choice[e], reverse=True)[:k]
        weights = [scores[e] for e in top]
        if normalize:
            weights = [w / (sum(weights) + 1e-20) for w in weights]
        chosen.append(top)
        gates.append([w * scale for w in weights])
    return chosen, gates


def by_expert(indices, gates):
    """Each token's ``{expert: gate}`` (the group rule lists its k experts in no fixed order)."""
    return [dict(zip(i, g)) for i, g in zip(indices.tolist(), gates.tolist())]


@pytest.mark.parametrize("E, n_group, topk_group, k, normalize, scale", [
    (8, 4, 2, 2, True, 2.5), (8, 1, 1, 3, False, 1.0), (12, 3, 1, 2, True, 1.0), (16, 8, 4, 4, True, 1.8)])
def test_group_limited_routing_matches_a_slow_loop(E, n_group, topk_group, k, normalize, scale):
    g = torch.Generator().manual_seed(E + k)
    logits = torch.randn(50, E, generator=g, dtype=torch.float64) * 2
    bias = torch.randn(E, generator=g, dtype=torch.float64) * 0.3
    groups = contiguous_groups(E, n_group)
    r = group_limited_routing(logits, k, n_group=n_group, topk_group=topk_group, correction_bias=bias,
                              normalize=normalize, scaling_factor=scale)
    indices, gates = slow_group_limited(logits, k, n_group, topk_group, bias, groups.tolist(), normalize,
                                        scale)
    ours = by_expert(r.indices, r.gates)
    reference = [dict(zip(i, w)) for i, w in zip(indices, gates)]
    assert [set(o) for o in ours] == [set(ref) for ref in reference]
    for o, ref in zip(ours, reference):
        for e in ref:
            assert o[e] == pytest.approx(ref[e], rel=1e-12)
    torch.testing.assert_close(r.probs, logits.sigmoid())


def test_group_limited_routing_with_groups_of_unequal_size():
    """After pruning, DeepSeek-V3's groups can hold 3, 1 and 0 experts: a lone expert's group is
    scored by that expert alone, an empty group is never chosen."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 4, generator=g, dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1])
    r = group_limited_routing(logits, 1, n_group=3, topk_group=2, groups=groups)
    indices, gates = slow_group_limited(logits, 1, 3, 2, [0.0] * 4, groups.tolist(), True, 1.0)
    assert r.indices.tolist() == indices
    torch.testing.assert_close(r.gates, torch.tensor(gates, dtype=torch.float64))


def test_group_limited_routing_in_bfloat16_keeps_the_dtype():
    """Gates are the uncorrected scores: in the logits' dtype even with a float32 bias."""
    logits = torch.randn(10, 8).bfloat16()
    r = group_limited_routing(logits, 2, n_group=2, topk_group=1, correction_bias=torch.zeros(8))
    assert r.gates.dtype == torch.bfloat16
    chosen = logits.sigmoid().gather(1, r.indices)
    assert torch.equal(r.gates, chosen / (chosen.sum(-1, keepdim=True) + 1e-20))


@pytest.mark.parametrize("k", [1, 2])
def test_sigmoid_top_k_matches_a_slow_loop(k):
    logits = torch.randn(30, 6, generator=torch.Generator().manual_seed(k))
    r = sigmoid_top_k_routing(logits, k)
    for row, idx, gate in zip(logits.tolist(), r.indices.tolist(), r.gates.tolist()):
        top = sorted(range(6), key=lambda e: row[e], reverse=True)[:k]
        assert idx == top
        assert gate == pytest.approx([1 / (1 + math.exp(-row[e])) for e in top], rel=1e-6)


def test_sigmoid_top_k_takes_the_top_k_in_the_logits_dtype_and_the_sigmoid_in_float32():
    logits = torch.randn(20, 8).bfloat16()
    r = sigmoid_top_k_routing(logits, 1)
    top = logits.topk(1).values
    assert r.gates.dtype == torch.bfloat16
    assert torch.equal(r.gates, torch.sigmoid(top.float()).bfloat16())


@pytest.mark.parametrize("routing, normalize", [("softmax_topk", True), ("softmax_topk", False),
                                                ("topk_softmax", True)])
def test_softmax_rules_match_a_slow_loop(routing, normalize):
    logits = torch.randn(25, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    r = top_k_routing(logits, 2, routing=routing, normalize=normalize)
    for row, idx, gate in zip(logits.tolist(), r.indices.tolist(), r.gates.tolist()):
        top = sorted(range(5), key=lambda e: row[e], reverse=True)[:2]
        if routing == "topk_softmax":
            weights = [math.exp(row[e]) / sum(math.exp(row[j]) for j in top) for e in top]
        else:
            probs = [math.exp(v) / sum(math.exp(u) for u in row) for v in row]
            weights = [probs[e] / (sum(probs[j] for j in top) if normalize else 1) for e in top]
        assert idx == top and gate == pytest.approx(weights, rel=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=9), "k must be <= num_experts"), (dict(k=2, n_group=2, topk_group=3), "topk_group must be <="),
    (dict(k=2, n_group=0), "n_group must be >= 1"),
    (dict(k=2, n_group=2, groups=torch.zeros(3, dtype=torch.long)), "groups must have shape"),
])
def test_bad_group_routing_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_limited_routing(torch.randn(3, 8), **kwargs)


def test_contiguous_groups():
    assert contiguous_groups(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert contiguous_groups(6, 4).tolist() == [0, 0, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="n_group must be <="):
        contiguous_groups(2, 3)


# --- SwiGLUMoE with each family's options, against a dense per-token reference -------------

FAMILY_OPTIONS = {
    "mixtral": dict(float32_gates=True),
    "qwen": dict(normalize=False, shared_expert_size=24),
    "deepseek": dict(routing="sigmoid_group_topk", n_group=4, topk_group=2, routed_scaling_factor=2.5,
                     router_precision="float32", float32_gates=True, shared_expert_size=16,
                     shared_expert_gate=False),
    "gpt_oss": dict(routing="topk_softmax", router_bias=True, router_precision="input", expert_bias=True,
                    swiglu_limit=1.5, swiglu_alpha=1.702),
    "granite": dict(routing="topk_softmax"),
    "llama4": dict(k=1, routing="sigmoid_topk", router_precision="input", gate_input=True,
                   shared_expert_size=16, shared_expert_gate=False),
}


def family_layer(name, seed=0):
    torch.manual_seed(seed)
    options = {"k": 2, **FAMILY_OPTIONS[name]}
    layer = SwiGLUMoE(8, 16, 12, **options)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.4)
        if hasattr(layer, "e_score_correction_bias"):
            layer.e_score_correction_bias.normal_(0, 0.2)
    return layer.eval()


def expert_reference(expert: SwiGLUExpert, x):
    h = x @ expert.gate_up_proj.weight.T
    if expert.gate_up_proj.bias is not None:
        h = h + expert.gate_up_proj.bias
    gate, up = h.chunk(2, dim=-1)
    if expert.limit is None:
        inner = F.silu(gate) * up
    else:
        gate, up = gate.clamp(max=expert.limit), up.clamp(-expert.limit, expert.limit)
        inner = (up + 1) * gate * torch.sigmoid(expert.alpha * gate)
    out = inner @ expert.down_proj.weight.T
    return out if expert.down_proj.bias is None else out + expert.down_proj.bias


def dense_reference(layer: SwiGLUMoE, x):
    """Every token through the slow routing loop, then through its experts one by one."""
    c = layer.config
    logits = (x @ layer.gate.weight.T + (0 if layer.gate.bias is None else layer.gate.bias)).double()
    if c["routing"] == "sigmoid_group_topk":
        indices, gates = slow_group_limited(
            logits, layer.k, c["n_group"], c["topk_group"], layer.e_score_correction_bias.tolist(),
            layer.expert_group.tolist(), c["normalize"], c["routed_scaling_factor"])
    else:
        rule = {"sigmoid_topk": lambda row: [1 / (1 + math.exp(-v)) for v in row]}
        indices, gates = [], []
        for row in logits.tolist():
            top = sorted(range(len(row)), key=lambda e: row[e], reverse=True)[:layer.k]
            if c["routing"] in rule:
                weights = [rule[c["routing"]](row)[e] for e in top]
            elif c["routing"] == "topk_softmax":
                weights = [math.exp(row[e]) / sum(math.exp(row[j]) for j in top) for e in top]
            else:
                probs = [math.exp(v) / sum(math.exp(u) for u in row) for v in row]
                weights = [probs[e] / (sum(probs[j] for j in top) if c["normalize"] else 1) for e in top]
            indices.append(top)
            gates.append(weights)
    out = torch.zeros_like(x)
    for t in range(len(x)):
        for e, w in zip(indices[t], gates[t]):
            expert = layer.experts[e]
            if c["gate_input"]:
                out[t] += expert_reference(expert, w * x[t])
            else:
                out[t] += w * expert_reference(expert, x[t])
    if c["shared_expert_size"]:
        shared = expert_reference(layer.shared_expert, x)
        if c["shared_expert_gate"]:
            shared = torch.sigmoid(x @ layer.shared_expert_gate.weight.T) * shared
        out += shared
    return out


@pytest.mark.parametrize("family", FAMILY_OPTIONS)
def test_family_options_match_a_dense_reference(family):
    layer = family_layer(family)
    x = torch.randn(60, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_reference(layer, x), rtol=1e-5, atol=1e-5)
    assert int(layer.tokens_per_expert.sum()) == 60 * layer.k
    assert layer.router_logits.shape == (60, 8)


def test_low_precision_outputs_are_weighted_and_summed_in_float32():
    """Mixtral multiplies bfloat16 expert outputs by float32 gates, sums in float32 and rounds
    once (transformers' default experts); casting the gates to bfloat16 first rounds more."""
    layer = family_layer("mixtral").bfloat16()
    x = torch.randn(200, 16).bfloat16()
    with torch.no_grad():
        routing = layer.route(x)
        assert routing.gates.dtype == torch.float32
        expected = torch.zeros(x.shape)
        cast_first = torch.zeros_like(x)
        for t in range(len(x)):
            for e, g in zip(routing.indices[t].tolist(), routing.gates[t]):
                y = layer.experts[e](x[t:t + 1])[0]
                expected[t] += y.float() * g
                cast_first[t] += y * g.bfloat16()
        out = layer(x)
    assert torch.equal(out, expected.bfloat16())
    assert not torch.equal(out, cast_first)


@pytest.mark.parametrize("family", FAMILY_OPTIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_family_layers_keep_a_low_precision_dtype(family, dtype):
    layer = family_layer(family).to(dtype)
    out = layer(torch.randn(2, 9, 16).to(dtype))
    assert out.dtype == dtype and out.shape == (2, 9, 16) and torch.isfinite(out).all()


def test_pruning_and_merging_carry_the_per_expert_buffers():
    layer = family_layer("deepseek")
    bias = layer.e_score_correction_bias.clone()
    pruned = prune_experts(layer, [0, 1, 3, 6, 7])
    assert torch.equal(pruned.e_score_correction_bias, bias[[0, 1, 3, 6, 7]])
    assert pruned.expert_group.tolist() == [0, 0, 1, 3, 3]  # group 2 is empty now
    x = torch.randn(40, 16)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), dense_reference(pruned, x), rtol=1e-5, atol=1e-5)
    merged = merge_experts(layer, x, 4, groups=[[0, 1], [2, 3], [4, 5], [6, 7]])
    assert merged.e_score_correction_bias.shape == (4,) and merged.expert_group.tolist() == [0, 1, 2, 3]
    assert bias[:2].min() <= merged.e_score_correction_bias[0] <= bias[:2].max()
    assert merged(x).shape == x.shape


@pytest.mark.parametrize("family", ["deepseek", "gpt_oss", "llama4"])
def test_family_layers_compress_save_and_reload(family, tmp_path):
    layer = family_layer(family)
    x = torch.randn(128, 16)
    small = compress(layer, [ExpertPrune(0.25), MergeExperts(4), Quantize(8)], x).model
    assert small.num_experts == 4 and small.config == {**layer.config, "num_experts": 4}
    loaded = load(save(small, tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


@pytest.mark.parametrize("kwargs, match", [
    (dict(routing="bogus"), "routing must be one of"),
    (dict(router_precision="half"), "router_precision must"),
    (dict(n_group=2), "n_group > 1 needs routing='sigmoid_group_topk'"),
    (dict(routing="sigmoid_group_topk", n_group=2, topk_group=3), "topk_group must be <="),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor must be > 0"),
    (dict(swiglu_limit=-1.0), "swiglu_limit must be > 0"),
])
def test_bad_family_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SwiGLUMoE(8, 16, 12, **kwargs)
