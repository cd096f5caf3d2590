"""One Hugging Face MoE block <-> one :class:`~moe_lab.layers.swiglu.SwiGLUMoE`, both ways.

:func:`from_hf` reads a block's router, fused experts, shared experts and biases into a
``SwiGLUMoE`` with the routing options of its family (:mod:`moe_lab.hf.families`), in the
block's dtype and device, and checks on a probe batch that both give the same output before
returning it. :func:`hf_state` is the inverse: the block's tensors, in its own layout, from a
layer whose experts are still plain ``nn.Linear`` (pruned or merged, not quantized).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn as nn

from moe_lab.hf.families import Family, activation_name, family_of
from moe_lab.layers.routing import contiguous_groups
from moe_lab.layers.swiglu import SwiGLUMoE

#: Largest probe-batch difference accepted, relative to ``max(1, max |block output|)``. float32
#: conversions agree to rounding. In 16-bit formats moe_lab rounds like transformers' default
#: (grouped) experts, bit for bit; a block run with the eager expert loop rounds each weighted
#: expert output before summing, which may differ by a bfloat16 step or so.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2 ** -5, torch.float16: 2 ** -8}
PROBE_TOKENS = 64


def _materialised(module: nn.Module) -> contextlib.ExitStack:
    """A context holding the weights of ``module`` in memory, also where accelerate offloaded
    them (its hooks sit on the submodules that own parameters)."""
    stack = contextlib.ExitStack()
    try:
        from accelerate.utils import align_module_device, has_offloaded_params
    except ImportError:  # accelerate not installed: nothing can be offloaded
        return stack
    for child in module.modules():
        if has_offloaded_params(child):
            stack.enter_context(align_module_device(child, torch.device("cpu")))
    return stack


def _expert_tensors(experts: nn.Module, layout: str, e: int) -> dict[str, torch.Tensor]:
    """Expert ``e``'s weights (and biases) in ``SwiGLUExpert`` layout: ``gate_up_proj.weight``
    ``(2I, H)`` with the gate rows first, ``down_proj.weight`` ``(H, I)``."""
    gate_up, down = experts.gate_up_proj[e], experts.down_proj[e]
    state = {}
    if layout != "fused":
        gate_up, down = gate_up.T, down.T
    if layout == "interleaved":  # rows alternate gate, up, gate, up, ...
        gate_up = torch.cat([gate_up[0::2], gate_up[1::2]])
        bias = experts.gate_up_proj_bias[e]
        state["gate_up_proj.bias"] = torch.cat([bias[0::2], bias[1::2]])
        state["down_proj.bias"] = experts.down_proj_bias[e]
    state["gate_up_proj.weight"], state["down_proj.weight"] = gate_up, down
    return state


def _layer_state(block: nn.Module, family: Family, layer: SwiGLUMoE) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of ``layer`` read from ``block`` (copies, in the block's dtypes)."""
    router = getattr(block, family.router)
    state = {"gate.weight": router.weight}
    if layer.config["router_bias"]:
        state["gate.bias"] = router.bias
    if layer.config["routing"] == "sigmoid_group_topk":
        state["e_score_correction_bias"] = router.e_score_correction_bias
        if layer.config["n_group"] > 1:
            state["expert_group"] = contiguous_groups(layer.num_experts, layer.config["n_group"])
    for e in range(layer.num_experts):
        for key, value in _expert_tensors(block.experts, family.layout, e).items():
            state[f"experts.{e}.{key}"] = value
    if family.shared is not None:
        shared = getattr(block, family.shared)
        fused = torch.cat([shared.gate_proj.weight, shared.up_proj.weight])
        state["shared_expert.gate_up_proj.weight"] = fused
        state["shared_expert.down_proj.weight"] = shared.down_proj.weight
    if family.shared_gate is not None:
        state["shared_expert_gate.weight"] = getattr(block, family.shared_gate).weight
    return {key: value.detach().clone().contiguous() for key, value in state.items()}


def _convert(block: nn.Module, family: Family) -> SwiGLUMoE:
    experts = block.experts
    gate_up = experts.gate_up_proj
    num_experts = gate_up.shape[0]
    hidden, inner = (gate_up.shape[2], gate_up.shape[1] // 2) if family.layout == "fused" else (
        gate_up.shape[1], gate_up.shape[2] // 2)
    shared = None if family.shared is None else getattr(block, family.shared).gate_proj.out_features
    with torch.device("meta"):  # the structure only: every tensor comes from the block
        layer = SwiGLUMoE(num_experts, hidden, inner, activation=activation_name(experts),
                          shared_expert_size=shared, **family.options(block))
    layer.load_state_dict(_layer_state(block, family, layer), strict=True, assign=True)
    return layer


def forget_forward(layer: SwiGLUMoE) -> None:
    """Forget what the probe forward recorded."""
    for name in ("tokens_per_expert", "dropped_tokens", *SwiGLUMoE._GRAPH_STATE):
        setattr(layer, name, None)


@torch.no_grad()
def _verify(block: nn.Module, layer: SwiGLUMoE, family: Family, tokens: int) -> float:
    """Max |difference| between ``block`` and ``layer`` on a seeded probe batch; ``ValueError``
    naming the family if it exceeds :data:`TOLERANCE`."""
    weight = layer.gate.weight
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, layer.input_size, generator=generator).to(weight.device, weight.dtype)
    was_training = block.training
    block.eval()  # Mixtral's router jitter only runs in training
    try:
        expected = block(x)
    finally:
        block.train(was_training)
    if isinstance(expected, tuple):  # GPT-OSS and Llama 4 also return routing information
        expected = expected[0]
    got = layer(x)
    forget_forward(layer)
    expected = expected.reshape(got.shape).float()
    error = float((got.float() - expected).abs().max())
    allowed = TOLERANCE.get(weight.dtype, 2 ** -5) * max(1.0, float(expected.abs().max()))
    if not error <= allowed:  # also catches nan
        raise ValueError(f"{family.name} block {type(block).__name__} was not converted: on a probe batch "
                         f"the converted layer differs from the block by {error:.3g} (allowed {allowed:.3g} "
                         f"in {weight.dtype}); this block does not route like the {family.name} family "
                         f"moe_lab knows")
    return error


