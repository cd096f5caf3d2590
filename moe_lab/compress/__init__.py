"""Compression techniques for MoE layers (in progress: weight quantization and SVD low-rank so far)."""

from moe_lab.compress.lowrank import low_rank_from_linear, rank_for_energy
from moe_lab.compress.quantize import (
           QuantizedLinear,
           dequantize_tensor,
           pack_int4,
           quantize_tensor,
           unpack_int4,
)

__all__ = ["QuantizedLinear", "dequantize_tensor", "low_rank_from_linear", "pack_int4", "quantize_tensor",
           "rank_for_energy", "unpack_int4"]
