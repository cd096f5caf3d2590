"""Checker for notebook 05 (knowledge distillation): the distillation loss."""

from __future__ import annotations

import torch

from moe_lab.compress.distill import distillation_loss
from moe_lab.exercises._feedback import ready

HINT = ("Hint: soft = KL(softmax(teacher / T) || softmax(student / T)), averaged over examples "
        "(F.kl_div(log_p_student, log_p_teacher, reduction='batchmean', log_target=True)), "
        "times T**2; hard = F.cross_entropy(student, targets) at temperature 1; "
        "return alpha * soft + (1 - alpha) * hard.")


def _cases() -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, float, float]]:
    """``(name, student_logits (n, C), teacher_logits (n, C), targets (n,), T, alpha)`` cases."""
    generator = torch.Generator().manual_seed(5)

    def logits(n: int, c: int, scale: float) -> torch.Tensor:
        return torch.randn(n, c, generator=generator) * scale

    cases = []
    for name, n, c, scale, temperature, alpha in [("T=1, alpha=0.5", 8, 4, 1.0, 1.0, 0.5),
                                                   ("T=2, alpha=0.5", 16, 4, 2.0, 2.0, 0.5),
                                                   ("T=4, alpha=0.9, 10 classes", 12, 10, 3.0, 4.0, 0.9),
                                                   ("T=3, alpha=0.2", 5, 3, 1.5, 3.0, 0.2),
                                                   ("T=2, alpha=0 (labels only)", 7, 5, 1.0, 2.0, 0.0)]:
        targets = torch.randint(c, (n,), generator=generator)
        cases.append((name, logits(n, c, scale), logits(n, c, scale), targets, temperature, alpha))
    return cases


def check_distillation_loss(fn) -> bool:
    """Check ``fn(student_logits, teacher_logits, targets, temperature, alpha) -> scalar tensor``
    against :func:`moe_lab.compress.distill.distillation_loss` on several cases.

    Logits are ``(n, classes)``, ``targets`` ``(n,)`` class ids. Prints the first case that
    differs (to 1e-4 relative); returns ``True`` only if every case matches.
    """
    if not ready(fn, HINT, "fn(student_logits, teacher_logits, targets, temperature, alpha)"):
        return False
    for name, student, teacher, targets, temperature, alpha in _cases():
        expected = float(distillation_loss(student, teacher, targets, temperature, alpha))
        try:
            got = fn(student.clone(), teacher.clone(), targets.clone(), temperature, alpha)
            if got is None:
                return check_distillation_loss(None)
            got = float(torch.as_tensor(got))
        except Exception as error:  # a learner's bug should print, not stop the notebook
            print(f"{name}: your function raised {type(error).__name__}: {error}")
            return False
        if not abs(got - expected) <= 1e-4 * max(1.0, abs(expected)):
            print(f"{name}: got {got:.5f}, expected {expected:.5f}. Check: both softmaxes at temperature T, "
                  "KL(teacher || student) averaged over examples (not over classes), the T**2 factor, "
                  "and alpha weighting the soft term.")
            return False
    print("Correct: your loss matches moe_lab.compress.distill.distillation_loss on every case.")
    return True
