"""Routing-aware calibration and the GPTQ Quantize stage, against slow per-token loops: routed tokens,
per-linear (SwiGLU intermediate) inputs, gate-weighted Hessians, coverage policies, layer-by-layer
calibration, the per-expert report, recipes and the Hugging Face bridge."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab import DenseMoE, LanguageModelMoE, SharedTrunkMoE, SwiGLUMoE, TopKMoE
from moe_lab.compress import (
    CoverageWarning,
    ExpertPrune,
    LowRank,
    MagnitudePrune,
    Quantize,
    compress,
    quantize_experts,
    routed_tokens,
)
from moe_lab.compress.calibration import HessianAccumulator, calibrate_sequentially, expert_contributions
from moe_lab.compress.gptq import gptq_quantize
from moe_lab.compress.recipes import normalize_recipe, parse_recipe
from moe_lab.layers.compact import quantized as storage
from moe_lab.layers.compact.quantized import QuantizedLinear


def correlated(n: int, width: int, rank: int = 6, seed: int = 0) -> torch.Tensor:
    """Tokens near a ``rank``-dimensional subspace: strongly correlated features, as in real activations."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, width, generator=g)
    return torch.randn(n, rank, generator=g) @ basis + 0.05 * torch.randn(n, width, generator=g)


def slow_top_k(logits: torch.Tensor, k: int, rule: str = "topk_softmax", normalize: bool = True):
    """Per token: the chosen experts (highest logit first) and their gates, one token at a time."""
    chosen, gates = [], []
    for row in logits.double():
        order = sorted(range(len(row)), key=lambda e: -float(row[e]))[:k]
        if rule == "topk_softmax":
            g = torch.softmax(row[order], 0)
        else:
            g = torch.softmax(row, 0)[order]
            g = g / g.sum() if normalize else g
        chosen.append(order)
        gates.append(g.tolist())
    return chosen, gates


def slow_routed(layer, x):
    """``{expert: (token rows ascending, gates)}`` from a per-token loop over the router."""
    with torch.no_grad():
        logits = layer.router(x)
    rule = layer.config.get("routing", "softmax_topk")
    chosen, gates = slow_top_k(logits, layer.k, rule, layer.config.get("normalize", True))
    routed = {e: ([], []) for e in range(layer.num_experts)}
    for t, (experts, g) in enumerate(zip(chosen, gates)):
        for e, gate in zip(experts, g):
            routed[e][0].append(t)
            routed[e][1].append(gate)
    return routed


def qweights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.qweight for name, m in module.named_modules() if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize("make", [lambda: TopKMoE(5, 16, 24, 8, k=2),
                                  lambda: SwiGLUMoE(5, 16, 12, k=2, normalize=False),
                                  lambda: DenseMoE(3, 16, 24, 8)])
def test_routed_tokens_match_a_per_token_loop(make):
    layer = make()
    x = torch.randn(60, 16)
    found = routed_tokens(layer, x)
    if layer.DENSE:  # every token, with its softmax gate
        probs = torch.softmax(layer.router(x).detach(), -1)
        for tokens in found:
            assert torch.equal(tokens.index, torch.arange(60))
            torch.testing.assert_close(tokens.gates, probs[:, tokens.expert])
        return
    routed = slow_routed(layer, x)
    for tokens in found:
        rows, gates = routed[tokens.expert]
        assert tokens.index.tolist() == rows
        torch.testing.assert_close(tokens.gates.double(), torch.tensor(gates, dtype=torch.float64))
        assert torch.equal(tokens.inputs, x[rows])


def test_routed_tokens_of_a_shared_trunk_are_the_trunk_outputs():
    layer = SharedTrunkMoE(3, 16, 8, 4, shared_size=6)
    x = torch.randn(10, 16)
    (first, *_) = routed_tokens(layer, x)
    torch.testing.assert_close(first.inputs, layer.shared_layer(x).detach())


def test_sequential_calibration_feeds_each_linear_the_outputs_of_the_replaced_ones():
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    x = torch.randn(40, 8)
    seen = {}

    def transform(name, linear, accumulator):
        seen[name] = accumulator.hessian
        replacement = nn.Linear(linear.in_features, linear.out_features)  # another map: the next input moves
        nn.init.normal_(replacement.weight)
        return replacement

    def put(name, new):
        chain[int(name)] = new

    done = calibrate_sequentially(lambda: chain(x), {"0": chain[0], "2": chain[2]}, transform, put)
    assert list(done) == ["0", "2"]
    torch.testing.assert_close(seen["0"], x.T @ x / 40)
    hidden = torch.relu(chain[0](x)).detach()  # the replaced first linear's outputs
    torch.testing.assert_close(seen["2"], hidden.T @ hidden / 40, rtol=1e-5, atol=1e-6)


