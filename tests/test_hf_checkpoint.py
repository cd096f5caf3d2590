"""moe_lab.hf.save_pretrained: pruned and merged models as standard checkpoints that plain
transformers reloads to the same logits; clear errors where no Hugging Face format exists."""

import json
from dataclasses import dataclass

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_tiny import FAMILIES, VOCAB, random_model  # noqa: E402
from safetensors import safe_open  # noqa: E402

from moe_lab import load, save  # noqa: E402
from moe_lab.compress import ExpertPrune, LowRank, MergeExperts, Quantize  # noqa: E402
from moe_lab.compress.prune import prune_experts  # noqa: E402
from moe_lab.compress.registry import Stage  # noqa: E402
from moe_lab.hf import compress_model, moe_blocks, save_pretrained  # noqa: E402
from moe_lab.hf.compressed import pack_int32  # noqa: E402

TOKENS = torch.randint(0, VOCAB, (6, 10), generator=torch.Generator().manual_seed(0))


def reload(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    return model.eval()


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recipe", [[ExpertPrune(0.25)], [MergeExperts(4)]], ids=["prune", "merge"])
def test_pruned_and_merged_checkpoints_reload_with_plain_transformers(family, recipe, tmp_path):
    """In bfloat16, moe_lab's layers round exactly like the blocks transformers rebuilds: the
    reloaded model gives identical logits."""
    overrides = dict(n_group=1, topk_group=1) if family == "deepseek_v3" else {}
    model = random_model(family, dtype=torch.bfloat16, **overrides)
    compress_model(model, recipe, TOKENS)
    experts = model.get_submodule(moe_blocks(model)[0]).moe.num_experts
    save_pretrained(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert experts in {written.get(key) for key in ("num_local_experts", "num_experts", "n_routed_experts")}
    reloaded = reload(tmp_path)
    assert type(reloaded) is type(model) and reloaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(logits(reloaded), logits(model))
    generated = model.generate(TOKENS[:1, :4], max_new_tokens=4, do_sample=False)
    assert torch.equal(reloaded.generate(TOKENS[:1, :4], max_new_tokens=4, do_sample=False), generated)


def test_float32_checkpoint_reloads_within_rounding(tmp_path):
    model = random_model("qwen2_moe")
    compress_model(model, [ExpertPrune(0.25)], TOKENS)
    save_pretrained(model, tmp_path)
    torch.testing.assert_close(logits(reload(tmp_path)), logits(model), rtol=0, atol=1e-5)


@dataclass
class KeepExperts(Stage):
    """Keep the same experts in every block (a balanced pruning of DeepSeek-V3's groups)."""

    keep: tuple

    name = recipe = "keep experts"

    def apply(self, layer, calibration):
        return prune_experts(layer, list(self.keep))


def test_deepseek_groups_must_stay_equal(tmp_path):
    model = random_model("deepseek_v3", n_group=2, topk_group=1)
    compress_model(model, [KeepExperts((0, 1, 2, 4))], TOKENS)  # groups of 3 and 1
    with pytest.raises(ValueError, match=r"needs 2 groups of equal size, but .* groups of \[3, 1\]"):
        save_pretrained(model, tmp_path)
    balanced = random_model("deepseek_v3", dtype=torch.bfloat16, n_group=2, topk_group=1)
    compress_model(balanced, [KeepExperts((0, 1, 4, 5))], TOKENS)
    save_pretrained(balanced, tmp_path)
    reloaded = reload(tmp_path)
    assert reloaded.config.n_group == 2 and reloaded.config.n_routed_experts == 4
    assert torch.equal(logits(reloaded), logits(balanced))


@pytest.mark.parametrize("recipe", [[LowRank(rank=4)], [LowRank(rank=4), Quantize(8)]],
                         ids=["lowrank", "lowrank-int8"])
def test_stages_without_a_hugging_face_format_are_named(recipe, tmp_path):
    model = random_model("mixtral")
    compress_model(model, [ExpertPrune(0.25), *recipe], TOKENS)
    with pytest.raises(ValueError, match="stored by LowRank, which has no Hugging Face checkpoint"):
        save_pretrained(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    loaded = load(save(model, tmp_path / "moe_lab"))  # what to do instead
    assert torch.equal(logits(loaded), logits(model))


def test_pack_int32_matches_a_slow_bit_loop():
    values = torch.randint(-8, 8, (3, 13), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    for bits, scale in [(4, 1), (8, 15)]:
        wide = values * scale
        packed = pack_int32(wide, bits)
        per_word = 32 // bits
        assert packed.shape == (3, -(-13 // per_word)) and packed.dtype == torch.int32
        for row in range(3):
            for i in range(13):
                word = int(packed[row, i // per_word]) & 0xFFFFFFFF
                unsigned = (word >> (bits * (i % per_word))) & ((1 << bits) - 1)
                assert unsigned - (1 << (bits - 1)) == int(wide[row, i])


PER_EXPERT = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "qwen3_next", "deepseek_v3"]


def pruned(family, *stages):
    """``family``'s tiny model with a quarter of its experts pruned, then ``stages``."""
    overrides = dict(n_group=1, topk_group=1) if family == "deepseek_v3" else {}
    return compress_model(random_model(family, **overrides), [ExpertPrune(0.25), *stages], TOKENS)


@pytest.mark.parametrize("family, stage", [*[(f, Quantize(8)) for f in PER_EXPERT],
                                           ("mixtral", Quantize(4, group_size=16))])
def test_quantized_experts_write_a_compressed_tensors_checkpoint(family, stage, tmp_path):
    save_pretrained(pruned(family, stage), tmp_path / "int")
    save_pretrained(pruned(family), tmp_path / "float")
    quantization = json.loads((tmp_path / "int" / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors" and quantization["dequantize"] is True
    weights = quantization["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"]) == (stage.bits, stage.group_size)
    with safe_open(str(tmp_path / "int" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        packed = [k for k in keys if k.endswith("weight_packed")]
        assert packed and all(f.get_tensor(k).dtype == torch.int32 for k in packed)
        assert not any(".experts.0." in k and k.endswith(".weight") for k in keys)  # no float expert left
    sizes = [(tmp_path / kind / "model.safetensors").stat().st_size for kind in ("int", "float")]
    assert sizes[0] < sizes[1]


@pytest.mark.parametrize("family", PER_EXPERT)
def test_compressed_tensors_checkpoint_reloads_with_plain_transformers(family, tmp_path):
    pytest.importorskip("compressed_tensors")
    model = pruned(family, Quantize(4, group_size=16))
    save_pretrained(model, tmp_path)
    reloaded = reload(tmp_path)
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-5)
    block = model.get_submodule(moe_blocks(model)[0]).moe
    fused = reloaded.get_submodule(moe_blocks(reloaded)[0]).experts.gate_up_proj
    assert torch.equal(fused[0], block.experts[0].gate_up_proj.weight)  # moe_lab's own dequantized weights


@pytest.mark.parametrize("family", ["gpt_oss", "granitemoe", "llama4"])
def test_families_published_with_fused_experts_refuse_int8(family, tmp_path):
    model = pruned(family, Quantize(8))
    with pytest.raises(ValueError, match="store these experts fused .* not as one linear per expert"):
        save_pretrained(model, tmp_path)


def test_an_uncompressed_model_saves_as_it_is(tmp_path):
    model = random_model("olmoe")
    save_pretrained(model, tmp_path)
    assert torch.equal(logits(reload(tmp_path)), logits(model))
