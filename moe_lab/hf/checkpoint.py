"""Standard Hugging Face checkpoints of compressed models, loadable without moe_lab.

Expert pruning and merging leave experts that are ordinary float matrices, only fewer of
them: :func:`save_pretrained` writes them back into the family's own block layout and the
config's expert count, so plain ``AutoModelForCausalLM.from_pretrained(folder)`` (and any
engine that serves the family) loads the pruned model. int8 / int4 experts (``Quantize``) are
written as a compressed-tensors checkpoint (:mod:`moe_lab.hf.compressed`), which transformers
reads too, for the families published with one linear per expert. Experts stored in another
moe_lab format (low-rank, sparse, base + delta) have no such place; saving them raises an error
naming the stage, and :func:`moe_lab.save` / :func:`moe_lab.load` keep them instead.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from moe_lab.hf.block import HFMoEBlock
from moe_lab.hf.compressed import quantized_checkpoint
from moe_lab.hf.convert import hf_state
from moe_lab.hf.families import BY_NAME
from moe_lab.hf.model import expert_counts, set_expert_counts
from moe_lab.layers.compact.quantized import QuantizedLinear

#: The stage that leaves each moe_lab expert storage behind.
STAGE_OF = {"QuantizedLinear": "Quantize (int8/int4 weights)", "LowRankLinear": "LowRank",
            "SparseLinear": "MagnitudePrune with sparse storage", "BaseDeltaLinear": "base + delta sharing"}


def _no_hf_format(name: str, error: TypeError, layer: nn.Module) -> ValueError:
    kinds = sorted({type(m).__name__ for m in layer.modules() if type(m).__name__ in STAGE_OF})
    if len(kinds) > 1:  # int8/int4 factors of a low-rank expert, say: the other storage is the obstacle
        kinds.remove("QuantizedLinear")
    stages = ", ".join(STAGE_OF[k] for k in kinds) or "a stage that changed the experts' storage"
    return ValueError(f"{name}: {error}. Its experts were stored by {stages}, which has no Hugging Face "
                      f"checkpoint format that transformers reads (it keeps a model's experts as fused "
                      f"float tensors; only int8/int4 experts have one, compressed-tensors). Save it with "
                      f"moe_lab.save(model, folder) and reload it with moe_lab.load, or call "
                      f"moe_lab.hf.save_pretrained before that stage (expert pruning and merging alone give "
                      f"a standard checkpoint).")


def save_pretrained(model: nn.Module, folder: str | Path, **kwargs) -> Path:
    """Write ``model`` (a Hugging Face causal LM compressed by
    :func:`~moe_lab.hf.model.compress_model`) to ``folder`` as a standard checkpoint of its own
    architecture, with the expert count (and ``num_experts_per_tok``) in its config changed;
    return the folder. ``kwargs`` go to transformers' ``save_pretrained``.

    Reloads with plain ``AutoModelForCausalLM.from_pretrained(folder)`` to the same outputs.
    int8/int4 experts are written as a compressed-tensors checkpoint (reloading it needs the
    ``compressed-tensors`` package; the reloaded experts are the dequantized weights moe_lab
    computes with). Raises ``ValueError`` if a block's experts are stored otherwise (low-rank,
    sparse: the message names the stage), if a family has no per-expert layout for int8/int4,
    if blocks were left with different expert counts, or if a router can no longer be expressed
    by the family's config (DeepSeek-V3 groups of unequal size after pruning).
    """
    names = [name for name, m in model.named_modules() if isinstance(m, HFMoEBlock)]
    blocks = [(name, model.get_submodule(name).moe, BY_NAME[model.get_submodule(name).config["family"]])
              for name in names]
    state = {key: value for key, value in model.state_dict().items()
             if not any(key.startswith(f"{name}.") for name in names)}
    config = copy.deepcopy(model.config)
    if names:
        counts = expert_counts(model, names)
        if counts is None:
            raise ValueError("the MoE blocks have different numbers of experts (or k), which one "
                             "Hugging Face config cannot say; save with moe_lab.save instead")
        set_expert_counts(config, blocks[0][2].name, *counts)
    with torch.device("meta"):  # the structure only: every tensor comes from ``state``
        fresh = type(model)(config)
    folder = Path(folder)
    if any(isinstance(m, QuantizedLinear) for _, layer, _ in blocks for m in layer.modules()):
        return _save_quantized(model, fresh, blocks, state, folder)
    for name, layer, family in blocks:
        try:
            tensors = hf_state(layer, family)
        except TypeError as error:
            raise _no_hf_format(name, error, layer) from None
        state.update({f"{name}.{key}": value for key, value in tensors.items()})
    try:
        fresh.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"cannot write a {type(model).__name__} checkpoint from this model: "
                         f"{error}") from None
    fresh.save_pretrained(folder, **kwargs)
    return folder


def _save_quantized(model: nn.Module, fresh: nn.Module, blocks: list, state: dict, folder: Path) -> Path:
    """int8/int4 experts: a compressed-tensors checkpoint (config, generation config, weights)."""
    for name, layer, _ in blocks:
        kinds = {type(m).__name__ for m in layer.modules()} & (set(STAGE_OF) - {"QuantizedLinear"})
        if kinds:
            error = TypeError(f"its experts hold {', '.join(sorted(kinds))} modules")
            raise _no_hf_format(name, error, layer)
    tensors, fresh.config.quantization_config = quantized_checkpoint(fresh, blocks, state, model.dtype)
    fresh.config.dtype = model.dtype  # what from_pretrained builds the float model in
    if getattr(fresh.config, "tie_word_embeddings", False):
        for tied in getattr(fresh, "_tied_weights_keys", None) or {}:
            tensors.pop(tied, None)
    folder.mkdir(parents=True, exist_ok=True)
    fresh.config.save_pretrained(folder)
    if fresh.can_generate():
        fresh.generation_config.save_pretrained(folder)
    save_file({key: value.detach().contiguous() for key, value in tensors.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
