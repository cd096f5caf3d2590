"""The course's tasks and their trained base models, defined once for notebooks and the study.

A :class:`Task` holds a task's data, a factory for its untrained model and the settings that
train it (:func:`build_task`). :func:`trained_model` trains that model with a fixed seed, or
loads it from a cache when the same task, profile, seed and training recipe were trained before
on this machine, so that notebooks 04, 11, 13 and 14 and ``python -m moe_lab study`` compress the
same base model without each paying for its training::

    task = build_task("wikitext2", get_profile())
    base = trained_model(task)           # base.model, base.seconds, base.source ("trained"/"cache")

The cache lives in ``<cache_dir()>/base-models/`` (see :func:`moe_lab.data.cache_dir`), one
``moe_lab.save`` folder per key; its weights' sha256 is checked on every load, and a folder that
does not load is trained again and replaced. ``cache=False`` (or ``MOE_LAB_BASE_CACHE=0``)
always trains. The key covers everything that decides the weights: the task, every field of the
profile, the seed, :data:`RECIPE_VERSION`, the versions of moe_lab and torch, and torch's thread
count (float sums differ with it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

import moe_lab
from moe_lab import artifact
from moe_lab.data import load_cifar10, load_wikitext2, make_clustered_task, make_lm_blocks, to_image_tensor
from moe_lab.data.paths import cache_dir
from moe_lab.layers.topk import TopKMoE
from moe_lab.models import build_image_classifier, build_language_model
from moe_lab.profiles import Profile, get_profile
from moe_lab.training import seed_everything, train

TASKS = ("synthetic", "cifar10", "wikitext2")
#: Bump when a task's model definition or training changes in a way the profile does not show.
RECIPE_VERSION = 1
CACHE_ENV = "MOE_LAB_BASE_CACHE"


@dataclass
class Task:
    """Everything needed to train and score one task's model.

    Attributes:
        name: ``"synthetic"``, ``"cifar10"`` or ``"wikitext2"``.
        make_model: builds the untrained model (call after seeding).
        train_data, test_data: ``(inputs, targets)``; images ``(N, 3, 32, 32)``, token blocks
            ``(N, T)`` with next-token targets ``(N, T)``, synthetic features ``(N, 32)``.
        calibration: a few training inputs for calibration-aware stages.
        kind: ``"classification"`` or ``"language_model"`` (the loss and metric).
        train_options: keyword arguments of :func:`moe_lab.train`.
        profile: the profile the task was built from.
    """

    name: str
    make_model: object
    train_data: tuple
    test_data: tuple
    calibration: torch.Tensor
    kind: str
    train_options: dict = field(default_factory=dict)
    profile: Profile | None = None

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "classification" else "perplexity"


def build_task(name: str, profile: Profile | None = None, data_dir: str | None = None) -> Task:
    """Data, model factory and training settings for ``name`` under ``profile`` (default: the
    active profile, :func:`moe_lab.get_profile`)."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {name!r}")
    profile = get_profile() if profile is None else profile
    if not isinstance(profile, Profile):
        raise TypeError(f"profile must be a moe_lab.profiles.Profile, got {type(profile).__name__}")
    if name == "synthetic":
        task = make_clustered_task(profile.synthetic_train, profile.synthetic_test, input_size=32, seed=0)
        return Task(name, lambda: TopKMoE(8, 32, 128, task.num_classes, k=2, activation="relu",
                                          balance_loss_weight=0.01),
                    task.train, task.test, task.x_train[:512], "classification",
                    profile.train_options("synthetic"), profile)
    if name == "cifar10":
        data = load_cifar10(data_dir, train_per_class=profile.cifar_train_per_class,
                            test_per_class=profile.cifar_test_per_class)
        x_train, x_test = to_image_tensor(data.x_train), to_image_tensor(data.x_test)
        y_train, y_test = torch.as_tensor(data.y_train), torch.as_tensor(data.y_test)
        return Task(name, lambda: build_image_classifier(profile),
                    (x_train, y_train), (x_test, y_test), x_train[:256], "classification",
                    profile.train_options("cifar10"), profile)
    text = load_wikitext2(data_dir, **profile.wikitext_options())
    train_blocks = make_lm_blocks(text.train, profile.lm_context)
    test_blocks = make_lm_blocks(text.test, profile.lm_context)
    task = Task(name, lambda: build_language_model(profile, len(text.vocab)),
                train_blocks, test_blocks, train_blocks[0][:64], "language_model",
                profile.train_options("wikitext2"), profile)
    task.text = text  # the vocabulary, to decode tokens
    return task


