"""Compression techniques for MoE layers, each keeping the trained weights it compresses.

One file per technique, each registering its :class:`~moe_lab.compress.registry.Stage`:

* :mod:`~moe_lab.compress.prune`: magnitude, hidden-unit and whole-expert pruning
  (``ExpertPrune``, ``MagnitudePrune``);
* :mod:`~moe_lab.compress.quantize`: weight-only int8 / int4 by round-to-nearest or GPTQ
  (:mod:`~moe_lab.compress.gptq`), mixed precision (``Quantize``);
* :mod:`~moe_lab.compress.share`: expert merging and shared base + low-rank deltas (``MergeExperts``);
* :mod:`~moe_lab.compress.lowrank`: truncated-SVD or activation-aware low-rank experts (``LowRank``);
* :mod:`~moe_lab.compress.distill`: knowledge distillation.

Around them: :mod:`~moe_lab.compress.calibration` (what each expert receives: routed tokens,
input Hessians, layer-by-layer calibration), :mod:`~moe_lab.compress.registry` (stages by recipe pattern),
:mod:`~moe_lab.compress.recipes` (recipe strings), :mod:`~moe_lab.compress.pipeline`
(``compress(model, [stages], calibration)`` with a per-stage report) and
:mod:`~moe_lab.compress.targets` (which modules of a model are compressed).

To add a technique: write its file with a registered ``Stage`` and import it below.
"""

from moe_lab.compress.calibration import CoverageWarning, expert_contributions, routed_tokens
from moe_lab.compress.distill import distill, distillation_loss
from moe_lab.compress.gptq import gptq_experts, gptq_quantize
from moe_lab.compress.lowrank import (
    LowRank,
    activation_low_rank,
    activation_low_rank_experts,
    low_rank_experts,
    low_rank_from_linear,
    rank_for_energy,
)
from moe_lab.compress.pipeline import CompressionReport, FineTune, compress
from moe_lab.compress.prune import (
    EXPERT_SCORES,
    ExpertPrune,
    MagnitudePrune,
    expert_usage,
    magnitude_prune,
    prune_experts,
    prune_hidden_units,
    prune_model_experts,
    reap_scores,
    select_experts,
    to_sparse,
)
from moe_lab.compress.quantize import Quantize, bits_by_usage, expert_sensitivity, quantize_experts
from moe_lab.compress.recipes import normalize_recipe, parse_recipe
from moe_lab.compress.registry import Stage, register_stage
from moe_lab.compress.share import MergeExperts, base_delta_experts, group_experts, merge_experts
from moe_lab.layers.compact import BaseDeltaLinear, QuantizedLinear, SparseLinear
from moe_lab.layers.compact.quantized import dequantize_tensor, pack_int4, quantize_tensor, unpack_int4
from moe_lab.layers.compact.sparse import sparse_bytes

__all__ = ["EXPERT_SCORES", "BaseDeltaLinear", "CompressionReport", "CoverageWarning", "ExpertPrune",
           "FineTune", "LowRank", "MagnitudePrune", "MergeExperts", "Quantize", "QuantizedLinear",
           "SparseLinear", "Stage", "activation_low_rank", "activation_low_rank_experts",
           "base_delta_experts", "bits_by_usage", "compress", "dequantize_tensor", "distill",
           "distillation_loss", "expert_contributions", "expert_sensitivity", "expert_usage", "gptq_experts",
           "gptq_quantize", "group_experts", "low_rank_experts", "low_rank_from_linear", "magnitude_prune",
           "merge_experts", "normalize_recipe", "pack_int4", "parse_recipe", "prune_experts",
           "prune_hidden_units", "prune_model_experts", "quantize_experts", "quantize_tensor",
           "rank_for_energy", "reap_scores", "register_stage", "routed_tokens", "select_experts",
           "sparse_bytes", "to_sparse", "unpack_int4"]
