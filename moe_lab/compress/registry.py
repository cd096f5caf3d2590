"""Compression stages and the registry that recipe strings, the study command and the Hugging
Face bridge find them in.

A technique is one file: its functions plus a :class:`Stage` subclass registered with
:func:`register_stage` under a recipe pattern. Everything else (``parse_recipe``,
``python -m moe_lab study``, :func:`moe_lab.hf.compress_model`) looks stages up here; no list
of techniques is kept anywhere else.

A stage is a small dataclass with ``name`` (for reports), ``recipe`` (its normalised recipe
item), ``apply(model, calibration) -> model`` and ``from_recipe(**groups)`` (built from the
named groups of its pattern). ``per_layer = True`` means it can be applied to one mixture
layer on its own given that layer's inputs (what the Hugging Face bridge does block by block).

Stages also say which expert storage formats (:data:`FORMATS`) they can start from
(``accepts``) and which one they leave (``output_format``, ``None``: unchanged), so that
:func:`check_composition` refuses a recipe such as ``int8,merge=2`` (merging needs float
experts) before anything runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

FORMATS = ("float", "lowrank", "quantized", "sparse")  # how a stage leaves the expert matrices


class Stage:
    """Base class of compression stages (see the module docstring)."""

    per_layer: bool = True
    accepts: frozenset[str] = frozenset(FORMATS)  # expert formats this stage can be applied to
    output_format: str | None = None  # the experts' format after it (None: as before)

    @property
    def name(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def recipe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply(self, model: nn.Module, calibration: torch.Tensor) -> nn.Module:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def from_recipe(cls, item: str, **groups: str) -> Stage:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class _Entry:
    pattern: re.Pattern
    cls: type[Stage]
    example: str


STAGES: list[_Entry] = []


def register_stage(pattern: str, example: str):
    """Class decorator: recipe items that fully match ``pattern`` build this stage through
    ``cls.from_recipe(item, **named_groups)``. ``example`` is shown in error messages."""

    def add(cls: type[Stage]) -> type[Stage]:
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise TypeError(f"register_stage decorates Stage subclasses, got {cls!r}")
        compiled = re.compile(pattern)
        if any(e.example == example for e in STAGES):
            raise ValueError(f"a stage with the recipe example {example!r} is already registered")
        STAGES.append(_Entry(compiled, cls, example))
        return cls

    return add


def recipe_help() -> str:
    """The recipe items every registered stage accepts, e.g. ``prune-experts=F, int8, ...``."""
    return ", ".join(e.example for e in STAGES)


def number(item: str, value: str, kind=float, *, what: str = "the value", low=None, high=None,
           low_open=False, high_open=False):
    """``value`` of recipe ``item`` as ``kind``, checked against ``[low, high]`` (open ends if
    asked); a ``ValueError`` naming the item and ``what`` the number is otherwise. Rejects nan
    and infinities."""
    try:
        result = kind(value)
    except (ValueError, OverflowError):
        raise ValueError(f"recipe item {item!r}: {value!r} is not a {kind.__name__}") from None
    if isinstance(result, float) and not math.isfinite(result):
        raise ValueError(f"recipe item {item!r}: {value!r} must be a finite number")
    bad_low = low is not None and (result <= low if low_open else result < low)
    bad_high = high is not None and (result >= high if high_open else result > high)
    if bad_low or bad_high:
        left, right = ("(" if low_open else "["), (")" if high_open else "]")
        span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"recipe item {item!r}: {what} must be in {span}, got {value}")
    return result


def parse_stage(item: str) -> Stage:
    """The stage one recipe item names; ``ValueError`` naming the item otherwise."""
    for entry in STAGES:
        match = entry.pattern.fullmatch(item)
        if match:
            groups = {k: v for k, v in match.groupdict().items() if v is not None}
            return entry.cls.from_recipe(item, **groups)
    raise ValueError(f"unknown recipe item {item!r}; use {recipe_help()}, finetune=N")


def check_composition(stages: list[Stage], start: str = "float") -> None:
    """``ValueError`` if a stage cannot follow the ones before it (``start``: the experts' format
    before the first stage), naming both and the order that works."""
    current, made_by = start, None
    for stage in stages:
        if current not in stage.accepts:
            needs = " or ".join(f for f in FORMATS if f in stage.accepts)
            if made_by is None:
                raise ValueError(f"{stage.recipe!r} needs {needs} experts, but they are {current}")
            first, then = made_by.recipe, stage.recipe
            if type(made_by) is type(stage):
                raise ValueError(f"{then!r} after {first!r}: the experts are already {current}")
            raise ValueError(f"{then!r} cannot come after {first!r}: it needs {needs} experts and {first!r} "
                             f"leaves them {current}; put {then!r} first")
        if stage.output_format is not None:
            current, made_by = stage.output_format, stage
