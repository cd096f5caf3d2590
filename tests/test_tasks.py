"""moe_lab.tasks: one definition per task; trained base models cached by all that decides them."""

import dataclasses
import json

import pytest
import torch

from moe_lab import get_profile, seed_everything, train
from moe_lab.tasks import Task, build_task, cache_key, trained_model


@pytest.fixture
def task():
    profile = dataclasses.replace(get_profile("ci"), synthetic_train=256, synthetic_test=64,
                                  synthetic_epochs=1)
    return build_task("synthetic", profile)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_trained_model_is_what_a_notebook_would_train(task, tmp_path):
    got = trained_model(task, seed=3, folder=tmp_path)
    seed_everything(3)
    reference = task.make_model()
    train(reference, task.train_data, task=task.kind, progress=False, seed=3, **task.train_options)
    assert got.source == "trained" and not got.model.training
    assert _same_weights(got.model, reference)


def test_second_call_loads_the_same_weights_from_the_cache(task, tmp_path):
    first = trained_model(task, folder=tmp_path)
    second = trained_model(task, folder=tmp_path)
    assert (first.source, second.source) == ("trained", "cache")
    assert second.path == first.path and second.seconds == pytest.approx(first.seconds)
    assert second.losses == pytest.approx(first.losses)
    assert _same_weights(first.model, second.model)


def test_key_changes_with_profile_seed_and_task(task):
    slower = dataclasses.replace(task.profile, synthetic_lr=task.profile.synthetic_lr / 2)
    other_profile = build_task("synthetic", slower)
    assert cache_key(task) != cache_key(other_profile)
    assert cache_key(task, seed=0) != cache_key(task, seed=1)
    assert cache_key(task) == cache_key(build_task("synthetic", task.profile))


def test_damaged_cache_is_retrained_with_a_warning(task, tmp_path):
    first = trained_model(task, folder=tmp_path)
    weights = first.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="does not load"):
        again = trained_model(task, folder=tmp_path)
    assert again.source == "trained" and _same_weights(again.model, first.model)
    assert trained_model(task, folder=tmp_path).source == "cache"


def test_cache_off_trains_and_writes_nothing(task, tmp_path, monkeypatch):
    assert trained_model(task, cache=False, folder=tmp_path).path is None
    monkeypatch.setenv("MOE_LAB_BASE_CACHE", "0")
    assert trained_model(task, folder=tmp_path).source == "trained"
    assert not any(tmp_path.iterdir())
    monkeypatch.setenv("MOE_LAB_BASE_CACHE", "maybe")
    with pytest.raises(ValueError, match="MOE_LAB_BASE_CACHE"):
        trained_model(task, folder=tmp_path)


def test_training_record_is_json(task, tmp_path):
    path = trained_model(task, folder=tmp_path).path
    info = json.loads((path / "training.json").read_text())
    assert set(info) == {"seconds", "losses"}


def test_bad_arguments_name_the_parameter(task):
    with pytest.raises(ValueError, match="task must be one of"):
        build_task("imagenet", task.profile)
    with pytest.raises(TypeError, match="profile"):
        build_task("synthetic", "ci")
    with pytest.raises(TypeError, match="task"):
        trained_model("synthetic")
    with pytest.raises(TypeError, match="seed"):
        trained_model(task, seed=1.5)


def test_task_records_its_profile(task):
    assert isinstance(task, Task) and task.profile.name == "ci" and task.metric == "accuracy"
