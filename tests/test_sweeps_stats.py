import copy
import math

import pytest
import torch

from moe_lab import ImageClassifierMoE, evaluate
from moe_lab.compress import quantize_experts
from moe_lab.layers.topk import TopKMoE
from moe_lab.stats import mcnemar_p, n_for_difference, per_class_accuracy, two_proportion_p, verdict
from moe_lab.sweeps import FeatureCache, run_sweep, sweep_table, to_topk


@pytest.fixture
def setup():
    model = ImageClassifierMoE(3, 4, 16, channels=(4,), pool_size=2, hidden_size=8).eval()
    images, targets = torch.randn(40, 3, 8, 8), torch.randint(0, 3, (40,))
    return model, images, targets


def test_feature_cache_matches_evaluate(setup):
    model, images, targets = setup
    cache = FeatureCache(model, images, targets, batch_size=16)
    quantized = quantize_experts(copy.deepcopy(model), 4)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned.features[0].weight.mul_(-1)  # conv changed: the cache must run it in full
    for m in (model, quantized, tuned):
        assert cache(m) == evaluate(m, (images, targets))["accuracy"]
    assert cache.predictions(tuned).shape == (40,)
    with pytest.raises(TypeError):
        FeatureCache(torch.nn.Linear(2, 2), images, targets)
    with pytest.raises(ValueError):
        FeatureCache(model, images, targets[:5])


def test_per_class_accuracy():
    correct = torch.tensor([True, False, True, True])
    targets = torch.tensor([0, 0, 1, 2])
    assert per_class_accuracy(correct, targets, 4).tolist() == [0.5, 1.0, 1.0, 0.0]


def test_mcnemar():
    a = torch.tensor([True] * 10 + [False] * 10)
    assert mcnemar_p(a, a) == 1.0
    b = torch.tensor([False] * 10 + [False] * 10)  # a right on 10, never the reverse
    assert mcnemar_p(a, b) == pytest.approx(2 / 2 ** 10)
    assert mcnemar_p(b, a) == mcnemar_p(a, b)
    with pytest.raises(ValueError):
        mcnemar_p(a, a[:3])


def test_significance_helpers():
    assert two_proportion_p(0.8, 0.8, 100) == 1.0
    assert two_proportion_p(0.9, 0.5, 1000) < 1e-6
    assert two_proportion_p(0.40, 0.395, 500) > 0.5
    n = n_for_difference(0.4, 0.005)
    assert 70_000 < n < 75_000
    assert two_proportion_p(0.4, 0.395, n) == pytest.approx(0.05, abs=0.002)
    for bad in [(0.0, 0.01), (0.5, 0.0)]:
        with pytest.raises(ValueError):
            n_for_difference(*bad)
    with pytest.raises(ValueError):
        two_proportion_p(0.5, 0.5, 0)


def test_to_topk_same_weights(setup):
    model, images, _ = setup
    full = to_topk(model, 4)  # all experts: the same function as the dense mixture
    assert isinstance(full.moe, TopKMoE) and full.config["moe"] == "topk"
    torch.testing.assert_close(full(images), model(images), atol=1e-5, rtol=1e-5)
    one = to_topk(model, 1)
    assert one.moe.k == 1 and model.config["moe"] == "soft"  # the original is untouched
    with pytest.raises(ValueError):
        to_topk(model, 5)
    with pytest.raises(TypeError):
        to_topk(model.features, 1)


def test_to_topk_changes_k_of_a_routed_model():
    torch.manual_seed(0)
    routed = ImageClassifierMoE(10, num_experts=4, expert_size=8, channels=(4,), hidden_size=8, moe="topk",
                                k=2, moe_options={"balance_loss_weight": 0.01}).eval()
    images = torch.randn(6, 3, 32, 32)
    one, every = to_topk(routed, 1), to_topk(routed, 4)
    assert one.moe.k == 1 and one.config["k"] == 1 and routed.moe.k == 2  # the original is untouched
    assert one.moe.config["balance_loss_weight"] == 0.01
    torch.testing.assert_close(to_topk(routed, 2)(images), routed(images))
    with torch.no_grad():  # every expert: the softmax over all gates, as a dense mixture of the same weights
        feats = routed.embed(images)
        gates = routed.moe.gating(feats).softmax(-1)
        hidden = torch.stack([torch.relu(e(feats)) for e in routed.moe.experts], 1)
        want = routed.classifier(torch.relu(routed.moe.output((gates[..., None] * hidden).sum(1))))
    torch.testing.assert_close(every(images), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(one(images), routed(images))


def test_run_sweep_and_table(setup):
    model, images, targets = setup
    cache = FeatureCache(model, images, targets)
    results = run_sweep(model, ["int8", "prune-experts=0.5,finetune=1"], images[:16], cache,
                        (images, targets), lr=1e-3, batch_size=8)
    table = sweep_table(results)
    assert list(table.index) == ["original", "int8", "prune-experts=0.5,finetune=1"]
    assert table.loc["prune-experts=0.5,finetune=1", "stages"] == 2
    assert (table["bytes"].iloc[1:] < table.loc["original", "bytes"]).all()
    assert table.loc["int8", "accuracy"] == evaluate(results["int8"].model, (images, targets))["accuracy"]
    with pytest.raises(ValueError, match="finetune_data"):
        run_sweep(model, ["int8,finetune=1"], images[:16], cache)
    with pytest.raises(ValueError):
        run_sweep(model, ["bogus"], images[:16], cache)
    with pytest.raises(ValueError):
        run_sweep(model, [], images[:16], cache)


def test_verdict():
    assert verdict(True) == "held" and verdict(False) == "did not hold" and verdict(None) == "n/a here"


def test_compare_against_a_slow_reference():
    from moe_lab.stats import compare

    g = torch.Generator().manual_seed(0)
    a = (torch.rand(400, generator=g) < 0.7).float()
    b = a.clone()
    b[:40] = 1.0  # b fixes 40 items a got wrong or keeps them right: never worse
    result = compare(a, b)
    only_b = int(((b == 1) & (a == 0)).sum())
    # slow reference: exact two-sided binomial test on the discordant pairs (none go the other way)
    p_ref = min(1.0, 2 * sum(math.comb(only_b, i) for i in range(0 + 1)) / 2 ** only_b)
    assert only_b > 5 and abs(result.p - p_ref) < 1e-12 and result.outcome == "better"
    assert abs(result.difference - only_b / 400) < 1e-12 and result.low < result.difference < result.high
    assert compare(b, a).outcome == "worse"
    assert compare(a, a).outcome == "no clear difference" and compare(a, a).within(1e-9)
    # continuous losses: lower is better; a tiny noisy shift is not called a difference
    loss_a = torch.rand(500, generator=g)
    shifted = loss_a - 0.2
    noisy = loss_a + 1e-3 * torch.randn(500, generator=g).sign()
    assert compare(loss_a, shifted, higher_is_better=False).outcome == "better"
    assert compare(loss_a, noisy, higher_is_better=False).outcome == "no clear difference"
    mean_ref = float((shifted.double() - loss_a.double()).mean())
    assert abs(compare(loss_a, shifted, higher_is_better=False).difference - mean_ref) < 1e-12
    assert "better" in str(compare(loss_a, shifted, higher_is_better=False))
    with pytest.raises(ValueError, match="same number"):
        compare(a, b[:-1])
    with pytest.raises(ValueError, match="finite"):
        compare(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 0.0]))
