"""What every compact linear layer (low-rank, quantized, sparse, base + delta) shares."""

from __future__ import annotations

import torch
import torch.nn as nn


class CompactLinear(nn.Module):
    """A stand-in for ``nn.Linear`` that stores its ``(out_features, in_features)`` weight in a
    smaller form. Subclasses keep ``in_features``, ``out_features``, ``config`` (their
    constructor arguments) and expose ``weight`` (the float matrix they represent) and ``bias``.

    ``WEIGHT_IN_BUFFERS``: the weight is held in buffers (integers, bitmasks), not trainable
    parameters; such a layer still computes with ``in * out`` logical weights per token.
    """

    WEIGHT_IN_BUFFERS = False
    in_features: int
    out_features: int

    @property
    def weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def logical_params(self) -> int:
        """The number of weights this layer stands for: ``in * out`` (+ ``out`` with a bias)."""
        return self.in_features * self.out_features + (self.bias is not None) * self.out_features