def test_gptq_stage_calibrates_each_expert_on_its_routed_tokens_only():
    torch.manual_seed(0)
    layer = TopKMoE(4, 32, 48, 16, k=2, activation="relu")
    x = correlated(600, 32)
    stage = Quantize(4, method="gptq")
    quantized = stage.apply(copy.deepcopy(layer), x)
    routed = slow_routed(layer, x)
    for e, expert in enumerate(layer.experts):
        reference = gptq_quantize(expert, x[routed[e][0]], bits=4)
        assert torch.equal(quantized.experts[e].qweight, reference.qweight)
        assert torch.equal(quantized.experts[e].scales, reference.scales)
    # the output projection: on the mixed hidden state of the quantized experts (every token)
    mixed = torch.zeros(600, 48, dtype=torch.float64)
    for e in range(4):
        rows, gates = routed[e]
        hidden = torch.relu(quantized.experts[e](x[rows])).double()
        mixed[rows] += torch.tensor(gates, dtype=torch.float64)[:, None] * hidden
    reference = gptq_quantize(layer.output, mixed.float(), bits=4)
    steps = (quantized.output.weight - reference.weight).abs() / reference.scales.float()
    assert (steps < 1e-3).float().mean() > 0.99 and steps.max() < 1 + 1e-3  # float-order ties at most
    assert type(quantized.gating) is nn.Linear and torch.equal(quantized.gating.weight, layer.gating.weight)


def test_swiglu_down_proj_is_calibrated_on_the_quantized_intermediate_activations():
    torch.manual_seed(0)
    layer = SwiGLUMoE(4, 32, 24, k=2, shared_expert_size=16)
    x = correlated(500, 32)
    quantized = Quantize(4, 8, method="gptq").apply(copy.deepcopy(layer), x)
    routed = slow_routed(layer, x)
    for e, expert in enumerate(layer.experts):
        tokens = x[routed[e][0]]
        gate_up = gptq_quantize(expert.gate_up_proj, tokens, bits=4, group_size=8)
        gate, up = gate_up(tokens).chunk(2, dim=-1)
        down = gptq_quantize(expert.down_proj, F.silu(gate) * up, bits=4, group_size=8)
        assert torch.equal(quantized.experts[e].gate_up_proj.qweight, gate_up.qweight)
        assert torch.equal(quantized.experts[e].down_proj.qweight, down.qweight)
    shared = quantized.shared_expert  # every token, after the experts
    assert isinstance(shared.gate_up_proj, QuantizedLinear) and isinstance(shared.down_proj, QuantizedLinear)
    assert type(quantized.shared_expert_gate) is nn.Linear and type(quantized.gate) is nn.Linear


def test_gate_weighted_hessians():
    torch.manual_seed(1)
    layer = SwiGLUMoE(4, 16, 12, k=2)
    x = correlated(400, 16)
    quantized = Quantize(4, method="gptq", weight_by_gate=True).apply(copy.deepcopy(layer), x)
    plain = Quantize(4, method="gptq").apply(copy.deepcopy(layer), x)
    routed = slow_routed(layer, x)
    differs = False
    for e, expert in enumerate(layer.experts):
        rows, gates = routed[e]
        reference = gptq_quantize(expert.gate_up_proj, x[rows], bits=4, weights=torch.tensor(gates))
        assert torch.equal(quantized.experts[e].gate_up_proj.qweight, reference.qweight)
        differs |= not torch.equal(reference.qweight, plain.experts[e].gate_up_proj.qweight)
    assert differs


