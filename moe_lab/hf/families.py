"""One small adapter per Hugging Face MoE family, registered by the class name of its block.

Transformers 5 stores a block's routed experts as fused 3-D tensors; the families differ in
where the router and the shared experts live, in the layout of those tensors, in the routing
rule (the :class:`~moe_lab.layers.swiglu.SwiGLUMoE` options that reproduce it) and in what the
block's ``forward`` returns. A :class:`Family` says exactly that, nothing else; reading and
writing the weights is :mod:`moe_lab.hf.convert`'s job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn as nn

LAYOUTS = ("fused", "transposed", "interleaved")
RETURNS = ("hidden", "hidden_and_scores", "hidden_and_logits")
_ACTIVATIONS = {"SiLU": "silu", "SiLUActivation": "silu", "GELU": "gelu", "GELUActivation": "gelu",
                "ReLU": "relu"}


@dataclass(frozen=True)
class Family:
    """How one family's MoE block is built.

    Attributes:
        name: shown in messages, e.g. ``"DeepSeek-V3"``.
        blocks: class names of its block in transformers.
        options: the block -> the :class:`SwiGLUMoE` routing options (``k`` included).
        router: attribute of the router (``weight`` ``(E, H)``, maybe ``bias``,
            ``e_score_correction_bias``).
        layout: the experts' fused tensors: ``"fused"``: ``gate_up_proj`` ``(E, 2I, H)`` with the
            gate rows first, ``down_proj`` ``(E, H, I)``; ``"transposed"``: ``(E, H, 2I)`` and
            ``(E, I, H)``; ``"interleaved"``: transposed, with gate and up columns alternating
            (GPT-OSS), plus ``gate_up_proj_bias`` / ``down_proj_bias``.
        shared: attribute of the shared expert(s) (an MLP with ``gate_proj``, ``up_proj``,
            ``down_proj``; several shared experts are stored as one wider MLP), or ``None``.
        shared_gate: attribute of the shared expert's sigmoid gate, or ``None``.
        returns: what ``forward`` returns: ``"hidden"``, ``"hidden_and_scores"`` (GPT-OSS: the
            top-k gates too) or ``"hidden_and_logits"`` (Llama 4: the router logits too).
        expert_count: config attributes holding the number of routed experts.
    """

    name: str
    blocks: tuple[str, ...]
    options: Callable[[nn.Module], dict]
    router: str = "gate"
    layout: str = "fused"
    shared: str | None = None
    shared_gate: str | None = None
    returns: str = "hidden"
    expert_count: tuple[str, ...] = field(default=("num_local_experts", "num_experts", "n_routed_experts"))

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.returns not in RETURNS:
            raise ValueError(f"returns must be one of {RETURNS}, got {self.returns!r}")


def activation_name(experts: nn.Module) -> str:
    """The moe_lab name of the experts' activation (``"silu"`` where they keep none)."""
    act = getattr(experts, "act_fn", None)
    if act is None:
        return "silu"
    name = _ACTIVATIONS.get(type(act).__name__)
    if name is None:
        raise ValueError(f"unsupported expert activation {type(act).__name__}")
    return name


def _softmax_topk(block: nn.Module) -> dict:
    """Mixtral, OLMoE, Qwen: softmax in float32, top-k, renormalised if ``norm_topk_prob``."""
    return dict(k=block.gate.top_k, normalize=bool(getattr(block.gate, "norm_topk_prob", True)))


def _mixtral(block: nn.Module) -> dict:
    return {**_softmax_topk(block), "float32_gates": True}  # Mixtral keeps its gates in float32


def _deepseek(block: nn.Module) -> dict:
    router = block.gate
    return dict(k=router.top_k, routing="sigmoid_group_topk", normalize=bool(router.norm_topk_prob),
                n_group=int(router.num_group), topk_group=int(router.topk_group),
                routed_scaling_factor=float(router.routed_scaling_factor), router_precision="float32",
                float32_gates=True, shared_expert_gate=False)


def _gpt_oss(block: nn.Module) -> dict:
    return dict(k=block.router.top_k, routing="topk_softmax", router_bias=True, router_precision="input",
                expert_bias=True, swiglu_limit=float(block.experts.limit),
                swiglu_alpha=float(block.experts.alpha))


def _granite(block: nn.Module) -> dict:
    return dict(k=block.router.top_k, routing="topk_softmax")


def _llama4(block: nn.Module) -> dict:
    return dict(k=block.router.top_k, routing="sigmoid_topk", router_precision="input", gate_input=True,
                shared_expert_gate=False)


FAMILIES = (
    Family("Mixtral", ("MixtralSparseMoeBlock",), _mixtral),
    Family("OLMoE", ("OlmoeSparseMoeBlock",), _softmax_topk),
    Family("Qwen2-MoE", ("Qwen2MoeSparseMoeBlock",), _softmax_topk, shared="shared_expert",
           shared_gate="shared_expert_gate"),
    Family("Qwen3-MoE", ("Qwen3MoeSparseMoeBlock",), _softmax_topk),
    Family("Qwen3-Next", ("Qwen3NextSparseMoeBlock", "Qwen3_5MoeSparseMoeBlock"), _softmax_topk,
           shared="shared_expert", shared_gate="shared_expert_gate"),
    Family("DeepSeek-V3", ("DeepseekV3MoE", "Glm4MoeMoE", "Dots1MoE"), _deepseek, shared="shared_experts"),
    Family("GPT-OSS", ("GptOssMLP",), _gpt_oss, router="router", layout="interleaved",
           returns="hidden_and_scores"),
    Family("Granite-MoE", ("GraniteMoeMoE",), _granite, router="router"),
    Family("Llama 4", ("Llama4TextMoe",), _llama4, router="router", layout="transposed",
           shared="shared_expert", returns="hidden_and_logits"),
)
BLOCKS = {block: family for family in FAMILIES for block in family.blocks}
BY_NAME = {family.name: family for family in FAMILIES}


def supported() -> str:
    """``"MixtralSparseMoeBlock (Mixtral), ..."``: every supported block class and its family."""
    return ", ".join(f"{block} ({family.name})" for block, family in BLOCKS.items())


def family_of(block: nn.Module) -> Family:
    """The family of a Hugging Face MoE block; ``TypeError`` listing the supported ones otherwise."""
    family = BLOCKS.get(type(block).__name__)
    if family is None:
        raise TypeError(f"block must be one of the supported Hugging Face MoE blocks: {supported()}; "
                        f"got {type(block).__name__}")
    return family
