"""The course's model builders and profile training options: one definition for notebooks and study."""

import inspect
import tempfile
from pathlib import Path

import pytest
import torch

from moe_lab import TopKMoE, load, save, train
from moe_lab.data import load_wikitext2
from moe_lab.layers.dense import DenseMoE
from moe_lab.models import (
    ContextFreeLM,
    ImageClassifierMoE,
    LanguageModelMoE,
    build_context_free_lm,
    build_image_classifier,
    build_language_model,
)
from moe_lab.profiles import PROFILES, TRAIN_TASKS, get_profile


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_image_classifier_follows_the_profile(name):
    profile = get_profile(name)
    model = build_image_classifier(profile)
    assert isinstance(model, ImageClassifierMoE) and isinstance(model.moe, TopKMoE)
    cfg = model.config
    assert (cfg["num_experts"], cfg["expert_size"], cfg["channels"], cfg["hidden_size"], cfg["k"]) == (
        profile.cifar_num_experts, profile.cifar_expert_size, list(profile.cifar_channels),
        profile.cifar_hidden_size, profile.cifar_k)
    assert model.moe.config["balance_loss_weight"] == profile.cifar_balance_loss_weight > 0
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    smaller = build_image_classifier(profile, num_experts=2, expert_size=8)
    assert smaller.moe.num_experts == 2 and smaller.config["channels"] == cfg["channels"]


def test_image_classifier_without_routing_has_no_balance_options():
    dense = build_image_classifier(get_profile("ci"), moe="soft", moe_options=None)
    assert isinstance(dense.moe, DenseMoE)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_language_models_follow_the_profile(name):
    profile = get_profile(name)
    model = build_language_model(profile, 97)
    assert isinstance(model, LanguageModelMoE)
    cfg = model.config
    fields = ["embedding_dim", "num_layers", "num_heads", "num_experts", "expert_size", "k", "dropout",
              "tie_weights"]
    assert [cfg[f] for f in fields] == [getattr(profile, f"lm_{f}") for f in fields]
    assert cfg["context_size"] == profile.lm_context
    assert cfg["moe_options"] == {"balance_loss_weight": profile.lm_balance_loss_weight}
    baseline = build_context_free_lm(profile, 97)
    assert isinstance(baseline.moe, DenseMoE)
    assert baseline.embedding.embedding_dim == profile.lm_embedding_dim
    assert (baseline.moe.num_experts, baseline.moe.config["expert_size"]) == (
        profile.lm_num_experts, profile.lm_expert_size)


def test_context_free_lm_sees_only_the_current_token():
    torch.manual_seed(0)
    model = ContextFreeLM(50, num_experts=3, expert_size=8, embedding_dim=6).eval()
    tokens = torch.randint(0, 50, (3, 7))
    changed = tokens.clone()
    changed[:, :-1] = (changed[:, :-1] + 1) % 50  # every token but the last
    with torch.no_grad():
        a, b = model(tokens), model(changed)
        reference = torch.stack([model.output(model.moe(model.embedding.weight[t]))
                                 for t in tokens.flatten()])
    assert a.shape == (3, 7, 50)
    torch.testing.assert_close(a[:, -1], b[:, -1])  # the last position only sees the last token
    torch.testing.assert_close(a.reshape(-1, 50), reference)
    with pytest.raises(TypeError, match="int64"):
        model(torch.randn(2, 3))


def test_context_free_lm_learns_bigrams_and_survives_save_load():
    torch.manual_seed(0)
    successor = torch.randperm(12)  # a deterministic next token for every token: a pure bigram language
    stream = [0]
    for _ in range(16 * 8):
        stream.append(int(successor[stream[-1]]))
    ids = torch.tensor(stream)
    x, y = ids[:-1].view(16, 8), ids[1:].view(16, 8)
    model = ContextFreeLM(12, num_experts=2, expert_size=16, embedding_dim=16)
    losses = train(model, (x, y), epochs=150, lr=1e-2, batch_size=16, task="language_model", progress=False)
    assert losses[-1] < 0.1 * losses[0]
    with tempfile.TemporaryDirectory() as folder:
        again = load(save(model, Path(folder) / "lm"))
    assert isinstance(again, ContextFreeLM)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_builders_reject_a_profile_name():
    for build in (build_image_classifier, lambda p: build_language_model(p, 10),
                  lambda p: build_context_free_lm(p, 10)):
        with pytest.raises(TypeError, match="profile"):
            build("ci")


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_train_options_are_arguments_of_train(name):
    profile = get_profile(name)
    accepted = set(inspect.signature(train).parameters)
    for task in TRAIN_TASKS:
        options = profile.train_options(task)
        assert set(options) <= accepted and "task" not in options
    assert profile.train_options("synthetic")["schedule"] is True  # trained to convergence (notebooks 09, 10)
    assert profile.train_options("wikitext2")["max_steps"] == profile.lm_steps
    assert set(profile.wikitext_options()) <= set(inspect.signature(load_wikitext2).parameters)
    with pytest.raises(ValueError, match="task must be one of"):
        profile.train_options("mnist")


def test_study_builds_the_same_models(data_dir):
    from moe_lab.study import build_task

    profile = get_profile("ci")
    cifar = build_task("cifar10", profile, data_dir)
    assert cifar.make_model().config == build_image_classifier(profile).config
    assert cifar.train_options == profile.train_options("cifar10")
    text = load_wikitext2(data_dir, **profile.wikitext_options(), verbose=False)
    lm = build_task("wikitext2", profile, data_dir)
    assert lm.make_model().config == build_language_model(profile, len(text.vocab)).config
    assert torch.equal(lm.train_data[0].flatten(), text.train[:lm.train_data[0].numel()])
