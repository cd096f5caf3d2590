"""The evaluation report: intervals, sizes, work, utilisation and the Pareto front."""

import copy
import math

import pytest
import torch

from moe_lab import DenseMoE, LanguageModelMoE, TopKMoE, model_bytes
from moe_lab.compress import quantize_experts
from moe_lab.evaluation import pareto_front, report
from moe_lab.stats import mean_interval, wilson_interval


def test_wilson_interval_matches_known_values():
    low, high = wilson_interval(8, 10)  # textbook value for 8/10 at 95%: (0.490, 0.943)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, 2)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 2, confidence=1.0)


def test_mean_interval():
    mean, low, high = mean_interval(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    half = 1.959964 * torch.tensor([1.0, 2.0, 3.0, 4.0]).std().item() / 2
    assert mean == 2.5
    assert low == pytest.approx(2.5 - half, rel=1e-4) and high == pytest.approx(2.5 + half, rel=1e-4)


def test_report_for_classifiers():
    torch.manual_seed(0)
    x, y = torch.randn(300, 64), torch.randint(0, 3, (300,))
    topk = TopKMoE(4, 64, 128, 3, k=1)
    quantized = quantize_experts(copy.deepcopy(topk), 8)
    table = report({"float": topk, "int8": quantized, "dense": DenseMoE(4, 64, 128, 3)}, (x, y))
    assert list(table.index) == ["float", "int8", "dense"]
    row = table.loc["float"]
    assert row["metric"] == "accuracy" and row["ci_low"] <= row["value"] <= row["ci_high"] and row["n"] == 300
    assert row["bytes"] == model_bytes(topk) and row["ratio"] == 1.0
    assert table.loc["int8", "ratio"] > 2.5
    assert table.loc["float", "flops_per_token"] < table.loc["dense", "flops_per_token"]
    assert sum(row["expert_share"]["moe"]) == pytest.approx(1.0, abs=1e-3)
    assert 0 <= row["utilisation"] <= 1 and row["latency_ms"] > 0


def test_report_for_a_language_model():
    torch.manual_seed(0)
    model = LanguageModelMoE(50, num_experts=2, expert_size=16, embedding_dim=16, num_heads=2, num_layers=2)
    tokens = torch.randint(0, 50, (6, 9))
    table = report({"lm": model}, (tokens[:, :-1], tokens[:, 1:]), task="language_model")
    row = table.loc["lm"]
    assert row["metric"] == "perplexity" and row["ci_low"] <= row["value"] <= row["ci_high"]
    assert row["value"] == pytest.approx(50, rel=0.3)  # untrained: close to uniform
    assert set(row["expert_share"]) == {"blocks.0.moe", "blocks.1.moe"} and not math.isnan(row["utilisation"])


def test_pareto_front():
    sizes, scores = [10, 20, 30, 15, 25], [0.5, 0.7, 0.9, 0.4, 0.7]
    assert pareto_front(sizes, scores) == [0, 1, 2]
    assert pareto_front(sizes, scores, higher_is_better=False) == [0, 3]
    with pytest.raises(ValueError, match="differ in length"):
        pareto_front([1], [1, 2])


def test_bad_arguments():
    with pytest.raises(TypeError, match="non-empty dict"):
        report([], (torch.zeros(2, 3), torch.zeros(2)))
    with pytest.raises(ValueError, match="task must be one of"):
        report({"m": DenseMoE(2, 3, 4, 2)}, (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)), task="x")


def test_moe_lab_evaluate_is_the_function_and_report_lives_in_evaluation():
    import moe_lab
    import moe_lab.evaluation

    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    model = DenseMoE(2, 4, 4, 3)
    assert moe_lab.evaluate is moe_lab.training.evaluate and moe_lab.evaluation.report is report
    assert moe_lab.evaluate(model, (x, y))["accuracy"] == moe_lab.training.evaluate(model, (x, y))["accuracy"]
