"""save/load round trips: bitwise-equal outputs, no pickle, clear errors on damage."""

import json

import pytest
import torch

from moe_lab import (
    DenseMoE,
    ImageClassifierMoE,
    LanguageModelMoE,
    LowRankLinear,
    SharedTrunkMoE,
    TopKMoE,
    load,
    model_bytes,
    save,
)

CASES = [
    (lambda: DenseMoE(3, 8, 16, 4, activation="relu"), lambda: torch.randn(5, 8)),
    (lambda: TopKMoE(4, 8, 16, 4, k=2, capacity_factor=1.5, balance_loss_weight=0.01),
     lambda: torch.randn(5, 8)),
    (lambda: TopKMoE(4, 8, 16, 4, k=1, noisy_gating=True), lambda: torch.randn(5, 8)),
    (lambda: SharedTrunkMoE(3, 8, 16, 4, shared_size=6), lambda: torch.randn(5, 8)),
    (lambda: LowRankLinear(8, 6, rank=2), lambda: torch.randn(5, 8)),
    (lambda: ImageClassifierMoE(channels=(8, 16), expert_size=16, hidden_size=16, moe="topk"),
     lambda: torch.randn(2, 3, 32, 32)),
    (lambda: LanguageModelMoE(50, num_experts=2, expert_size=16, embedding_dim=16, num_heads=2),
     lambda: torch.randint(0, 50, (2, 9))),
]


@pytest.mark.parametrize("make, example", CASES)
def test_round_trip_gives_bitwise_identical_outputs(tmp_path, make, example):
    model = make().eval()
    x = example()
    save(model, tmp_path / "artifact")
    loaded = load(tmp_path / "artifact")
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    files = sorted(p.name for p in (tmp_path / "artifact").iterdir())
    assert files == ["config.json", "model.safetensors"]
    assert model_bytes(model) == sum(p.stat().st_size for p in (tmp_path / "artifact").iterdir())


def test_tied_weights_stay_tied_after_load(tmp_path):
    model = LanguageModelMoE(40, num_experts=2, expert_size=8, embedding_dim=8, num_heads=2)
    loaded = load(save(model, tmp_path))
    assert loaded.output.weight is loaded.embedding.weight
    aliases = json.loads((tmp_path / "config.json").read_text())["aliases"]
    assert aliases == {"output.weight": "embedding.weight"}


def test_truncated_weights_give_a_clear_error(tmp_path):
    save(DenseMoE(3, 8, 16, 4), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="damaged or truncated"):
        load(tmp_path)


def test_edited_config_gives_a_clear_error(tmp_path):
    save(DenseMoE(3, 8, 16, 4), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["config"]["expert_size"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match the config"):
        load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(tmp_path)
    config["class"] = "os.system"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="cannot rebuild class"):
        load(tmp_path)


def test_missing_artifact_and_bad_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a moe_lab artifact"):
        load(tmp_path)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        save("not a model", tmp_path)
