"""The Hugging Face bridge, on tiny random models built offline from configs."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_lab import load, model_bytes, save  # noqa: E402
from moe_lab.compress import ExpertPrune, FineTune, LowRank, MergeExperts, Quantize  # noqa: E402
from moe_lab.hf import block_inputs, compress_model, from_hf, moe_blocks  # noqa: E402
from moe_lab.layers.swiglu import SwiGLUMoE  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, eos_token_id=None, bos_token_id=None,
              pad_token_id=None)
FAMILIES = {
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        intermediate_size=128, num_local_experts=8, num_experts_per_tok=2, **COMMON)),
    "olmoe": lambda: transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        intermediate_size=128, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, **COMMON)),
    "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=False, **COMMON)),
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, head_dim=16, **COMMON)),
}


def random_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)  # HF zero-inits some routers: make routing non-trivial
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_from_hf_matches_the_block(family):
    model = random_model(family)
    block = model.get_submodule(moe_blocks(model)[0])
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        ours = from_hf(block)
        assert (ours(x) - block(x)).abs().max() <= 1e-5
    assert isinstance(ours, SwiGLUMoE)
    assert ours.config["normalize"] == bool(getattr(block.gate, "norm_topk_prob", True))
    assert (ours.config["shared_expert_size"] is not None) == (family == "qwen2_moe")


def bigram_tokens(n: int, time: int, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    """Text from one fixed sparse bigram table (each token has two successors); ``seed`` picks the sample."""
    successors = torch.randint(0, vocab, (vocab, 2), generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    tokens = torch.empty(n, time, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, time):
        choice = torch.randint(0, 2, (n,), generator=g)
        tokens[:, t] = successors[tokens[:, t - 1], choice]
    return tokens


@pytest.fixture(scope="module")
def trained_mixtral():
    """A tiny Mixtral trained briefly on bigram text, so compression has something to lose."""
    torch.manual_seed(0)
    model = FAMILIES["mixtral"]()
    data = bigram_tokens(512, 24)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(120):
        batch = data[(step * 16) % 512:(step * 16) % 512 + 16]
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), bigram_tokens(64, 24, seed=1)


def loss_of(model, tokens):
    with torch.no_grad():
        return model(tokens, labels=tokens).loss.item()


def test_mild_compression_keeps_the_loss_and_stronger_settings_degrade(trained_mixtral):
    import copy

    model, tokens = trained_mixtral
    base = loss_of(model, tokens)
    assert base < 2.5  # learned: uniform would be log(96) = 4.56
    settings = [[Quantize(8)],
                [ExpertPrune(1 / 8), Quantize(8)],
                [ExpertPrune(0.5), Quantize(4, group_size=32)],
                [ExpertPrune(0.75), LowRank(rank=4), Quantize(4, group_size=32)]]
    losses = [loss_of(compress_model(copy.deepcopy(model), recipe, tokens[:32]), tokens)
              for recipe in settings]
    assert losses[0] < base * 1.01 and losses[1] < base * 1.10
    assert losses == sorted(losses)
    assert losses[-1] > base * 1.1


@pytest.mark.parametrize("family", FAMILIES)
def test_compressed_model_runs_generates_saves_and_reloads(family, tmp_path):
    model = random_model(family)
    tokens = torch.randint(0, 96, (8, 12))
    before = model_bytes(model)
    compress_model(model, [ExpertPrune(0.25), MergeExperts(4), Quantize(8)], tokens)
    names = moe_blocks(model)
    assert all(isinstance(model.get_submodule(n), SwiGLUMoE) and model.get_submodule(n).num_experts == 4
               for n in names)
    assert getattr(model.config, "num_local_experts", getattr(model.config, "num_experts", None)) == 4
    assert model_bytes(model) < before / 2
    assert model.generate(tokens[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)
    loaded = load(save(model, tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_block_inputs_stop_at_the_block():
    model = random_model("olmoe")
    names = moe_blocks(model)
    calls = []
    handle = model.get_submodule(names[1]).register_forward_pre_hook(lambda m, a: calls.append(1))
    x = block_inputs(model, names[0], torch.randint(0, 96, (4, 5)), batch_size=2)
    handle.remove()
    assert x.shape == (20, 64) and not calls  # later blocks never ran


def test_offloaded_checkpoint_is_compressed_block_by_block(tmp_path):
    """accelerate's big-model loading with one decoder layer offloaded to disk."""
    model = random_model("mixtral")
    model.save_pretrained(tmp_path / "ckpt")
    tokens = torch.randint(0, 96, (4, 10))
    reference = loss_of(model, tokens)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = transformers.MixtralForCausalLM.from_pretrained(
        tmp_path / "ckpt", device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert offloaded.model.layers[1].mlp.experts.gate_up_proj.device.type == "meta"
    compress_model(offloaded, [Quantize(8)], tokens)
    assert isinstance(offloaded.model.layers[1].mlp, SwiGLUMoE)
    assert abs(loss_of(offloaded, tokens) - reference) < 0.02


def test_bad_recipes_and_unsupported_models():
    model = random_model("qwen3_moe")
    tokens = torch.randint(0, 96, (2, 6))
    with pytest.raises(ValueError, match="non-empty list"):
        compress_model(model, [], tokens)
    with pytest.raises(ValueError, match="cannot be applied block by block"):
        compress_model(model, [FineTune(None)], tokens)
    with pytest.raises(ValueError, match="cannot be applied block by block"):
        compress_model(model, ["int8"], tokens)
    with pytest.raises(ValueError, match="calibration_tokens"):
        compress_model(model, [Quantize(8)], torch.randn(2, 6))
    with pytest.raises(ValueError, match="bits must be one of"):
        compress_model(model, [Quantize(5)], tokens)
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="no supported MoE block"):
        compress_model(dense, [Quantize(8)], tokens.clamp(max=31))
    with pytest.raises(TypeError, match="block must be one of"):
        from_hf(dense.model.layers[0].mlp)
