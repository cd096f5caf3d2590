"""Metric-versus-setting sweeps: apply one compression setting at a time to a fresh model.

A curve such as "accuracy against sparsity" needs the same three steps per point: get a fresh
copy of the trained model, compress it with one setting, measure it. :func:`sweep` does that
loop and returns one record (a dict) per setting, ready for plotting or a ``pandas.DataFrame``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from numbers import Real
from typing import Any

import torch.nn as nn


def sweep(make_model: Callable[[], nn.Module], settings: Iterable[Any],
          apply: Callable[[nn.Module, Any], nn.Module | None],
          evaluate: Callable[[nn.Module], Real | dict[str, Any]]) -> list[dict[str, Any]]:
    """Measure ``evaluate(apply(make_model(), s))`` for every setting ``s``.

    Args:
        make_model: returns a fresh model each call (e.g. ``lambda: copy.deepcopy(trained)``),
            so that one setting never sees another's changes.
        settings: the values to try (sparsities, numbers of experts kept...), in plot order.
        apply: ``apply(model, setting)`` compresses ``model``; it returns the compressed model
            or ``None`` if it changed ``model`` in place.
        evaluate: ``evaluate(model)`` returns a number or a dict of numbers.

    Returns:
        One record per setting: ``{"setting": s, **metrics}`` for a dict result, else
        ``{"setting": s, "metric": value}``.
    """
    for name, fn in [("make_model", make_model), ("apply", apply), ("evaluate", evaluate)]:
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    settings = list(settings)
    if not settings:
        raise ValueError("settings must hold at least one value")
    records = []
    for setting in settings:
        model = make_model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"make_model must return an nn.Module, got {type(model).__name__}")
        compressed = apply(model, setting)
        result = evaluate(model if compressed is None else compressed)
        if isinstance(result, dict):
            records.append({"setting": setting, **result})
        elif isinstance(result, Real):
            records.append({"setting": setting, "metric": float(result)})
        else:
            raise TypeError(f"evaluate must return a number or a dict, got {type(result).__name__}")
    return records
