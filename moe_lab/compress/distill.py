"""Knowledge distillation (Hinton et al. 2015): a student learns from a teacher's soft labels.

The deck's ``distill_moe`` forgets ``import torch.nn.functional as F`` (a ``NameError``),
ignores the labels entirely and never puts the teacher in eval mode. Here the loss is
``alpha * T**2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)``, where
``_T`` means softmax at temperature ``T``; the ``T**2`` keeps gradient sizes comparable
across temperatures.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from moe_lab._checks import finite_float, positive_int
from moe_lab.layers.topk import collect_aux_loss
from moe_lab.training import as_loader, upcast_logits


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      targets: torch.Tensor | None, temperature: float = 2.0, alpha: float = 0.5
                      ) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, targets)``.

    Logits are ``(batch, classes)`` (or ``(..., classes)``, flattened); ``targets`` may be
    ``None`` only when ``alpha == 1``. KL is averaged over examples (``batchmean``). The loss is
    computed in at least float32 (bfloat16 / float16 logits are cast up).
    """
    finite_float("temperature", temperature, minimum=0.0, strict=True)
    finite_float("alpha", alpha, minimum=0.0)
    if alpha > 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    classes = student_logits.shape[-1]
    s = upcast_logits(student_logits).reshape(-1, classes)
    t = upcast_logits(teacher_logits).reshape(-1, classes)
    soft = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1),
                    reduction="batchmean", log_target=True) * temperature ** 2
    if alpha == 1:
        return soft
    if targets is None:
        raise ValueError("targets are needed when alpha < 1")
    return alpha * soft + (1 - alpha) * F.cross_entropy(s, targets.reshape(-1))


def distill(teacher: nn.Module, student: nn.Module, data, *, temperature: float = 2.0, alpha: float = 0.5,
            epochs: int = 1, lr: float = 1e-3, batch_size: int = 128, weight_decay: float = 0.0,
            seed: int = 0, progress: bool = True) -> list[float]:
    """Train ``student`` to match ``teacher`` on ``data`` (a DataLoader or ``(inputs, targets)``);
    return the mean distillation loss per epoch. The teacher is frozen in eval mode; the
    student's MoE auxiliary losses are added. Same loop and defaults as :func:`moe_lab.train`
    otherwise (AdamW, ``weight_decay=0`` unless given), so a labels-only baseline trained with
    ``train`` differs only in the loss."""
    positive_int("epochs", epochs)
    finite_float("lr", lr, minimum=0.0, strict=True)
    loader = as_loader(data, batch_size, shuffle=True, seed=seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    teacher.eval()
    student.train()
    history = []
    for epoch in range(epochs):
        total, count = 0.0, 0
        for inputs, targets in tqdm(loader, desc=f"distill {epoch + 1}/{epochs}", disable=not progress,
                                    leave=False):
            with torch.no_grad():
                teacher_logits = teacher(inputs)
            loss = distillation_loss(student(inputs), teacher_logits, targets, temperature, alpha)
            aux = collect_aux_loss(student)
            optimizer.zero_grad(set_to_none=True)
            (loss if aux is None else loss + aux).backward()
            optimizer.step()
            total += loss.item() * len(inputs)
            count += len(inputs)
        history.append(total / max(count, 1))
    student.eval()
    return history
