"""Expert utilisation: which share of the routed tokens each expert receives.

A healthy router spreads tokens over all experts; a collapsed one sends nearly everything to
one or two. These numbers come from routing counts (``TopKMoE.tokens_per_expert``) or from a
dense layer's gate probabilities.
"""

from __future__ import annotations

import math

import torch


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
