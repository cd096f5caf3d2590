"""Compression techniques for MoE layers, each keeping the trained weights it compresses.

* :mod:`~moe_lab.compress.prune`: magnitude, hidden-unit and whole-expert pruning;
  :mod:`~moe_lab.compress.sparse`: bitmask storage that makes pruned zeros cheap.
* :mod:`~moe_lab.compress.quantize`: weight-only int8 / int4 (per channel or per group).
* :mod:`~moe_lab.compress.distill`: knowledge distillation.
* :mod:`~moe_lab.compress.share`: expert merging and shared base + low-rank deltas.
* :mod:`~moe_lab.compress.lowrank`: truncated-SVD low-rank experts.
* :mod:`~moe_lab.compress.pipeline`: ``compress(model, [stages], calibration)`` with a
  per-stage report of bytes and quality.
"""

from moe_lab.compress.distill import distill, distillation_loss
from moe_lab.compress.lowrank import low_rank_experts, low_rank_from_linear, rank_for_energy
from moe_lab.compress.pipeline import (
    CompressionReport,
    ExpertPrune,
    FineTune,
    LowRank,
    MagnitudePrune,
    MergeExperts,
    Quantize,
    compress,
)
from moe_lab.compress.prune import (
    expert_usage,
    magnitude_prune,
    prune_experts,
    prune_hidden_units,
    prune_model_experts,
    select_experts,
    to_sparse,
)
from moe_lab.compress.quantize import (
    QuantizedLinear,
    bits_by_usage,
    dequantize_tensor,
    expert_sensitivity,
    pack_int4,
    quantize_experts,
    quantize_tensor,
    unpack_int4,
)
from moe_lab.compress.share import BaseDeltaLinear, base_delta_experts, group_experts, merge_experts
from moe_lab.compress.sparse import SparseLinear, sparse_bytes

__all__ = ["BaseDeltaLinear", "CompressionReport", "ExpertPrune", "FineTune", "LowRank", "MagnitudePrune",
           "MergeExperts", "Quantize", "QuantizedLinear", "SparseLinear", "base_delta_experts",
           "bits_by_usage", "compress", "dequantize_tensor", "distill", "distillation_loss",
           "expert_sensitivity",
           "expert_usage", "group_experts", "low_rank_experts", "low_rank_from_linear", "magnitude_prune",
           "merge_experts", "pack_int4", "prune_experts", "prune_hidden_units", "prune_model_experts",
           "quantize_experts", "quantize_tensor", "rank_for_energy", "select_experts", "sparse_bytes",
           "to_sparse", "unpack_int4"]