def test_round_to_nearest_stays_the_default_bitwise_and_ignores_the_calibration():
    torch.manual_seed(0)
    layer = SwiGLUMoE(4, 32, 24, k=2, shared_expert_size=16)
    ours = Quantize(4, 8).apply(copy.deepcopy(layer), torch.randn(50, 32))
    other = Quantize(4, 8).apply(copy.deepcopy(layer), correlated(50, 32))
    assert Quantize(4, 8).method == "rtn"
    expected = quantize_experts(copy.deepcopy(layer), 4, 8)
    assert qweights(ours).keys() == qweights(expected).keys()
    assert all(torch.equal(qweights(ours)[k], qweights(expected)[k]) and torch.equal(qweights(other)[k], v)
               for k, v in qweights(expected).items())
    gptq_a = qweights(Quantize(4, 8, method="gptq").apply(copy.deepcopy(layer), torch.randn(300, 32)))
    gptq_b = qweights(Quantize(4, 8, method="gptq").apply(copy.deepcopy(layer), correlated(300, 32)))
    assert any(not torch.equal(gptq_a[k], gptq_b[k]) for k in gptq_a)  # GPTQ does read its tokens


def experts_error(layer, quantized, x):
    """Per expert: relative output error on its routed tokens."""
    errors = []
    for tokens in routed_tokens(layer, x):
        with torch.no_grad():
            reference = layer.expert_modules()[tokens.expert](tokens.inputs)
            ours = quantized.expert_modules()[tokens.expert](tokens.inputs)
        errors.append(float((ours - reference).norm() / reference.norm()))
    return errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(dtype):
    torch.manual_seed(0)
    layer = SwiGLUMoE(4, 64, 48, k=2).to(dtype)
    x = correlated(2000, 64).to(dtype)
    gptq = Quantize(4, method="gptq").apply(copy.deepcopy(layer), x)
    rtn = Quantize(4).apply(copy.deepcopy(layer), x)
    for ours, theirs in zip(experts_error(layer, gptq, x), experts_error(layer, rtn, x)):
        assert ours <= 0.6 * theirs
    with torch.no_grad():
        out = gptq(x)
        reference = layer(x)
    assert out.dtype == dtype
    assert (out - reference).float().norm() / reference.float().norm() < \
        (rtn(x) - reference).float().norm() / reference.float().norm()


def test_report_lists_tokens_method_and_error_per_expert():
    torch.manual_seed(0)
    layer = TopKMoE(4, 32, 48, 16, k=2, activation="relu")
    x = correlated(600, 32)
    stage = Quantize(8, method="gptq")
    quantized = stage.apply(copy.deepcopy(layer), x)
    rows = stage.last_report
    routed = slow_routed(layer, x)
    assert [r["module"] for r in rows] == [f"experts.{e}" for e in range(4)] + ["output"]
    errors = experts_error(layer, quantized, x)
    for e, row in enumerate(rows[:4]):
        assert row["expert"] == e and row["tokens"] == len(routed[e][0]) and row["layer"] == ""
        assert row["method"] == "gptq" and row["calibration"] == "routed"
        assert row["relative_error"] == pytest.approx(errors[e], rel=1e-5)
    assert rows[4]["expert"] is None and rows[4]["tokens"] == 600 and rows[4]["calibration"] == "all"
    assert 0 < rows[4]["relative_error"] < 0.02  # int8
    assert Quantize(8).apply(copy.deepcopy(layer), x) is not None and Quantize(8).last_report is None


def starved_layer():
    """A top-2 layer whose router never picks expert 3."""
    torch.manual_seed(0)
    layer = TopKMoE(4, 32, 48, 16, k=2, activation="relu")
    with torch.no_grad():
        layer.gating.bias[3] = -1e4
    return layer


def test_coverage_fallback_rounds_the_starved_expert_and_names_it():
    layer, x = starved_layer(), correlated(400, 32)
    stage = Quantize(4, method="gptq", coverage="fallback")
    with pytest.warns(CoverageWarning, match="expert 3 of the layer received 0 calibration tokens"):
        quantized = stage.apply(copy.deepcopy(layer), x)
    assert torch.equal(quantized.experts[3].qweight, QuantizedLinear.from_linear(layer.experts[3], 4).qweight)
    row = stage.last_report[3]
    assert row == {"layer": "", "module": "experts.3", "expert": 3, "tokens": 0, "calibration": "none",
                   "method": "rtn", "relative_error": None}
    assert all(r["method"] == "gptq" for r in stage.last_report[:3])


