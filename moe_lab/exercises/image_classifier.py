"""Checker for notebook 12 (an MoE image classifier on CIFAR-10): which classes each expert handles."""

from __future__ import annotations

import numpy as np
import torch

from moe_lab.exercises._feedback import NO_ANSWER, call, ready

HINT = ("Hint: for every class c, take the rows of probs whose label is c and average them over those rows "
        "(probs[labels == c].mean(dim=0)). Stack the C averages into a (C, E) tensor: row c is the share "
        "of class c's routing that goes to each expert, so every row sums to one.")


def class_expert_share(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean gate probability per (class, expert): a ``(num_classes, E)`` float tensor.

    ``probs`` is ``(N, E)`` (each row a distribution over experts, e.g. ``DenseMoE.gate_probs``),
    ``labels`` is ``(N,)`` integer classes in ``[0, num_classes)``; every class must occur.
    Row ``c`` is the average routing of the class-``c`` examples, so rows sum to one
    (the same numbers as :func:`moe_lab.viz.routing_matrix` for a dense layer).
    """
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        raise ValueError("probs must be a 2-D tensor (N, E)")
    labels = torch.as_tensor(labels).reshape(-1).long()
    if labels.numel() != probs.shape[0]:
        raise ValueError(f"labels must have one entry per row of probs ({probs.shape[0]}), "
                         f"got {labels.numel()}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    counts = torch.bincount(labels, minlength=num_classes)
    if len(counts) > num_classes or (counts == 0).any():
        raise ValueError("labels must lie in [0, num_classes) and every class must occur")
    sums = torch.zeros(num_classes, probs.shape[1], dtype=torch.float64).index_add_(0, labels, probs.double())
    return (sums / counts.unsqueeze(1)).float()


def _cases() -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Test inputs: shuffled labels, uneven class sizes, more experts than classes and fewer."""
    generator = torch.Generator().manual_seed(12)
    cases = []
    for n, experts, classes in [(200, 4, 10), (37, 3, 5), (64, 8, 2)]:
        probs = torch.softmax(3 * torch.randn(n, experts, generator=generator), dim=-1)
        extra = torch.randint(classes, (n - classes,), generator=generator)
        labels = torch.cat([torch.arange(classes), extra])
        labels = labels[torch.randperm(n, generator=generator)]
        cases.append((probs, labels, classes))
    return cases


def check_class_expert_share(fn) -> bool:
    """Check ``fn(probs, labels, num_classes) -> (num_classes, E)``: the mean gate probability of
    each class's examples for each expert, on a few cases (shuffled labels, uneven classes).

    Prints a hint for ``None`` (or a function returning ``None``) and feedback for a wrong answer;
    returns ``True`` only if every case matches (to 1e-4). Never raises on a wrong answer.
    """
    if not ready(fn, HINT, "fn(probs, labels, num_classes)"):
        return False
    for probs, labels, classes in _cases():
        want = class_expert_share(probs, labels, classes)
        got = call(fn, probs.clone(), labels.clone(), classes, hint=HINT)
        if got is NO_ANSWER:
            return False
        try:
            got = torch.as_tensor(np.asarray(got.detach() if isinstance(got, torch.Tensor) else got),
                                  dtype=torch.float32)
        except (TypeError, ValueError):
            print(f"Return a (num_classes, E) tensor or array, got {type(got).__name__}.")
            return False
        if tuple(got.shape) != tuple(want.shape):
            print(f"Expected shape {tuple(want.shape)} (classes, experts) for {len(probs)} examples, "
                  f"{probs.shape[1]} experts and {classes} classes, got {tuple(got.shape)}.")
            return False
        if torch.allclose(got, want, atol=1e-4):
            continue
        if torch.allclose(got.sum(1), torch.ones(classes), atol=1e-3):
            print("Your rows sum to one but the values differ: average the gate probabilities of each class "
                  "(a soft share), do not count top-1 choices, and check which rows belong to which class.")
        elif torch.allclose(got.sum(0), torch.ones(probs.shape[1]), atol=1e-3):
            print("Your columns sum to one: you split each expert's load over the classes. The question is "
                  "the other way round: how does each class split over the experts (rows sum to one)?")
        else:
            print("Your rows do not sum to one: divide each class's summed probabilities by the number of "
                  "examples of that class (a mean, not a sum; class sizes differ).")
        return False
    print("Correct: every row is the mean routing of one class's examples.")
    return True
