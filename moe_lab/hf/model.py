"""Compressing every MoE block of a Hugging Face causal LM, block by block, in place."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from moe_lab.compress.registry import Stage
from moe_lab.compress.targets import replace_module
from moe_lab.hf.block import HFMoEBlock
from moe_lab.hf.convert import forget_forward, from_hf
from moe_lab.hf.families import BLOCKS, BY_NAME, family_of, supported

SAVE_PRETRAINED_REFUSED = (
    "this model's MoE blocks were converted by moe_lab (compress_model): transformers' save_pretrained "
    "would write a checkpoint that from_pretrained reloads with random experts. Use moe_lab.save(model, "
    "folder) (reload with moe_lab.load), or moe_lab.hf.save_pretrained(model, folder) for a standard "
    "checkpoint transformers loads (pruned or merged float experts).")


def moe_blocks(model: nn.Module) -> list[str]:
    """Dotted names of the model's MoE blocks (supported Hugging Face ones, or already converted)."""
    names = [name for name, m in model.named_modules()
             if type(m).__name__ in BLOCKS or isinstance(m, HFMoEBlock)]
    if not names:
        raise ValueError(f"model has no supported MoE block (supported: {supported()})")
    return names


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the block's input is seen."""


@torch.no_grad()
def block_inputs(model: nn.Module, block_name: str, tokens: torch.Tensor, batch_size: int = 8
                 ) -> torch.Tensor:
    """The ``(n, H)`` hidden states that reach ``block_name`` for calibration ``tokens``
    ``(batch, time)``, in the model's dtype and device; the forward pass stops at that block,
    so later blocks never run."""
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


@torch.no_grad()
def _check_kept(layer: nn.Module, x: torch.Tensor, stage: Stage, name: str) -> None:
    """``RuntimeError`` naming ``stage`` if it moved the layer off ``x``'s device, left float
    parameters in another dtype, or made the layer's output another dtype."""
    devices = {t.device for t in [*layer.parameters(), *layer.buffers()]}
    dtypes = {p.dtype for p in layer.parameters() if p.is_floating_point()}
    problem = None
    if devices != {x.device} or dtypes - {x.dtype}:
        problem = f"weights {sorted(map(str, dtypes))} on {sorted(map(str, devices))}"
    else:
        try:
            out = layer(x[:16])
        except RuntimeError as error:  # e.g. float32 values stored in buffers meet bfloat16 inputs
            out, problem = None, f"its forward fails: {error}"
        forget_forward(layer)
        if out is not None and out.dtype != x.dtype:
            problem = f"output {out.dtype}"
    if problem:
        raise RuntimeError(f"stage {stage.name!r} on {name} did not keep the block's dtype and device "
                           f"({x.dtype} on {x.device}): {problem}")


def _configs(model: nn.Module) -> list:
    """The configs of the model and its transformers submodels (e.g. a text model inside)."""
    configs = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(config, "to_dict") and all(config is not c for c in configs):
            configs.append(config)
    return configs


def expert_counts(model: nn.Module, names: list[str]) -> tuple[int, int] | None:
    """``(experts, k)`` shared by every converted block in ``names``, or ``None`` if they differ."""
    shapes = {(model.get_submodule(n).moe.num_experts, model.get_submodule(n).moe.k) for n in names}
    return next(iter(shapes)) if len(shapes) == 1 else None


def set_expert_counts(config, family: str, experts: int, k: int) -> None:
    """Write the routed expert count and ``k`` into a transformers ``config``, under the names the
    family's config uses."""
    for attribute in BY_NAME[family].expert_count:
        if hasattr(config, attribute):
            setattr(config, attribute, experts)
    if hasattr(config, "num_experts_per_tok"):
        config.num_experts_per_tok = k


def _update_expert_count(model: nn.Module, names: list[str]) -> None:
    """After pruning or merging: the expert count and ``k`` in every config and in the model
    attributes the router loss reads (``num_experts``, ``num_experts_per_tok``)."""
    counts = expert_counts(model, names)
    if counts is None:
        return
    experts, k = counts
    family = model.get_submodule(names[0]).config["family"]
    for config in _configs(model):
        set_expert_counts(config, family, experts, k)
    for module in model.modules():
        if hasattr(getattr(module, "config", None), "to_dict"):  # the transformers models themselves
            if isinstance(getattr(module, "num_experts", None), int):
                module.num_experts = experts
            if isinstance(getattr(module, "num_experts_per_tok", None), int):
                module.num_experts_per_tok = k


def refuse_save_pretrained(*args, **kwargs):
    """Stands in for ``save_pretrained`` on a model compressed by :func:`compress_model`."""
    raise RuntimeError(SAVE_PRETRAINED_REFUSED)


@torch.no_grad()
def compress_model(model: nn.Module, recipe: list, calibration_tokens: torch.Tensor, *,
                   batch_size: int = 8, progress: bool = False) -> nn.Module:
    """Apply ``recipe`` (stages from :mod:`moe_lab.compress`: ``ExpertPrune``, ``MergeExperts``,
    ``LowRank``, ``Quantize``, ``MagnitudePrune``) to every MoE block of a Hugging Face causal
    LM, in place, and return the model.

    Block by block: the block's inputs are captured on ``calibration_tokens``
    ``(batch, time)`` with the blocks before it already compressed, the block is converted
    with :func:`~moe_lab.hf.convert.from_hf` (checked on a probe batch), compressed, and put
    back as an :class:`~moe_lab.hf.block.HFMoEBlock`. Only one block's activations are held at
    a time. Every stage must keep the model's dtype and device (``RuntimeError`` naming it
    otherwise). The router stays in float. After expert pruning or merging, the expert count
    in the config (and in the model attributes the router loss reads) is updated when every
    block ends with the same number, so ``output_router_logits=True`` keeps working.

    The model's own ``save_pretrained`` is replaced by one that raises (it would write
    experts transformers reloads at random); use :func:`moe_lab.save` or
    :func:`moe_lab.hf.save_pretrained`.
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
        if isinstance(block, HFMoEBlock):
            layer, family = block.moe, block.config["family"]
        else:
            layer, family = from_hf(block), family_of(block).name
        for stage in recipe:
            layer = stage.apply(layer, x)
            _check_kept(layer, x, stage, name)
        replace_module(model, name, HFMoEBlock.around(layer, family))
        del x
        if progress:
            print(f"compressed block {i + 1}/{len(names)}: {name}")
    _update_expert_count(model, names)
    model.save_pretrained = refuse_save_pretrained
    model.train(was_training)
    return model