@dataclass
class TrainedModel:
    """What :func:`trained_model` returns.

    Attributes:
        model: the trained model, in eval mode, on the CPU.
        source: ``"trained"`` (trained by this call) or ``"cache"`` (loaded).
        seconds: training time of this call, or of the run that filled the cache.
        path: the cache folder (``None`` without a cache).
        losses: the training loss of each epoch.
    """

    model: nn.Module
    source: str
    seconds: float
    path: Path | None
    losses: list = field(default_factory=list)


def cache_key(task: Task, seed: int = 0) -> str:
    """The hex digest naming ``task``'s trained model in the cache (see the module docstring)."""
    if task.profile is None:
        raise ValueError("task has no profile: build it with build_task(name, profile)")
    fields = dataclasses.asdict(task.profile)
    blob = json.dumps({"task": task.name, "profile": fields, "seed": seed, "recipe": RECIPE_VERSION,
                       "moe_lab": getattr(moe_lab, "__version__", "?"), "torch": torch.__version__,
                       "threads": torch.get_num_threads()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cache_enabled(cache: bool | None) -> bool:
    if cache is not None:
        return bool(cache)
    value = os.environ.get(CACHE_ENV, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "no", "yes", ""):
        raise ValueError(f"${CACHE_ENV} must be 0 or 1, got {value!r}")
    return value in ("1", "true", "yes", "")


def trained_model(task: Task, *, seed: int = 0, cache: bool | None = None, progress: bool = False,
                  folder: str | Path | None = None) -> TrainedModel:
    """``task``'s model trained with ``task.train_options`` from ``seed``, or loaded from the cache.

    ``cache=None`` follows ``$MOE_LAB_BASE_CACHE`` (default on); ``folder`` overrides the cache
    folder (default ``<cache_dir()>/base-models``). Training is exactly what a notebook would
    write: ``seed_everything(seed); model = task.make_model(); train(model, task.train_data,
    task=task.kind, seed=seed, **task.train_options)``.
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a moe_lab.tasks.Task (from build_task), got {type(task).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    use_cache = _cache_enabled(cache)
    path = None
    if use_cache:
        root = Path(folder) if folder is not None else cache_dir() / "base-models"
        path = root / f"{task.name}-{task.profile.name}-{cache_key(task, seed)[:16]}"
        if (path / "config.json").is_file():
            try:
                model = artifact.load(path)
                info = json.loads((path / "training.json").read_text(encoding="utf-8"))
                return TrainedModel(model, "cache", float(info["seconds"]), path, list(info["losses"]))
            except (OSError, ValueError, KeyError, TypeError) as error:
                warnings.warn(f"the cached base model in {path} does not load ({error}); training it again",
                              stacklevel=2)
                shutil.rmtree(path, ignore_errors=True)
    seed_everything(seed)
    model = task.make_model()
    start = time.perf_counter()
    losses = train(model, task.train_data, task=task.kind, progress=progress, seed=seed, **task.train_options)
    seconds = time.perf_counter() - start
    model.eval()
    if use_cache:
        try:
            staging = path.with_name(path.name + f".tmp{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            artifact.save(model, staging)
            (staging / "training.json").write_text(json.dumps({"seconds": seconds, "losses": losses}),
                                                   encoding="utf-8")
            shutil.rmtree(path, ignore_errors=True)
            os.replace(staging, path)
        except OSError as error:  # a read-only cache folder costs the next run its training, nothing else
            warnings.warn(f"could not cache the base model in {path}: {error}", stacklevel=2)
            path = None
    return TrainedModel(model, "trained", seconds, path, losses)