def test_coverage_error_and_all():
    layer, x = starved_layer(), correlated(400, 32)
    with pytest.raises(ValueError, match="expert 3 of the layer received 0 calibration tokens"):
        Quantize(4, method="gptq", coverage="error").apply(copy.deepcopy(layer), x)
    stage = Quantize(4, method="gptq", coverage="all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantized = stage.apply(copy.deepcopy(layer), x)
    assert torch.equal(quantized.experts[3].qweight, gptq_quantize(layer.experts[3], x, 4).qweight)
    assert stage.last_report[3]["calibration"] == "all" and stage.last_report[3]["method"] == "gptq"


def test_min_tokens_decides_who_is_covered():
    torch.manual_seed(0)
    layer, x = TopKMoE(4, 32, 48, 16, k=1), correlated(200, 32)
    counts = [t.count for t in routed_tokens(layer, x)]
    threshold = sorted(counts)[1] + 1  # the two least used experts fall below it
    stage = Quantize(4, method="gptq", min_tokens=threshold)
    with pytest.warns(CoverageWarning) as caught:
        stage.apply(copy.deepcopy(layer), x)
    starved = [e for e, c in enumerate(counts) if c < threshold]
    assert len(caught) == len(starved) == 2
    expected = ["rtn" if c < threshold else "gptq" for c in counts]
    assert [r["method"] for r in stage.last_report[:4]] == expected
    default = Quantize(4, method="gptq")  # default min_tokens: the input width (32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default.apply(copy.deepcopy(layer), x)
    assert all(c >= 32 for c in counts)


def test_layers_are_calibrated_on_the_outputs_of_the_quantized_layers_before_them():
    torch.manual_seed(0)
    model = LanguageModelMoE(40, num_experts=3, expert_size=32, embedding_dim=16, num_layers=2, num_heads=2,
                             context_size=12).eval()
    tokens = torch.randint(0, 40, (24, 12))
    stage = Quantize(4, method="gptq", min_tokens=1)
    ours = stage.apply(copy.deepcopy(model), tokens)
    assert [r["layer"] for r in stage.last_report] == ["blocks.0.moe"] * 4 + ["blocks.1.moe"] * 4

    def inputs_of(m, layer):
        captured = []
        handle = layer.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
        with torch.no_grad():
            m(tokens)
        handle.remove()
        return captured[0]

    reference = copy.deepcopy(model)
    first = reference.blocks[0].moe
    Quantize(4, method="gptq", min_tokens=1).apply(first, inputs_of(reference, first))
    second = reference.blocks[1].moe
    float_inputs = inputs_of(model, model.blocks[1].moe)
    Quantize(4, method="gptq", min_tokens=1).apply(second, inputs_of(reference, second))
    assert all(torch.equal(a, b) for a, b in zip(qweights(ours).values(), qweights(reference).values()))
    stale = Quantize(4, method="gptq", min_tokens=1).apply(copy.deepcopy(model.blocks[1].moe), float_inputs)
    assert any(not torch.equal(a, b) for a, b in zip(qweights(stale).values(),
                                                      qweights(ours.blocks[1].moe).values()))


def test_compress_keeps_the_stage_report_as_details():
    torch.manual_seed(0)
    layer, x = TopKMoE(4, 32, 48, 16, k=2), correlated(300, 32)
    stage = Quantize(4, method="gptq")
    result = compress(layer, [ExpertPrune(0.25), stage], x)
    assert [r["details"] for r in result.records[:2]] == [None, None]
    assert result.records[2]["details"] == stage.last_report
    assert [r["module"] for r in stage.last_report] == ["experts.0", "experts.1", "experts.2", "output"]
    again = Quantize(4, method="gptq")
    compress(result.model, [again], x)  # nothing float is left to quantize
    assert again.last_report == []


def test_recipes():
    stages = [parse_recipe(item)[0][0] for item in ("gptq4", "gptq8-g32:all", "int4-g32")]
    assert [(s.method, s.bits, s.group_size, s.coverage) for s in stages] == \
        [("gptq", 4, None, "fallback"), ("gptq", 8, 32, "all"), ("rtn", 4, 32, "fallback")]
    assert normalize_recipe("prune-experts=.5, gptq8-g32:fallback") == "prune-experts=0.5,gptq8-g32"
    assert normalize_recipe(" gptq4:error") == "gptq4:error"
    assert stages[0].name == "int4 weights by GPTQ" and stages[0].per_layer
    for bad, match in [("gptq5", "bits must be one of"), ("int4:all", "after a gptq item"),
                       ("gptq4:some", "after a gptq item"), ("gptq4-g0", "group size must be in")]:
        with pytest.raises(ValueError, match=match):
            parse_recipe(bad)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="awq"), ValueError, "method must be one of"),
    (dict(coverage="some"), ValueError, "coverage"),
    (dict(min_tokens=0), ValueError, "min_tokens must be >= 1"), (dict(damp=-1.0), ValueError, "damp"),
    (dict(act_order=1), TypeError, "act_order must be a bool"),
    (dict(bits=5), ValueError, "bits must be one of"),
])
def test_bad_stage_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Quantize(**{"bits": 4, **kwargs})


