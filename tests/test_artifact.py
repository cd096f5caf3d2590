"""save/load round trips: bitwise-equal outputs in every dtype, no pickle, no network, and a
ValueError naming the file and the field for every kind of damage."""

import json
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import save_file

from moe_lab import (
    DenseMoE,
    ImageClassifierMoE,
    LanguageModelMoE,
    LowRankLinear,
    SharedTrunkMoE,
    SlotSoftMoE,
    SwiGLUMoE,
    TopKMoE,
    artifact,
    load,
    model_bytes,
    save,
)
from moe_lab.compress import ExpertPrune, LowRank, MagnitudePrune, MergeExperts, Quantize, compress
from moe_lab.compress.share import base_delta_experts

CASES = [
    (lambda: DenseMoE(3, 8, 16, 4, activation="relu"), lambda: torch.randn(5, 8)),
    (lambda: TopKMoE(4, 8, 16, 4, k=2, capacity_factor=1.5, balance_loss_weight=0.01),
     lambda: torch.randn(5, 8)),
    (lambda: TopKMoE(4, 8, 16, 4, k=1, noisy_gating=True), lambda: torch.randn(5, 8)),
    (lambda: SharedTrunkMoE(3, 8, 16, 4, shared_size=6), lambda: torch.randn(5, 8)),
    (lambda: SlotSoftMoE(4, 2, 8, 16, 4), lambda: torch.randn(2, 5, 8)),
    (lambda: SwiGLUMoE(4, 8, 16, k=2), lambda: torch.randn(5, 8)),
    (lambda: LowRankLinear(8, 6, rank=2), lambda: torch.randn(5, 8)),
    (lambda: ImageClassifierMoE(channels=(8, 16), expert_size=16, hidden_size=16, moe="topk"),
     lambda: torch.randn(2, 3, 32, 32)),
    (lambda: LanguageModelMoE(50, num_experts=2, expert_size=16, embedding_dim=16, num_heads=2),
     lambda: torch.randint(0, 50, (2, 9))),
]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (compares floats bitwise, nan and -0.0 included)."""
    return tensor.detach().contiguous().view(-1).view(torch.uint8)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(bits(sa[k]), bits(sb[k]))
        for k in sa)


@pytest.mark.parametrize("make, example", CASES)
def test_round_trip_gives_bitwise_identical_outputs(tmp_path, make, example):
    model = make().eval()
    x = example()
    save(model, tmp_path / "artifact")
    loaded = load(tmp_path / "artifact")
    assert type(loaded) is type(model) and same_state(loaded, model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    files = sorted(p.name for p in (tmp_path / "artifact").iterdir())
    assert files == ["config.json", "model.safetensors"]
    assert model_bytes(model) == sum(p.stat().st_size for p in (tmp_path / "artifact").iterdir())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("make, example", [CASES[1], CASES[7], CASES[8]])
def test_load_restores_each_saved_dtype_bitwise(tmp_path, dtype, make, example):
    model = make().to(dtype).eval()
    loaded = load(save(model, tmp_path))
    assert same_state(loaded, model)  # float tensors in their dtype, integer ones (BatchNorm counters) int64
    assert {t.dtype for t in loaded.parameters()} == {dtype}
    x = example()
    x = x.to(dtype) if x.is_floating_point() else x
    with torch.no_grad():
        assert torch.equal(bits(loaded(x)), bits(model(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_models_round_trip(tmp_path, dtype):
    model = TopKMoE(8, 16, 32, 4, k=2).to(dtype)
    x = torch.randn(64, 16, dtype=dtype)
    recipes = [[ExpertPrune(0.25), LowRank(rank=4), Quantize(4, group_size=4)],
               [MergeExperts(4), Quantize(8)]]
    recipes += [[MagnitudePrune(0.5)]] if dtype == torch.float32 else []  # sparse storage is float32-only
    for i, stages in enumerate(recipes):
        compressed = compress(model, stages, x).model
        loaded = load(save(compressed, tmp_path / str(i)))
        assert same_state(loaded, compressed)
        with torch.no_grad():
            assert torch.equal(bits(loaded(x)), bits(compressed(x)))
    shared = DenseMoE(4, 8, 16, 4)
    base_delta_experts(shared, rank=2)
    loaded = load(save(shared, tmp_path / "base_delta"))
    assert loaded.experts[0].base is loaded.experts[1].base  # the shared base is re-tied


def test_quantized_buffers_stay_integer(tmp_path):
    model = compress(TopKMoE(4, 8, 16, 4), [Quantize(8)], torch.randn(16, 8)).model
    loaded = load(save(model, tmp_path))
    assert loaded.experts[0].qweight.dtype == torch.int8
    assert torch.equal(loaded.experts[0].qweight, model.experts[0].qweight)


def test_tied_weights_stay_tied_after_load(tmp_path):
    model = LanguageModelMoE(40, num_experts=2, expert_size=8, embedding_dim=8, num_heads=2)
    loaded = load(save(model, tmp_path))
    assert loaded.output.weight is loaded.embedding.weight
    aliases = json.loads((tmp_path / "config.json").read_text())["aliases"]
    assert aliases == {"output.weight": "embedding.weight"}


def test_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save(DenseMoE(3, 8, 16, 4), tmp_path / "a")
        os.umask(0o077)
        save(DenseMoE(3, 8, 16, 4), tmp_path / "b")
    finally:
        os.umask(old)
    for folder, mode in (("a", 0o644), ("b", 0o600)):
        for name in ("config.json", "model.safetensors"):
            assert (tmp_path / folder / name).stat().st_mode & 0o777 == mode, (folder, name)


def test_an_interrupted_save_never_leaves_a_mixed_artifact(tmp_path, monkeypatch):
    old = DenseMoE(3, 8, 16, 4)
    save(old, tmp_path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "save_file", crash)  # dies while writing the weights
    with pytest.raises(KeyboardInterrupt):
        save(DenseMoE(3, 8, 32, 4), tmp_path)
    assert same_state(load(tmp_path), old)  # the old artifact is untouched
    monkeypatch.undo()
    real_replace, calls = os.replace, []

    def replace_then_crash(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # weights moved into place, config not yet
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(artifact.os, "replace", replace_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save(DenseMoE(3, 8, 32, 4), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temp files left
    with pytest.raises(FileNotFoundError, match="not a moe_lab artifact"):
        load(tmp_path)


# --- damage ----------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    """A small quantized TopKMoE artifact: float, int8 and float16 tensors."""
    model = compress(TopKMoE(4, 8, 16, 4, k=2), [Quantize(8)], torch.randn(16, 8)).model
    save(model, tmp_path)
    return tmp_path


def read_config(folder):
    return json.loads((folder / "config.json").read_text())


def write_config(folder, config):
    (folder / "config.json").write_text(json.dumps(config))


def rewrite_weights(folder, change):
    """Rewrite model.safetensors with ``change(tensors)`` applied and record its new sha256, as
    a consistent (crafted) artifact would: only the shape and dtype checks can stop it."""
    tensors = {k: v.clone() for k, v in load_tensors(folder).items()}
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    config = read_config(folder)
    config["weights_sha256"] = artifact.sha256(folder / "model.safetensors")
    write_config(folder, config)


def load_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def damaged(folder, *fields):
    """load() fails with a ValueError whose message names the file and every ``fields`` word."""
    with pytest.raises(ValueError) as error:
        load(folder)
    message = str(error.value)
    assert str(folder) in message, message
    for field in fields:
        assert field in message, (field, message)
    return message


CONFIG_DAMAGE = [  # (change to config.json, words the error must contain)
    (lambda c: c.update({"class": ["x"]}), ["config.json", "class"]),
    (lambda c: c.update({"class": "os.system"}), ["config.json", "cannot rebuild class"]),
    (lambda c: c.update({"modules": [1]}), ["config.json", "modules[0]"]),
    (lambda c: c.update({"modules": {"a": 1}}), ["config.json", "modules"]),
    (lambda c: c["modules"][0].update({"at": [3]}), ["config.json", "modules[0].at[0]"]),
    (lambda c: c["modules"][0].update({"at": "experts.0"}), ["config.json", "modules[0].at"]),
    (lambda c: c["modules"][0].update({"at": ["no.such.module"]}), ["config.json", "modules[0]"]),
    (lambda c: c["modules"][0].update({"device": "cuda"}), ["config.json", "modules[0]"]),
    (lambda c: c["modules"][0]["config"].update({"in_features": 0}), ["modules[0].config"]),
    (lambda c: c["modules"][0]["config"].update({"in_features": -3}), ["modules[0].config"]),
    (lambda c: c["modules"][0]["config"].update({"bits": 300}), ["modules[0].config", "bits"]),
    (lambda c: c["config"].update({"expert_size": -4}), ["config.json", "config"]),
    (lambda c: c["config"].update({"expert_size": 1e9}), ["config.json", "config"]),
    (lambda c: c["config"].update({"device": "meta"}), ["config.json", "config.device"]),
    (lambda c: c.update({"device": "cuda"}), ["config.json", "'device'"]),
    (lambda c: c.update({"device": "meta"}), ["config.json", "'device'"]),
    (lambda c: c.update({"map_location": "cpu"}), ["config.json", "'map_location'"]),
    (lambda c: c.update({"version": 3}), ["config.json", "'version'"]),
    (lambda c: c.update({"version": True}), ["config.json", "'version'"]),
    (lambda c: c.update({"format": "pickle"}), ["config.json", "'format'"]),
    (lambda c: c.update({"aliases": {"experts.0.qweight": "nothing"}}), ["config.json", "aliases"]),
    (lambda c: c.update({"aliases": []}), ["config.json", "'aliases'"]),
    (lambda c: c.pop("weights_sha256"), ["config.json", "'weights_sha256'"]),
    (lambda c: c.update({"class": "transformers:MixtralForCausalLM", "config": {"vocab_size": 8}}),
     ["config.json", "model_type"]),
    (lambda c: c.update({"class": "transformers:len", "config": {"model_type": "mixtral"}}),
     ["config.json", "not a transformers model"]),
]


@pytest.mark.parametrize("change, fields", CONFIG_DAMAGE)
def test_damaged_config_gives_a_value_error_naming_the_field(saved, change, fields):
    config = read_config(saved)
    change(config)
    write_config(saved, config)
    damaged(saved, *fields)


@pytest.mark.parametrize("text, words", [
    (b"\x00\xff\xfe binary", "not UTF-8"),
    (b"{not json", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"a": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
])
def test_unreadable_config_gives_a_value_error(saved, text, words):
    (saved / "config.json").write_bytes(text)
    damaged(saved, "config.json", words)


def test_oversized_config_is_refused_before_reading(saved, monkeypatch):
    monkeypatch.setattr(artifact, "MAX_CONFIG_BYTES", 100)
    damaged(saved, "config.json", "more than")


def test_a_flipped_byte_fails_the_checksum(saved):
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor's data: shapes and dtypes are still fine
    weights.write_bytes(bytes(data))
    damaged(saved, "model.safetensors", "sha256")


def test_truncated_and_garbage_weights(saved):
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    damaged(saved, "model.safetensors", "truncated")
    weights.write_bytes(data[:5])
    damaged(saved, "model.safetensors", "header length")
    weights.write_bytes((10 ** 12).to_bytes(8, "little") + data[8:])
    damaged(saved, "model.safetensors", "header length")
    weights.write_bytes(len(b"[1]").to_bytes(8, "little") + b"[1]")
    damaged(saved, "model.safetensors", "header")


def header_with(folder, edit):
    """Rewrite the safetensors header (keeping the data) with ``edit(header)`` applied."""
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    weights.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + length:])


@pytest.mark.parametrize("edit, field", [
    (lambda h: h["experts.0.qweight"].update({"dtype": "Q9"}), "dtype"),
    (lambda h: h["experts.0.qweight"].update({"dtype": []}), "dtype"),
    (lambda h: h["experts.0.qweight"].update({"shape": [-1, 8]}), "shape"),
    (lambda h: h["experts.0.qweight"].update({"shape": [10 ** 9, 10 ** 9]}), "data_offsets"),
    (lambda h: h["experts.0.qweight"].update({"data_offsets": [0, 10 ** 15]}), "data_offsets"),
    (lambda h: h["experts.0.qweight"].update({"data_offsets": "x"}), "data_offsets"),
    (lambda h: h.update({"extra": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}), "overlap"),
    (lambda h: h.update({"__metadata__": [1]}), "__metadata__"),
    (lambda h: h["experts.0.qweight"].pop("shape"), "experts.0.qweight"),
])
def test_damaged_header_gives_a_value_error_naming_the_field(saved, edit, field):
    header_with(saved, edit)
    damaged(saved, "model.safetensors", field)


@pytest.mark.parametrize("change, words", [
    (lambda t: t.update({"experts.0.qweight": t["experts.0.qweight"].to(torch.int16) + 300}),
     ["experts.0.qweight", "torch.int16"]),  # would wrap 300 -> 44 if cast into the int8 slot
    (lambda t: t.update({"experts.0.qweight": t["experts.0.qweight"].view(torch.uint8)}),
     ["experts.0.qweight", "torch.uint8"]),  # a uint8 qweight in an int8 slot
    (lambda t: t.update({"gating.weight": t["gating.weight"].long()}), ["gating.weight", "torch.int64"]),
    (lambda t: t.update({"gating.weight": t["gating.weight"] > 0}), ["gating.weight", "torch.bool"]),
    (lambda t: t.update({"experts.0.scales": t["experts.0.scales"].to(torch.int8)}), ["experts.0.scales"]),
    (lambda t: t.update({"gating.weight": t["gating.weight"][:, :4].contiguous()}),
     ["gating.weight", "shape"]),
    (lambda t: t.pop("gating.weight"), ["gating.weight", "missing"]),
    (lambda t: t.update({"stray": torch.zeros(2)}), ["stray", "not a tensor of the model"]),
])
def test_crafted_weights_of_the_wrong_dtype_or_shape_are_refused(saved, change, words):
    rewrite_weights(saved, change)  # checksum updated: only the dtype / shape checks stand
    damaged(saved, "model.safetensors", *words)


def test_huge_config_is_refused_before_allocating(tmp_path):
    """An edited config asks for ~6 GB (and a transformers one for ~2.5 GB): load() must fail on the
    sizes, building nothing for real. Run in a fresh process to measure its peak memory."""
    script = f"""
