"""Standard Hugging Face checkpoints of compressed models, loadable without moe_lab.

Expert pruning and merging leave experts that are ordinary float matrices, only fewer of
them: :func:`save_pretrained` writes them back into the family's own block layout and the
config's expert count, so plain ``AutoModelForCausalLM.from_pretrained(folder)`` (and any
engine that serves the family) loads the pruned model. Experts stored in a moe_lab format
(int8/int4, low-rank, sparse, base + delta) have no such place; saving them raises an error
naming the stage, and :func:`moe_lab.save` / :func:`moe_lab.load` keep them instead.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from moe_lab.hf.block import HFMoEBlock
from moe_lab.hf.convert import hf_state
from moe_lab.hf.families import BY_NAME
from moe_lab.hf.model import expert_counts, set_expert_counts

#: The stage that leaves each moe_lab expert storage behind.
STAGE_OF = {"QuantizedLinear": "Quantize (int8/int4 weights)", "LowRankLinear": "LowRank",
            "SparseLinear": "MagnitudePrune with sparse storage", "BaseDeltaLinear": "base + delta sharing"}


def _no_hf_format(name: str, error: TypeError, layer: nn.Module) -> ValueError:
    kinds = sorted({type(m).__name__ for m in layer.modules() if type(m).__name__ in STAGE_OF})
    stages = ", ".join(STAGE_OF[k] for k in kinds) or "a stage that changed the experts' storage"
    return ValueError(f"{name}: {error}. Its experts were stored by {stages}, which has no Hugging Face "
                      f"checkpoint format that transformers reads here (transformers keeps a model's "
                      f"experts as fused float tensors). Save it with moe_lab.save(model, folder) and "
                      f"reload it with moe_lab.load, or call moe_lab.hf.save_pretrained before that stage "
                      f"(expert pruning and merging alone give a standard checkpoint).")


def save_pretrained(model: nn.Module, folder: str | Path, **kwargs) -> Path:
    """Write ``model`` (a Hugging Face causal LM compressed by
    :func:`~moe_lab.hf.model.compress_model`) to ``folder`` as a standard checkpoint of its own
    architecture, with the expert count (and ``num_experts_per_tok``) in its config changed;
    return the folder. ``kwargs`` go to transformers' ``save_pretrained``.

    Reloads with plain ``AutoModelForCausalLM.from_pretrained(folder)`` to the same outputs.
    Raises ``ValueError`` if a block's experts are not plain float matrices (quantized,
    low-rank, sparse: the message names the stage), if blocks were left with different expert
    counts, or if a router can no longer be expressed by the family's config (DeepSeek-V3
    groups of unequal size after pruning).
    """
    names = [name for name, m in model.named_modules() if isinstance(m, HFMoEBlock)]
    state = {key: value for key, value in model.state_dict().items()
             if not any(key.startswith(f"{name}.") for name in names)}
    config = copy.deepcopy(model.config)
    if names:
        counts = expert_counts(model, names)
        if counts is None:
            raise ValueError("the MoE blocks have different numbers of experts (or k), which one "
                             "Hugging Face "
                             "config cannot say; save with moe_lab.save instead")
        for name in names:
            block = model.get_submodule(name)
            try:
                tensors = hf_state(block.moe, BY_NAME[block.config["family"]])
            except TypeError as error:
                raise _no_hf_format(name, error, block.moe) from None
            state.update({f"{name}.{key}": value for key, value in tensors.items()})
        set_expert_counts(config, model.get_submodule(names[0]).config["family"], *counts)
    with torch.device("meta"):  # the structure only: every tensor comes from ``state``
        fresh = type(model)(config)
    try:
        fresh.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"cannot write a {type(model).__name__} checkpoint from this model: "
                         f"{error}") from None
    folder = Path(folder)
    fresh.save_pretrained(folder, **kwargs)
    return folder
