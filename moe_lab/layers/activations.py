"""Expert activations by name, so a layer's config stays plain JSON."""

from __future__ import annotations

import torch.nn.functional as F

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def get_activation(name: str | None):
    """Return the function for ``name`` (``None`` means identity, the deck's linear experts)."""
    if name is None:
        return None
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]
