"""Mixture-of-experts layers and the compact linears that compression puts inside them.

* :mod:`~moe_lab.layers.base`: :class:`MixtureLayer`, the interface every mixture implements;
* :mod:`~moe_lab.layers.routing`: routing rules and losses as plain functions;
  :mod:`~moe_lab.layers.dispatch`: running routed experts without a token loop;
* the mixtures: :class:`DenseMoE` and :class:`SharedTrunkMoE` (:mod:`~moe_lab.layers.dense`),
  :class:`TopKMoE` (:mod:`~moe_lab.layers.topk`), :class:`SwiGLUMoE`
  (:mod:`~moe_lab.layers.swiglu`), :class:`SlotSoftMoE` (:mod:`~moe_lab.layers.slot`);
* :mod:`~moe_lab.layers.compact`: low-rank, quantized, sparse and base + delta linears;
* :mod:`~moe_lab.layers.reference`: the deck's slow layers, kept to test against;
* :mod:`~moe_lab.layers.registry`: the classes :func:`moe_lab.load` may rebuild.
"""

import warnings

from moe_lab.layers.base import ExpertLoad, MixtureLayer, mixture_layers
from moe_lab.layers.compact import (
    BaseDeltaLinear,
    CompactLinear,
    LowRankLinear,
    QuantizedLinear,
    SparseLinear,
)
from moe_lab.layers.dense import DenseMoE, SharedTrunkMoE
from moe_lab.layers.slot import SlotSoftMoE
from moe_lab.layers.swiglu import SwiGLUMoE
from moe_lab.layers.topk import TopKMoE, collect_aux_loss

__all__ = ["BaseDeltaLinear", "CompactLinear", "DenseMoE", "ExpertLoad", "LowRankLinear", "MixtureLayer",
           "QuantizedLinear", "SharedTrunkMoE", "SlotSoftMoE", "SparseLinear", "SwiGLUMoE", "TopKMoE",
           "collect_aux_loss", "mixture_layers"]


def __getattr__(name: str):
    if name == "SoftMoE":
        warnings.warn("moe_lab.SoftMoE is now DenseMoE (Soft MoE is Puigcerver et al.'s slot layer, "
                      "SlotSoftMoE); the old name will be removed in the next release",
                      DeprecationWarning, stacklevel=2)
        return DenseMoE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
