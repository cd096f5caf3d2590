"""Compact stand-ins for ``nn.Linear``: each stores the same matrix in fewer bytes.

* :class:`LowRankLinear`: two thin factors (slide 9);
* :class:`QuantizedLinear`: int8 / packed int4 values and per-channel or per-group scales;
* :class:`SparseLinear`: a bitmask plus the non-zero values;
* :class:`BaseDeltaLinear`: a shared base weight plus a low-rank delta.
"""

from moe_lab.layers.compact.base import CompactLinear
from moe_lab.layers.compact.base_delta import BaseDeltaLinear
from moe_lab.layers.compact.lowrank import LowRankLinear
from moe_lab.layers.compact.quantized import QuantizedLinear
from moe_lab.layers.compact.sparse import SparseLinear

__all__ = ["BaseDeltaLinear", "CompactLinear", "LowRankLinear", "QuantizedLinear", "SparseLinear"]
