"""Property tests of moe_lab.load on mutated artifacts: whatever is changed in config.json, the
safetensors header or the bytes, load() either returns exactly what the file holds or raises
ValueError (never another exception, never a silent cast)."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from moe_lab import LanguageModelMoE, TopKMoE, load, save
from moe_lab.compress import Quantize, compress
from moe_lab.data.paths import sha256

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-3, 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
    | st.sampled_from(["Linear", "TopKMoE", "QuantizedLinear", "cuda", "meta", "F16", "BF16", "I8", "U8"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """A quantized TopKMoE (float, int8 and float16 tensors) and a language model (tied weights)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("templates")
    quantized = compress(TopKMoE(4, 8, 16, 4, k=2), [Quantize(8)], torch.randn(16, 8)).model
    save(quantized, root / "quantized")
    save(LanguageModelMoE(20, num_experts=2, expert_size=8, embedding_dim=8, num_heads=2), root / "lm")
    return root


def paths(value, prefix=()):
    """Every path (tuple of keys / indices) into a JSON value, the root included."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from paths(item, prefix + (i,))


def mutate(document, data):
    """Apply one to three random edits (replace, delete, add a key) to a JSON document."""
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(list(paths(document))))
        if not where:
            document = data.draw(json_values)
            continue
        parent = document
        for step in where[:-1]:
            parent = parent[step]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[where[-1]] = data.draw(json_values)
        elif action == "delete":
            del parent[where[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=8))] = data.draw(json_values)
        else:
            parent.append(data.draw(json_values))
    return document


def check(folder: Path) -> None:
    """load() returns the file's exact tensors, or raises a ValueError naming the folder."""
    try:
        model = load(folder)
    except ValueError as error:
        assert str(folder) in str(error)
        return
    state, stored = model.state_dict(), load_file(str(folder / "model.safetensors"))
    for name, tensor in stored.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    assert not any(t.is_meta for t in state.values())


def copy_of(templates, which) -> Path:
    folder = Path(tempfile.mkdtemp())
    shutil.copytree(templates / which, folder, dirs_exist_ok=True)
    return folder


@FUZZ
@given(data=st.data(), which=st.sampled_from(["quantized", "lm"]))
def test_mutated_config(templates, data, which):
    folder = copy_of(templates, which)
    try:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(mutate(config, data)))
        check(folder)
    finally:
        shutil.rmtree(folder)


@FUZZ
@given(data=st.data(), which=st.sampled_from(["quantized", "lm"]))
def test_mutated_header_with_a_matching_checksum(templates, data, which):
    folder = copy_of(templates, which)
    try:
        weights = folder / "model.safetensors"
        raw = weights.read_bytes()
        length = int.from_bytes(raw[:8], "little")
        header = mutate(json.loads(raw[8:8 + length]), data)
        text = json.dumps(header).encode()
        weights.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length:])
        config = json.loads((folder / "config.json").read_text())
        config["weights_sha256"] = sha256(weights)  # a consistent edit: only the checks can catch it
        (folder / "config.json").write_text(json.dumps(config))
        check(folder)
    finally:
        shutil.rmtree(folder)


@FUZZ
@given(data=st.data(), which=st.sampled_from(["quantized", "lm"]))
def test_flipped_or_cut_bytes(templates, data, which):
    folder = copy_of(templates, which)
    try:
        target = folder / data.draw(st.sampled_from(["model.safetensors", "config.json"]))
        raw = bytearray(target.read_bytes())
        if data.draw(st.booleans()):
            position = data.draw(st.integers(0, len(raw) - 1))
            raw[position] ^= data.draw(st.integers(1, 255))
        else:
            raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
        target.write_bytes(bytes(raw))
        if target.name == "model.safetensors":  # the checksum no longer matches: always refused
            with pytest.raises(ValueError, match=str(folder)):
                load(folder)
        else:
            check(folder)
    finally:
        shutil.rmtree(folder)
