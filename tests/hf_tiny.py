"""Tiny random Hugging Face MoE models, one per supported family, built offline from configs
(hidden 64, 2 layers, 8 experts), shared by the Hugging Face bridge's tests."""

import torch
import transformers

VOCAB, HIDDEN = 96, 64
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, eos_token_id=None, bos_token_id=None,
              pad_token_id=None)
DEEPSEEK = dict(intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                n_shared_experts=2, first_k_dense_replace=0, routed_scaling_factor=2.5, norm_topk_prob=True)


def _deepseek(n_group: int = 4, topk_group: int = 2):
    return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        n_group=n_group, topk_group=topk_group, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, **DEEPSEEK, **COMMON))


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
    "qwen3_next": lambda: transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(
        intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, head_dim=16, linear_num_value_heads=4,
        linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
        layer_types=["linear_attention", "full_attention"], **COMMON)),
    "deepseek_v3": _deepseek,
    "gpt_oss": lambda: transformers.GptOssForCausalLM(transformers.GptOssConfig(
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16, sliding_window=16,
        **COMMON)),
    "granitemoe": lambda: transformers.GraniteMoeForCausalLM(transformers.GraniteMoeConfig(
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, **COMMON)),
    "llama4": lambda: transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(
        intermediate_size=32, intermediate_size_mlp=128, num_local_experts=8, num_experts_per_tok=1,
        head_dim=16, **COMMON)),
}
#: Built like DeepSeek-V3 (same router and block), checked as well.
LOOKALIKES = {
    "glm4_moe": lambda: transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(
        n_group=4, topk_group=2, head_dim=16, **DEEPSEEK, **COMMON)),
    "dots1": lambda: transformers.Dots1ForCausalLM(transformers.Dots1Config(
        n_group=4, topk_group=2, head_dim=16, **DEEPSEEK, **COMMON)),
}


def random_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, experts: str | None = None,
                 **overrides):
    """A tiny model of ``family`` with N(0, 0.1) weights (Hugging Face zero-inits some routers and
    biases: random ones make every part of the routing matter), in ``dtype``, eval mode.
    ``experts``: the experts implementation (``None``: transformers' default)."""
    torch.manual_seed(seed)
    build = {**FAMILIES, **LOOKALIKES}[family]
    model = (_deepseek(**overrides) if overrides else build())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    if experts is not None:
        model.set_experts_implementation(experts)
    rotary = {name: b for name, b in model.named_buffers() if name.endswith("inv_freq")}
    model.to(dtype)
    for name, value in rotary.items():  # from_pretrained(dtype=...) keeps these in float32 too
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, value)
    return model.eval()