def test_bad_calibration_inputs():
    layer = TopKMoE(4, 32, 48, 16)
    with pytest.raises(ValueError, match="last dimension 32"):
        Quantize(4, method="gptq").apply(layer, torch.randn(10, 31))
    with pytest.raises(ValueError, match="no mixture-of-experts layer"):
        Quantize(4, method="gptq").apply(nn.Sequential(nn.Linear(4, 4)), torch.randn(10, 4))
    accumulator = HessianAccumulator(4)
    with pytest.raises(ValueError, match="cannot weight them"):
        calibrate_sequentially(lambda: layer.experts[0](torch.randn(3, 32)), {"": layer.experts[0]},
                               lambda *a: a[1], lambda *a: None, weights=torch.ones(5))
    assert accumulator.count == 0


@pytest.mark.skipif(3 not in storage.SUPPORTED_BITS,
                    reason="QuantizedLinear does not store 3-bit weights yet (SUPPORTED_BITS lacks 3)")
def test_three_bit_gptq_halves_the_error_of_round_to_nearest():
    torch.manual_seed(0)
    layer = SwiGLUMoE(4, 64, 48, k=2)
    x = correlated(2000, 64)
    (gptq,), _ = parse_recipe("gptq3-g16")
    quantized = gptq.apply(copy.deepcopy(layer), x)
    rtn = Quantize(3, 16).apply(copy.deepcopy(layer), x)
    for ours, theirs in zip(experts_error(layer, quantized, x), experts_error(layer, rtn, x)):
        assert ours <= 0.5 * theirs
    assert all(m.bits == 3 for m in quantized.modules() if isinstance(m, QuantizedLinear))


def test_expert_contributions_are_zero_off_the_routed_tokens():
    torch.manual_seed(0)
    layer, x = TopKMoE(4, 16, 24, 8, k=2, activation="gelu"), torch.randn(50, 16)
    contributions = expert_contributions(layer, x)
    routed = slow_routed(layer, x)
    for e in range(4):
        off = [t for t in range(50) if t not in routed[e][0]]
        assert contributions[off, e].abs().max() == 0 and (contributions[routed[e][0], e] > 0).all()
    assert not math.isnan(float(contributions.sum()))


def test_hugging_face_blocks_take_the_gptq_stage_block_by_block():
    transformers = pytest.importorskip("transformers")
    from moe_lab.hf import compress_model, moe_blocks

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
        eos_token_id=None, bos_token_id=None, pad_token_id=None)
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    tokens = torch.randint(0, 96, (16, 24))
    with torch.no_grad():
        reference = model(tokens).logits
    errors = {}
    for name, stage in [("rtn", Quantize(4, 16)), ("gptq", Quantize(4, 16, method="gptq", min_tokens=8))]:
        compressed = compress_model(copy.deepcopy(model), [stage], tokens)
        assert all(isinstance(compressed.get_submodule(n).moe.experts[0].down_proj, QuantizedLinear)
                   for n in moe_blocks(compressed))
        with torch.no_grad():
            errors[name] = float((compressed(tokens).logits - reference).norm() / reference.norm())
    assert errors["gptq"] < errors["rtn"]


def test_gptq_after_other_stages():
    torch.manual_seed(0)
    layer, x = SwiGLUMoE(4, 32, 24, k=2), correlated(600, 32)
    stage = Quantize(8, 8, method="gptq")
    low = LowRank(rank=4).apply(copy.deepcopy(layer), x)
    quantized = stage.apply(copy.deepcopy(low), x)  # each factor quantized, in the order the expert runs them
    factors = quantized.experts[0].gate_up_proj
    assert isinstance(factors.U, QuantizedLinear) and factors.U.group_size == 8
    assert factors.V.group_size is None and factors.V.in_features == 4  # one group per row, as RTN
    with torch.no_grad():
        assert (quantized(x) - low(x)).norm() / low(x).norm() < 0.02
    with pytest.raises(ValueError, match="sparse"):
        stage.apply(MagnitudePrune(0.5).apply(copy.deepcopy(layer), x), x)
