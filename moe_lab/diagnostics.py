"""Expert utilisation: which share of the routed tokens each expert receives.

A healthy router spreads tokens over all experts; a collapsed one sends nearly everything to
one or two. These numbers come from routing counts (``TopKMoE.tokens_per_expert``) or from a
dense layer's gate probabilities. :func:`train_recording_shares` trains a model while recording
them epoch by epoch, to watch router collapse appear (or not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from moe_lab._checks import finite_float, positive_int
from moe_lab.layers.base import MixtureLayer
from moe_lab.training import evaluate, train


def expert_share(counts: torch.Tensor) -> torch.Tensor:
    """Fraction of routed assignments per expert: ``counts / counts.sum()`` as float ``(E,)``."""
    counts = torch.as_tensor(counts, dtype=torch.float64).reshape(-1)
    if counts.numel() == 0 or (counts < 0).any():
        raise ValueError("counts must be a non-empty vector of non-negative numbers")
    total = counts.sum()
    if total == 0:
        raise ValueError("counts must not all be zero")
    return counts / total


def utilisation_entropy(counts: torch.Tensor, normalized: bool = True) -> float:
    """Entropy of :func:`expert_share` in nats; with ``normalized`` divided by ``log(E)``,
    so 1.0 means perfectly even use and 0.0 means a single expert gets everything."""
    share = expert_share(counts)
    nonzero = share[share > 0]
    entropy = max(0.0, float(-(nonzero * nonzero.log()).sum()))  # never -0.0
    if not normalized:
        return entropy
    return entropy / math.log(share.numel()) if share.numel() > 1 else 1.0


@dataclass
class ShareHistory:
    """What :func:`train_recording_shares` measured.

    Attributes:
        shares: ``(epochs + 1, E)`` share of the routed assignments per expert on the
            probe inputs, row 0 before training, row ``t`` after epoch ``t``.
        entropy: normalised utilisation entropy of each row (1.0 even, 0.0 one expert).
        losses: mean task loss of each training epoch (without the aux losses).
        accuracy: test accuracy after training, if test data was given, else ``None``.
    """

    shares: torch.Tensor
    entropy: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    accuracy: float | None = None


def _find_mixture(model: nn.Module) -> MixtureLayer:
    layers = [m for m in model.modules() if isinstance(m, MixtureLayer)]
    if len(layers) != 1:
        raise ValueError(f"model must contain exactly one mixture layer, found {len(layers)}")
    return layers[0]


@torch.no_grad()
def measure_shares(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Per-expert share ``(E,)`` of the routed assignments of ``inputs`` (model in eval mode).

    Routing is counted before any capacity cut (``layer.tokens_per_expert``).
    """
    layer = _find_mixture(model)
    was_training = model.training
    model.eval()
    model(inputs)
    model.train(was_training)
    return expert_share(layer.tokens_per_expert)


def train_recording_shares(model: nn.Module, train_data, *, epochs: int, lr: float, batch_size: int,
                           test_data=None, probe: torch.Tensor | None = None, seed: int = 0
                           ) -> ShareHistory:
    """Train ``model`` (containing one mixture layer) with :func:`moe_lab.train`, one epoch
    at a time, recording the expert shares on ``probe`` (default: the training inputs) after
    every epoch. ``train_data`` and ``test_data`` are ``(inputs, targets)`` pairs.

    The optimizer (AdamW) is kept across epochs, and each epoch shuffles with ``seed + epoch``.
    """
    positive_int("epochs", epochs)
    positive_int("batch_size", batch_size)
    finite_float("lr", lr, minimum=0.0, strict=True)
    _find_mixture(model)
    probe = train_data[0] if probe is None else probe
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rows = [measure_shares(model, probe)]
    losses = []
    for epoch in range(epochs):
        losses += train(model, train_data, epochs=1, lr=lr, batch_size=batch_size, seed=seed + epoch,
                        optimizer=optimizer, progress=False)
        rows.append(measure_shares(model, probe))
    shares = torch.stack(rows)
    entropy = [utilisation_entropy(row) for row in shares]
    accuracy = None if test_data is None else evaluate(model, test_data)["accuracy"]
    return ShareHistory(shares=shares, entropy=entropy, losses=losses, accuracy=accuracy)
