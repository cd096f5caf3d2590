"""Argument checks shared by the layers: each raises an error that names the parameter."""

from __future__ import annotations

import math

import torch


def positive_int(name: str, value) -> int:
    """Return ``value`` if it is an int >= 1, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def finite_float(name: str, value, *, minimum: float | None = None, strict: bool = False) -> float:
    """Return ``value`` as a float if it is finite (and >= / > ``minimum``), else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be {relation} {minimum}, got {value}")
    return value


def last_dim(name: str, x, expected: int) -> None:
    """Raise unless ``x`` is a floating tensor whose last dimension is ``expected``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != expected:
        raise ValueError(f"{name} must have last dimension {expected}, got shape {tuple(x.shape)}")


def factor_sizes(in_features, out_features, rank) -> None:
    """Check the sizes of a rank-``rank`` factorisation of an ``out x in`` matrix."""
    positive_int("in_features", in_features)
    positive_int("out_features", out_features)
    positive_int("rank", rank)
    if rank > min(in_features, out_features):
        raise ValueError(f"rank must be <= min(in_features, out_features) = "
                         f"{min(in_features, out_features)}, got {rank}")
