"""Small training experiments that record how a top-k router spreads tokens over its experts.

Used by the sparse-gating notebook to watch router collapse (one expert takes everything)
appear, or not, epoch by epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from moe_lab._checks import finite_float, positive_int
from moe_lab.diagnostics import expert_share, utilisation_entropy
from moe_lab.topk_moe import TopKMoE
from moe_lab.training import evaluate, train


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


def _find_topk(model: nn.Module) -> TopKMoE:
    layers = [m for m in model.modules() if isinstance(m, TopKMoE)]
    if len(layers) != 1:
        raise ValueError(f"model must contain exactly one TopKMoE layer, found {len(layers)}")
    return layers[0]


@torch.no_grad()
def measure_shares(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Per-expert share ``(E,)`` of the routed assignments of ``inputs`` (model in eval mode).

    Routing is counted before any capacity cut (``TopKMoE.tokens_per_expert``).
    """
    layer = _find_topk(model)
    was_training = model.training
    model.eval()
    model(inputs)
    model.train(was_training)
    return expert_share(layer.tokens_per_expert)


def train_recording_shares(model: nn.Module, train_data, *, epochs: int, lr: float, batch_size: int,
                           test_data=None, probe: torch.Tensor | None = None, seed: int = 0
                           ) -> ShareHistory:
    """Train ``model`` (containing one :class:`TopKMoE`) with :func:`moe_lab.train`, one epoch
    at a time, recording the expert shares on ``probe`` (default: the training inputs) after
    every epoch. ``train_data`` and ``test_data`` are ``(inputs, targets)`` pairs.

    The optimizer (AdamW) is kept across epochs, and each epoch shuffles with ``seed + epoch``.
    """
    positive_int("epochs", epochs)
    positive_int("batch_size", batch_size)
    finite_float("lr", lr, minimum=0.0, strict=True)
    _find_topk(model)
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