def from_hf(block: nn.Module, *, probe_tokens: int = PROBE_TOKENS) -> SwiGLUMoE:
    """A :class:`SwiGLUMoE` with the weights and routing of a Hugging Face MoE block, in the
    block's dtype and device, in eval mode.

    Supported blocks: see :func:`moe_lab.hf.families.supported` (Mixtral, OLMoE, Qwen2-MoE,
    Qwen3-MoE, Qwen3-Next / Qwen3.5-MoE, DeepSeek-V3 / GLM-4.5 MoE / dots1, GPT-OSS,
    Granite-MoE, Llama 4); any other raises ``TypeError`` listing them. The conversion is
    checked every time: both run on a probe batch of ``probe_tokens`` tokens ``(1, tokens, H)``
    and a layer whose output differs (beyond rounding, :data:`TOLERANCE`) is refused with a
    ``ValueError`` naming the family. Mixtral's training-time router jitter is not reproduced.
    """
    family = family_of(block)
    with _materialised(block), torch.no_grad():
        layer = _convert(block, family)
    _verify(block, layer, family, probe_tokens)
    return layer.eval()


def plain_weight(module: nn.Module, where: str) -> torch.Tensor:
    """The weight of a float ``nn.Linear``; ``TypeError`` for any other storage."""
    if type(module) is not nn.Linear:
        raise TypeError(f"{where} is a {type(module).__name__}, not a float nn.Linear")
    return module.weight


def hf_state(layer: SwiGLUMoE, family: Family, weight: Callable[[nn.Module, str], torch.Tensor] = plain_weight
             ) -> dict[str, torch.Tensor]:
    """The tensors of a ``family`` block (names relative to the block) holding ``layer``.

    ``weight(linear, where)`` gives each linear's ``(out, in)`` matrix: by default the layer's
    linears must be plain ``nn.Linear`` (``TypeError`` otherwise: a quantized, low-rank or sparse
    expert has no place in the block's fused tensors). The routing must be one the family's
    block can express (``ValueError`` otherwise).
    """
    c = layer.config
    groups = getattr(layer, "expert_group", None)
    if groups is not None:
        expected = contiguous_groups(layer.num_experts, c["n_group"]).to(groups.device)
        if layer.num_experts % c["n_group"] or not torch.equal(groups, expected):
            sizes = torch.bincount(groups, minlength=c["n_group"]).tolist()
            raise ValueError(f"the {family.name} router needs {c['n_group']} groups of equal size, but "
                             f"pruning or merging left groups of {sizes} experts: prune the same number of "
                             f"experts from every group, or keep the model with moe_lab.save")
    experts = [{name: getattr(e, name) for name in ("gate_up_proj", "down_proj")} for e in layer.experts]
    gate_up, down = (torch.stack([weight(e[name], f"experts.{i}.{name}") for i, e in enumerate(experts)])
                     for name in ("gate_up_proj", "down_proj"))
    state = {}  # gate_up: (E, 2I, H) with the gate rows first; down: (E, H, I)
    if family.layout == "interleaved":
        inner = gate_up.shape[1] // 2
        order = torch.stack([torch.arange(inner), torch.arange(inner) + inner], 1).reshape(-1)
        gate_up = gate_up[:, order.to(gate_up.device)]
        bias = torch.stack([e["gate_up_proj"].bias for e in experts])
        state["experts.gate_up_proj_bias"] = bias[:, order.to(bias.device)]
        state["experts.down_proj_bias"] = torch.stack([e["down_proj"].bias for e in experts])
    if family.layout != "fused":
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    state["experts.gate_up_proj"], state["experts.down_proj"] = gate_up, down
    state[f"{family.router}.weight"] = weight(layer.gate, "the router")
    if layer.gate.bias is not None:
        state[f"{family.router}.bias"] = layer.gate.bias
    if c["routing"] == "sigmoid_group_topk":
        state[f"{family.router}.e_score_correction_bias"] = layer.e_score_correction_bias
    if family.shared is not None:
        gate_up_proj = weight(layer.shared_expert.gate_up_proj, "the shared expert")
        inner = gate_up_proj.shape[0] // 2
        state[f"{family.shared}.gate_proj.weight"] = gate_up_proj[:inner]
        state[f"{family.shared}.up_proj.weight"] = gate_up_proj[inner:]
        shared_down = weight(layer.shared_expert.down_proj, "the shared expert")
        state[f"{family.shared}.down_proj.weight"] = shared_down
    if family.shared_gate is not None:
        state[f"{family.shared_gate}.weight"] = weight(layer.shared_expert_gate, "the shared expert gate")
    return {key: value.detach().contiguous() for key, value in state.items()}
