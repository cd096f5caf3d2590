"""The hybrid pipeline: stages compose, keep trained weights, and are measured."""

import pytest
import torch

from moe_lab import DenseMoE, ImageClassifierMoE, TopKMoE, evaluate, load, save, seed_everything, train
from moe_lab.compress import (
    ExpertPrune,
    FineTune,
    LowRank,
    MagnitudePrune,
    MergeExperts,
    Quantize,
    compress,
)
from moe_lab.data import make_clustered_task
from moe_lab.measure import model_bytes, moe_bytes


@pytest.fixture(scope="module")
def trained():
    task = make_clustered_task(2000, 600, num_clusters=4, input_size=32, seed=3)
    seed_everything(0)
    layer = TopKMoE(8, 32, 64, 4, k=2, balance_loss_weight=0.01)
    train(layer, task.train, epochs=15, lr=3e-3, batch_size=64, progress=False)
    return layer, task


def test_stages_compose_and_report_every_stage(trained, tmp_path):
    layer, task = trained
    score = lambda m: evaluate(m, task.test)["accuracy"]  # noqa: E731
    report = compress(layer, [ExpertPrune(0.25), LowRank(rank=8), Quantize(8),
                              FineTune(task.train, epochs=2, lr=1e-3, batch_size=64)],
                      calibration=task.x_train[:512], evaluate=score)
    stages = [r["stage"] for r in report.records]
    assert stages[0] == "original" and len(stages) == 5
    ratios = [r["moe_ratio"] for r in report.records]
    assert ratios == sorted(ratios) and ratios[-2] > 4
    assert report.records[0]["metric"] == pytest.approx(score(layer))
    assert report.records[-1]["metric"] > report.records[0]["metric"] - 0.1
    assert report.model.num_experts == 6
    assert "MoE ratio" in report.table()
    loaded = load(save(report.model, tmp_path))
    x = task.x_test[:50]
    with torch.no_grad():
        assert torch.equal(loaded(x), report.model(x))
    assert layer.num_experts == 8  # the original is untouched


def test_deck_style_random_low_rank_destroys_what_svd_keeps(trained):
    layer, task = trained
    score = lambda m: evaluate(m, task.test)["accuracy"]  # noqa: E731
    svd = compress(layer, [LowRank(rank=8)], task.x_train[:256], score).records[-1]["metric"]
    random_init = TopKMoE(8, 32, 64, 4, k=2)
    random_init.load_state_dict(layer.state_dict())
    from moe_lab.layers.compact.lowrank import LowRankLinear
    for i in range(8):
        random_init.experts[i] = LowRankLinear(32, 64, 8)  # the deck: fresh factors, trained weights lost
    assert svd > score(random_init) + 0.2


def test_magnitude_and_merge_stages_on_an_image_model():
    model = ImageClassifierMoE(num_experts=4, channels=(8,), expert_size=32, hidden_size=16, moe="soft")
    images = torch.randn(8, 3, 32, 32)
    report = compress(model, [MergeExperts(2), MagnitudePrune(0.8)], images)
    assert report.model.moe.num_experts == 2
    assert report.records[-1]["moe_bytes"] == moe_bytes(report.model) < report.records[0]["moe_bytes"] / 4
    assert model_bytes(report.model) < model_bytes(model)


def test_bad_pipelines():
    with pytest.raises(ValueError, match="no mixture-of-experts layer"):
        compress(torch.nn.Linear(3, 3), [Quantize()], torch.randn(2, 3))
    with pytest.raises(TypeError, match="compression stages"):
        compress(DenseMoE(2, 3, 4, 2), ["quantize"], torch.randn(2, 3))
    with pytest.raises(ValueError, match="bits must be one of"):
        compress(DenseMoE(2, 4, 4, 2), [Quantize(5)], torch.randn(2, 4))
    with pytest.raises(ValueError, match="fraction must be a number in"):
        compress(DenseMoE(2, 4, 4, 2), [ExpertPrune(1.0)], torch.randn(2, 4))
    with pytest.raises(ValueError, match="does not shrink"):
        compress(DenseMoE(2, 4, 4, 2), [LowRank(rank=3)], torch.randn(2, 4))


def test_stage_orders_that_cannot_work_fail_loudly():
    layer = DenseMoE(2, 8, 16, 4)
    with pytest.raises(ValueError, match="'int8' cannot come after 'sparsity=0.5'.*leaves them sparse"):
        compress(layer, [MagnitudePrune(0.5), Quantize(8)], torch.randn(4, 8))
    with pytest.raises(ValueError, match="leaves them quantized"):
        compress(layer, [Quantize(8), MagnitudePrune(0.5)], torch.randn(4, 8))
    compress(layer, [MagnitudePrune(0.5, sparse_storage=False), Quantize(8)], torch.randn(4, 8))  # fine
