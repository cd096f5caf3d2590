"""Router fidelity against a per-token loop; pruned models matched by router rows; the evaluation
report's columns; compress() records; the study's report.json."""

import copy
import json
import math

import pytest
import torch

from moe_lab import DenseMoE, LanguageModelMoE, TopKMoE
from moe_lab.compress import ExpertPrune, Quantize, compress, prune_experts
from moe_lab.evaluation import report
from moe_lab.fidelity import compare_routing, router_fidelity, routing_of


def slow_fidelity(reference, model, x, keep=None):
    """Per token: share of the reference's top-k kept, KL(p_ref over kept experts || p), set changed."""
    keep = list(range(reference.num_experts)) if keep is None else keep
    agreement, kl, changed = [], [], []
    router, new_router = copy.deepcopy(reference.gating).double(), copy.deepcopy(model.gating).double()
    with torch.no_grad():
        for token in x.double():
            p_ref = torch.softmax(router(token), 0)
            p = torch.softmax(new_router(token), 0)
            k = 1 if reference.DENSE else reference.k
            ref_set = set(sorted(range(len(p_ref)), key=lambda e: -float(p_ref[e]))[:k])
            new_set = {keep[e] for e in sorted(range(len(p)), key=lambda e: -float(p[e]))[:k]}
            agreement.append(len(ref_set & new_set) / k)
            changed.append(float(ref_set != new_set))
            q = p_ref[keep] / p_ref[keep].sum()
            kl.append(float((q * (q.log() - p.log())).sum()))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {"agreement": mean(agreement), "kl": mean(kl), "changed": mean(changed)}


def perturbed(layer, scale=0.3, seed=1):
    other = copy.deepcopy(layer)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        other.gating.weight.add_(scale * torch.randn(other.gating.weight.shape, generator=g))
    return other


@pytest.mark.parametrize("make", [lambda: TopKMoE(6, 16, 8, 4, k=2), lambda: TopKMoE(6, 16, 8, 4, k=1),
                                  lambda: DenseMoE(5, 16, 8, 4)])
def test_fidelity_matches_a_per_token_loop(make):
    torch.manual_seed(0)
    layer, x = make(), torch.randn(300, 16)
    other = perturbed(layer)
    ours = router_fidelity(layer, other, x, batch_size=64)
    expected = slow_fidelity(layer, other, x)
    for key in ("agreement", "kl", "changed"):
        assert ours[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7)
        assert ours["layers"][""][key] == ours[key]
    assert 0 < ours["changed"] < 1 and ours["kl"] > 0
    same = router_fidelity(layer, copy.deepcopy(layer), x)
    assert (same["agreement"], same["kl"], same["changed"]) == (1.0, 0.0, 0.0)


def test_pruned_experts_are_matched_by_their_router_rows():
    torch.manual_seed(0)
    layer, x = TopKMoE(6, 16, 8, 4, k=2), torch.randn(300, 16)
    keep = [0, 2, 3, 5]
    pruned = prune_experts(layer, keep)
    ours = router_fidelity(layer, pruned, x)
    expected = slow_fidelity(layer, pruned, x, keep)
    for key in ("agreement", "kl", "changed"):
        assert ours[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7)
    assert ours["kl"] == pytest.approx(0, abs=1e-6)  # pruning only renormalises the kept experts
    assert ours["changed"] > 0
    shuffled = prune_experts(layer, [5, 0, 3, 2])  # same experts, another order: same result
    assert router_fidelity(layer, shuffled, x)["agreement"] == pytest.approx(ours["agreement"])


def test_layers_are_averaged_and_mismatches_refused():
    torch.manual_seed(0)
    model = LanguageModelMoE(30, num_experts=4, expert_size=8, embedding_dim=16, num_layers=2, num_heads=2,
                             context_size=8).eval()
    tokens = torch.randint(0, 30, (10, 8))
    other = copy.deepcopy(model)
    other.blocks[1].moe.gating = perturbed(other.blocks[1].moe).gating
    result = router_fidelity(model, other, tokens)
    assert result["layers"]["blocks.0.moe"]["agreement"] == 1.0
    assert result["layers"]["blocks.1.moe"]["agreement"] < 1.0
    assert result["agreement"] == pytest.approx((1 + result["layers"]["blocks.1.moe"]["agreement"]) / 2)
    with pytest.raises(ValueError, match="mixture layers differ"):
        compare_routing(routing_of(model, tokens), routing_of(model.blocks[0].moe, torch.randn(5, 16)))
    with pytest.raises(ValueError, match="same inputs"):
        compare_routing(routing_of(model, tokens), routing_of(model, tokens[:5]))
    with pytest.raises(ValueError, match="no mixture-of-experts layer"):
        routing_of(torch.nn.Linear(3, 3), torch.randn(2, 3))


def test_report_puts_fidelity_next_to_the_metric():
    torch.manual_seed(0)
    layer = TopKMoE(6, 32, 32, 3, k=2)
    x, y = torch.randn(200, 32), torch.randint(0, 3, (200,))
    other = perturbed(layer)
    table = report({"float": layer, "perturbed": other, "linear": torch.nn.Linear(32, 3)}, (x, y))
    columns = list(table.columns)
    assert columns[columns.index("n") + 1:columns.index("n") + 4] == ["router_agreement", "router_kl",
                                                                      "router_changed"]
    assert table.loc["float", "router_agreement"] == 1.0 and table.loc["float", "router_kl"] == 0.0
    expected = router_fidelity(layer, other, x)
    assert table.loc["perturbed", "router_changed"] == pytest.approx(expected["changed"])
    assert math.isnan(table.loc["linear", "router_agreement"])  # no mixture layer to compare
    again = report({"float": layer, "perturbed": other}, (x, y), reference="perturbed")
    assert again.loc["perturbed", "router_agreement"] == 1.0
    with pytest.raises(ValueError, match="reference must name one of"):
        report({"float": layer}, (x, y), reference="int8")


def test_compress_records_fidelity_per_stage():
    torch.manual_seed(0)
    layer, x = TopKMoE(6, 32, 32, 3, k=2), torch.randn(200, 32)
    result = compress(layer, [Quantize(4), ExpertPrune(0.5)], x, fidelity_inputs=x)
    original, quantized, pruned = result.records
    assert [original[f"router_{key}"] for key in ("agreement", "kl", "changed")] == [1.0, 0.0, 0.0]
    assert quantized["router_agreement"] == 1.0  # the experts changed, the router (first layer) did not
    assert pruned["router_changed"] == pytest.approx(router_fidelity(layer, result.model, x)["changed"])
    assert "routing kept" in result.table()
    plain = compress(layer, [Quantize(4)], x)
    assert plain.records[1]["router_agreement"] is None and "routing kept" not in plain.table()


def test_study_report_has_router_fidelity_per_stage(tmp_path):
    from moe_lab import save
    from moe_lab.profiles import get_profile
    from moe_lab.study import build_task, run_study

    torch.manual_seed(0)
    base = save(build_task("synthetic", get_profile("ci")).make_model(), tmp_path / "base")  # untrained: fast
    result = run_study("synthetic", ["prune-experts=0.25:reap,gptq8:all"], tmp_path / "out", profile="ci",
                       base=base, progress=False)
    stages = result["recipes"][0]["stages"]
    assert stages[0]["router_agreement"] == 1.0 and stages[1]["router_agreement"] < 1.0
    assert stages[2]["details"][0]["method"] == "gptq"
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["recipes"][0]["stages"][1]["router_changed"] == stages[1]["router_changed"]
