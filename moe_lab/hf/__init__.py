"""Compress Hugging Face MoE models (transformers 5.x) with moe_lab, and save them back.

Supported blocks (:mod:`moe_lab.hf.families`, one small adapter each): Mixtral, OLMoE,
Qwen2-MoE, Qwen3-MoE, Qwen3-Next / Qwen3.5-MoE, DeepSeek-V3 (and GLM-4.5 MoE, dots1, built
the same way), GPT-OSS, Granite-MoE and Llama 4. Transformers 5 stores each block's experts
as fused 3-D tensors next to a router; :func:`from_hf` turns such a block into a
:class:`moe_lab.SwiGLUMoE` with ``nn.Linear`` experts, the family's routing rule and the same
outputs (checked on a probe batch every time), so the course's techniques apply;
:func:`compress_model` does that for every block of a causal LM, block by block, and puts the
compressed layers back into the model (as :class:`~moe_lab.hf.block.HFMoEBlock`), which still
runs ``forward``, ``generate`` and the router loss, and saves with :func:`moe_lab.save`
(reloaded by :func:`moe_lab.load`). :func:`save_pretrained` writes pruned or merged models as
standard checkpoints that plain transformers loads, and int8/int4 experts as compressed-tensors
checkpoints (:mod:`moe_lab.hf.compressed`).

Needs the optional extra ``hf`` (``pip install -e '.[hf]'``: transformers, accelerate).

Larger-than-memory checkpoints: load them with accelerate's big-model loading, e.g.
``AutoModelForCausalLM.from_pretrained(name, device_map="auto", offload_folder="offload",
max_memory={"cpu": "8GiB"})``. Offloaded blocks keep their weights on disk;
:func:`from_hf` reads each block inside ``accelerate.utils.align_module_device``, so only
one block's float weights are in memory at a time, and :func:`compress_model` keeps only
one block's calibration activations.
"""

import contextlib

from moe_lab.artifact import import_transformers

with contextlib.suppress(ImportError):  # the optional extra; imported once, quietly, so that the
    import_transformers()  # learner's own `transformers.MixtralForCausalLM` prints no torchao log lines

from moe_lab.hf.block import HFMoEBlock  # noqa: E402
from moe_lab.hf.checkpoint import save_pretrained
from moe_lab.hf.convert import from_hf, hf_state
from moe_lab.hf.families import FAMILIES, family_of, supported
from moe_lab.hf.model import block_inputs, compress_model, moe_blocks

__all__ = ["FAMILIES", "HFMoEBlock", "block_inputs", "compress_model", "family_of", "from_hf", "hf_state",
           "moe_blocks", "save_pretrained", "supported"]