import json, resource
import torch
from moe_lab import DenseMoE, save, load
save(DenseMoE(3, 8, 16, 4), {str(tmp_path)!r})
config = json.load(open({str(tmp_path / 'config.json')!r}))
errors = []
for change in [dict(expert_size=10000, input_size=20000), dict(num_experts=10 ** 9)]:
    config["config"].update(change)
    json.dump(config, open({str(tmp_path / 'config.json')!r}, "w"))
    try:
        load({str(tmp_path)!r})
    except ValueError as error:
        errors.append(str(error))
config.update({{"class": "transformers:MixtralForCausalLM",
               "config": {{"model_type": "mixtral", "vocab_size": 10 ** 7, "hidden_size": 64,
                          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                          "intermediate_size": 8, "num_local_experts": 2}}}})
json.dump(config, open({str(tmp_path / 'config.json')!r}, "w"))
try:
    load({str(tmp_path)!r})
except ValueError as error:
    errors.append(str(error))
print(len(errors), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
print(errors)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    count, peak_mb = map(int, run.stdout.split("\n")[0].split())
    assert count == 3, run.stdout
    assert "has shape" in run.stdout and "more than" in run.stdout
    assert peak_mb < 2000, f"peak memory {peak_mb} MB: something was allocated before the checks"


def test_old_version_1_artifacts_load_with_a_warning(saved):
    model = load(saved)
    config = read_config(saved)
    config["version"] = 1
    del config["weights_sha256"]
    write_config(saved, config)
    with pytest.warns(UserWarning, match="unverified"):
        old = load(saved)
    assert same_state(old, model)


def test_missing_artifact_and_bad_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a moe_lab artifact"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load(tmp_path / "file")
    save(DenseMoE(3, 8, 16, 4), tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load(tmp_path / "a")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        save("not a model", tmp_path)


# --- transformers configs: offline only ---------------------------------------------------

@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError(f"test: network access to {address} refused")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def tiny_mixtral():
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=8,
                                        num_local_experts=2, num_experts_per_tok=1, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=16)
    return transformers.MixtralForCausalLM(config).eval()


def test_transformers_model_loads_offline(tmp_path, no_network):
    model = tiny_mixtral().to(torch.bfloat16)
    loaded = load(save(model, tmp_path))
    assert same_state(loaded, model) and not no_network
    tokens = torch.randint(0, 32, (1, 6))
    with torch.no_grad():
        assert torch.equal(bits(loaded(tokens).logits), bits(model(tokens).logits))  # rotary buffers rebuilt


@pytest.mark.parametrize("config, field", [
    ({"model_type": "rf_detr", "backbone": "some-org/some-repo"}, "config.backbone"),
    ({"model_type": "mixtral", "auto_map": {"AutoModel": "evil.Model"}}, "config.auto_map"),
    ({"model_type": "mixtral", "trust_remote_code": True}, "config.trust_remote_code"),
    ({"model_type": "mixtral", "text_config": {"tokenizer_name_or_path": "org/repo"}},
     "tokenizer_name_or_path"),
    ({"model_type": "mixtral", "note": "see https://example.com/weights.bin"}, "config.note"),
    ({"model_type": "mixtral", "device_map": "auto"}, "config.device_map"),
])
def test_transformers_configs_that_reach_elsewhere_are_refused(saved, no_network, config, field):
    pytest.importorskip("transformers")
    data = read_config(saved)
    data.update({"class": "transformers:RfDetrModel" if "rf_detr" in str(config) else
                 "transformers:MixtralForCausalLM", "config": config})
    write_config(saved, data)
    damaged(saved, "config.json", field)
    assert not no_network


def test_importing_moe_lab_hf_prints_nothing_and_keeps_warnings_filters():
    code = ("import warnings, numpy, torch\n"
            "before = list(warnings.filters)\n"
            "import moe_lab.hf, transformers\n"
            "transformers.MixtralForCausalLM\n"
            "assert warnings.filters == before\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "" and "register_constant" not in run.stderr and run.stderr.strip() == ""


def test_save_of_a_model_with_a_tensor_subclass_is_refused(tmp_path):
    class Odd(torch.Tensor):
        pass

    layer = torch.nn.Linear(2, 2)
    layer.weight = torch.nn.Parameter(torch.zeros(2, 2).as_subclass(Odd))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TypeError, match="tensor subclass"):
            save(layer, tmp_path)


def test_pipes_and_folders_in_place_of_files_are_refused(saved):
    (saved / "config.json").unlink()
    os.mkfifo(saved / "config.json")  # reading it would block forever
    damaged(saved, "config.json", "not a regular file")
    (saved / "config.json").unlink()
    (saved / "config.json").mkdir()
    damaged(saved, "config.json", "not a regular file")


def test_a_model_load_cannot_rebuild_says_so(tmp_path):
    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

    save(Custom(), tmp_path)  # any module saves; only registered classes load
    damaged(tmp_path, "config.json", "cannot rebuild class 'Custom'")
