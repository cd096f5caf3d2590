"""Minimal training and evaluation loops for classification and language modelling.

``data`` is either a ``DataLoader`` yielding ``(inputs, targets)`` or a pair of tensors
``(inputs, targets)`` that is batched here. For a language model the inputs and targets
are ``(batch, time)`` token ids, the targets shifted by one. Auxiliary router losses of
:class:`moe_lab.TopKMoE` layers are added to the training loss automatically.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from moe_lab._checks import finite_float, positive_int
from moe_lab.layers.topk import collect_aux_loss

TASKS = ("classification", "language_model")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch; return a ``torch.Generator`` seeded the same way."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def as_loader(data, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A ``DataLoader`` for ``data`` (returned unchanged if it already is one); ``ValueError``
    if it holds no examples."""
    if isinstance(data, DataLoader):
        try:
            empty = len(data) == 0
        except TypeError:  # an iterable dataset without a length: checked while iterating
            empty = False
        if empty:
            raise ValueError("data is empty: the DataLoader yields no batches")
        return data
    if not (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data)):
        raise TypeError("data must be a DataLoader or a pair of tensors (inputs, targets)")
    inputs, targets = data
    if len(inputs) != len(targets):
        raise ValueError(f"data: {len(inputs)} inputs but {len(targets)} targets")
    if len(inputs) == 0:
        raise ValueError("data is empty: no (input, target) examples")
    positive_int("batch_size", batch_size)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(inputs, targets), batch_size=batch_size, shuffle=shuffle,
                      generator=generator)


def upcast_logits(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` in at least float32: a loss over many tokens or classes is summed in it
    (bfloat16 keeps 3 significant digits), as Hugging Face's losses do. Differentiable."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def task_loss(logits: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    """Mean cross-entropy, in at least float32 (:func:`upcast_logits`); for a language model
    ``(B, T, V)`` logits are flattened first."""
    logits = upcast_logits(logits)
    if task == "language_model":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    if task == "classification":
        return F.cross_entropy(logits, targets)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def train(model: nn.Module, data, *, epochs: int = 1, lr: float = 1e-3, batch_size: int = 128,
          task: str = "classification", weight_decay: float = 0.0, max_steps: int | None = None,
          seed: int = 0, progress: bool = True, optimizer: torch.optim.Optimizer | None = None,
          transform=None, schedule: bool = False) -> list[float]:
    """Train ``model`` with AdamW; return the mean training loss of each epoch.

    Stops early after ``max_steps`` optimiser steps if given (``max_steps=0`` trains nothing
    and returns ``[]``). The loss includes every
    ``TopKMoE`` layer's ``aux_loss`` (load balancing, z-loss) for that batch.
    ``transform(inputs)`` (e.g. :func:`moe_lab.data.augment_images`) is applied to each
    training batch; ``schedule=True`` decays the learning rate to zero with a cosine over
    the run (one-cycle style runs converge faster in few epochs).
    """
    positive_int("epochs", epochs)
    finite_float("lr", lr, minimum=0.0, strict=True)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if max_steps is not None and (type(max_steps) is not int or max_steps < 0):
        raise ValueError(f"max_steps must be None or an int >= 0, got {max_steps!r}")
    loader = as_loader(data, batch_size, shuffle=True, seed=seed)
    if max_steps == 0:
        return []
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total_steps = min(epochs * len(loader), max_steps or epochs * len(loader))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps) if schedule else None
    history, steps = [], 0
    model.train()
    for epoch in range(epochs):
        total, count = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for inputs, targets in bar:
            if transform is not None:
                inputs = transform(inputs)
            loss = task_loss(model(inputs), targets, task)
            aux = collect_aux_loss(model)
            optimizer.zero_grad(set_to_none=True)
            (loss if aux is None else loss + aux).backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += loss.item() * len(inputs)
            count += len(inputs)
            steps += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if max_steps is not None and steps >= max_steps:
                break
        if count == 0:
            raise ValueError("data is empty: no batch to train on")
        history.append(total / count)
        if max_steps is not None and steps >= max_steps:
            break
    model.eval()
    return history


@torch.no_grad()
def evaluate(model: nn.Module, data, *, task: str = "classification", batch_size: int = 256
             ) -> dict[str, float]:
    """Evaluate ``model`` in eval mode.

    Returns ``{"loss", "accuracy", "n"}`` for classification (accuracy in [0, 1], ``n``
    examples) or ``{"loss", "perplexity", "n"}`` for a language model (``n`` tokens;
    perplexity is ``exp`` of the mean per-token cross-entropy).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    loader = as_loader(data, batch_size, shuffle=False)
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for inputs, targets in loader:
        logits = model(inputs)
        n = targets.numel()
        loss_sum += task_loss(logits, targets, task).item() * n
        if task == "classification":
            correct += int((logits.argmax(-1) == targets).sum())
        count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("data is empty: nothing to evaluate")
    mean_loss = loss_sum / count
    if task == "classification":
        return {"loss": mean_loss, "accuracy": correct / count, "n": count}
    return {"loss": mean_loss, "perplexity": math.exp(mean_loss), "n": count}
