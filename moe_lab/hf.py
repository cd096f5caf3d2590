"""Compress Hugging Face MoE models (transformers 5.x): Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE.

Transformers 5 stores each block's experts as fused 3-D tensors (``experts.gate_up_proj``
``[E, 2I, H]``, ``experts.down_proj`` ``[E, H, I]``) next to a router ``gate.weight``
``[E, H]``. :func:`from_hf` turns such a block into a :class:`moe_lab.SwiGLUMoE` with
``nn.Linear`` experts and the same outputs, so the course's techniques apply;
:func:`compress_model` does that for every block of a causal LM, block by block, and puts
the compressed layers back into the model, which still runs ``forward`` and ``generate`` and
saves with :func:`moe_lab.save` (reloaded by :func:`moe_lab.load`).

Needs the optional extra ``hf`` (``pip install -e '.[hf]'``: transformers, accelerate).

Larger-than-memory checkpoints: load them with accelerate's big-model loading, e.g.
``AutoModelForCausalLM.from_pretrained(name, device_map="auto", offload_folder="offload",
max_memory={"cpu": "8GiB"})``. Offloaded blocks keep their weights on disk;
:func:`from_hf` reads each block inside ``accelerate.utils.align_module_device``, so only
one block's float weights are in memory at a time, and :func:`compress_model` keeps only
one block's calibration activations.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from moe_lab.artifact import import_transformers
from moe_lab.compress.registry import Stage
from moe_lab.compress.targets import replace_module
from moe_lab.layers.swiglu import SwiGLUMoE

with contextlib.suppress(ImportError):  # the optional extra; imported once, quietly, so that the
    import_transformers()  # learner's own `transformers.MixtralForCausalLM` prints no torchao log lines

SUPPORTED_BLOCKS = ("MixtralSparseMoeBlock", "OlmoeSparseMoeBlock", "Qwen2MoeSparseMoeBlock",
                    "Qwen3MoeSparseMoeBlock")
_ACTIVATIONS = {"SiLU": "silu", "SiLUActivation": "silu", "GELU": "gelu", "GELUActivation": "gelu",
                "ReLU": "relu"}


def _activation_name(act: nn.Module) -> str:
    name = _ACTIVATIONS.get(type(act).__name__)
    if name is None:
        raise ValueError(f"unsupported expert activation {type(act).__name__}")
    return name


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


def from_hf(block: nn.Module) -> SwiGLUMoE:
    """A :class:`SwiGLUMoE` with the weights and routing of a Hugging Face sparse MoE block.

    Same outputs on the same input (eval mode; Mixtral's training-time jitter is not
    reproduced). Raises ``TypeError`` for an unsupported block.
    """
    if type(block).__name__ not in SUPPORTED_BLOCKS:
        raise TypeError(f"block must be one of {SUPPORTED_BLOCKS}, got {type(block).__name__}")
    with _materialised(block), torch.no_grad():
        experts, router = block.experts, block.gate
        shared = getattr(block, "shared_expert", None)
        layer = SwiGLUMoE(experts.num_experts, experts.hidden_dim, experts.intermediate_dim, k=router.top_k,
                          normalize=bool(getattr(router, "norm_topk_prob", True)),
                          activation=_activation_name(experts.act_fn),
                          shared_expert_size=None if shared is None else shared.gate_proj.out_features)
        layer.to(router.weight.dtype)
        layer.gate.weight.copy_(router.weight)
        for e, expert in enumerate(layer.experts):
            expert.gate_up_proj.weight.copy_(experts.gate_up_proj[e])  # [gate; up] rows, as HF stores them
            expert.down_proj.weight.copy_(experts.down_proj[e])
        if shared is not None:
            fused = torch.cat([shared.gate_proj.weight, shared.up_proj.weight])
            layer.shared_expert.gate_up_proj.weight.copy_(fused)
            layer.shared_expert.down_proj.weight.copy_(shared.down_proj.weight)
            layer.shared_expert_gate.weight.copy_(block.shared_expert_gate.weight)
    return layer.eval()


def moe_blocks(model: nn.Module) -> list[str]:
    """Dotted names of the model's MoE blocks (Hugging Face ones, or already converted)."""
    names = [name for name, m in model.named_modules()
             if type(m).__name__ in SUPPORTED_BLOCKS or isinstance(m, SwiGLUMoE)]
    if not names:
        raise ValueError(f"model has no supported MoE block (supported: {', '.join(SUPPORTED_BLOCKS)})")
    return names


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the block's input is seen."""


