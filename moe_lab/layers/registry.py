"""The classes :func:`moe_lab.load` may rebuild, by name: every mixture layer, compact linear and
case-study model registers itself here with :func:`register_layer`.

A class registered here must keep its constructor arguments in ``self.config`` (a JSON-able
dict): an artifact stores the class name and that dict, never pickled code.
"""

from __future__ import annotations

import torch.nn as nn

LAYERS: dict[str, type[nn.Module]] = {}


def register_layer(cls: type[nn.Module] | None = None, *, aliases: tuple[str, ...] = ()):
    """Class decorator: make ``cls`` rebuildable by :func:`moe_lab.load` under its name (and
    under ``aliases``, older names that saved artifacts may still carry)."""

    def add(klass: type[nn.Module]) -> type[nn.Module]:
        for name in (klass.__name__, *aliases):
            if LAYERS.get(name, klass) is not klass:
                raise ValueError(f"layer name {name!r} is already registered by {LAYERS[name].__qualname__}")
            LAYERS[name] = klass
        return klass

    return add if cls is None else add(cls)