@torch.no_grad()
def block_inputs(model: nn.Module, block_name: str, tokens: torch.Tensor, batch_size: int = 8
                 ) -> torch.Tensor:
    """The ``(n, H)`` hidden states that reach ``block_name`` for calibration ``tokens``
    ``(batch, time)``; the forward pass stops at that block, so later blocks never run."""
    block = model.get_submodule(block_name)
    captured = []

    def hook(module, args):
        captured.append(args[0].detach().reshape(-1, args[0].shape[-1]))
        raise _Captured

    handle = block.register_forward_pre_hook(hook)
    try:
        for start in range(0, len(tokens), batch_size):
            with contextlib.suppress(_Captured):
                model(tokens[start:start + batch_size])
    finally:
        handle.remove()
    return torch.cat(captured)


def _check_recipe(recipe) -> list:
    if not isinstance(recipe, (list, tuple)) or not recipe:
        raise ValueError("recipe must be a non-empty list of stages, e.g. [ExpertPrune(0.125), Quantize(8)]")
    for stage in recipe:
        if not isinstance(stage, Stage) or not stage.per_layer:
            raise ValueError(f"recipe stage {stage!r} cannot be applied block by block; use stages that "
                             f"compress one mixture layer (ExpertPrune, LowRank, Quantize, ...)")
    return list(recipe)


def _update_expert_count(model: nn.Module, names: list[str]) -> None:
    counts = {model.get_submodule(n).num_experts for n in names}
    config = getattr(model, "config", None)
    if len(counts) == 1 and config is not None:
        (count,) = counts
        for attribute in ("num_local_experts", "num_experts"):
            if hasattr(config, attribute):
                setattr(config, attribute, count)
                break


@torch.no_grad()
def compress_model(model: nn.Module, recipe: list, calibration_tokens: torch.Tensor, *,
                   batch_size: int = 8, progress: bool = False) -> nn.Module:
    """Apply ``recipe`` (stages from :mod:`moe_lab.compress.pipeline`: ``ExpertPrune``,
    ``MergeExperts``, ``LowRank``, ``Quantize``, ``MagnitudePrune``) to every MoE block of a
    Hugging Face causal LM, in place, and return the model.

    Block by block: the block's inputs are captured on ``calibration_tokens``
    ``(batch, time)`` with the blocks before it already compressed, the block is converted
    with :func:`from_hf`, compressed, and put back. Only one block's activations are held
    at a time. The router stays in float. After expert pruning or merging, the config's
    expert count is updated when every block ends with the same number.
    """
    recipe = _check_recipe(recipe)
    if (not isinstance(calibration_tokens, torch.Tensor) or calibration_tokens.dim() != 2
            or calibration_tokens.is_floating_point()):
        raise ValueError("calibration_tokens must be a (batch, time) tensor of token ids")
    names = moe_blocks(model)
    was_training = model.training
    model.eval()
    for i, name in enumerate(names):
        x = block_inputs(model, name, calibration_tokens, batch_size)
        block = model.get_submodule(name)
        layer = block if isinstance(block, SwiGLUMoE) else from_hf(block)
        for stage in recipe:
            layer = stage.apply(layer, x)
        replace_module(model, name, layer)
        del x
        if progress:
            print(f"compressed block {i + 1}/{len(names)}: {name}")
    _update_expert_count(model, names)
    model.train(was_training)
    return model
