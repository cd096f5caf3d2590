"""Checker for notebook 11 (an MoE language model): the next-token loss from ``(B, T, V)`` logits."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moe_lab.exercises._feedback import ready

HINT = ("Hint: a language model returns logits of shape (batch, time, vocab) and the targets are "
        "token ids of shape (batch, time), already shifted by one (make_lm_blocks did that). "
        "Cross-entropy wants classes on one axis: flatten to (batch * time, vocab) logits and "
        "(batch * time,) targets, e.g. "
        "F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)), and return the mean.")

# (batch, time, vocab): the last case has time == vocab, where the unreshaped call does not even raise.
CASES = [(2, 5, 7), (3, 4, 11), (1, 9, 3), (4, 6, 6)]


def reference_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits (B, T, V)`` against ``targets (B, T)``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def check_next_token_loss(fn) -> bool:
    """Check ``fn(logits, targets) -> loss``: the mean cross-entropy over every position of
    ``logits`` ``(batch, time, vocab)`` against ``targets`` ``(batch, time)``, on random cases
    (one with ``time == vocab``, where forgetting to reshape silently computes something else).

    Prints a hint for ``None`` (or a function returning ``None``) and feedback for a wrong
    answer; returns ``True`` only if every case matches. Never raises on a wrong answer.
    """
    if not ready(fn, HINT, "fn(logits, targets)"):
        return False
    generator = torch.Generator().manual_seed(0)
    for batch, time, vocab in CASES:
        logits = torch.randn(batch, time, vocab, generator=generator) * 2
        targets = torch.randint(vocab, (batch, time), generator=generator)
        try:
            got = fn(logits.clone(), targets.clone())
        except Exception as error:  # a learner's bug is feedback, not a crash
            print(f"For logits {tuple(logits.shape)} and targets {tuple(targets.shape)} your function raised "
                  f"{type(error).__name__}: {error}\nCross-entropy expects classes on dimension 1 of its "
                  "input: reshape the logits to (batch * time, vocab) and the targets to (batch * time,).")
            return False
        if got is None:
            print("Your function returned None. " + HINT)
            return False
        if isinstance(got, torch.Tensor):
            if got.numel() != 1:
                print(f"Return one number (the mean loss), got a tensor of shape {tuple(got.shape)}.")
                return False
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, (int, float)) or not math.isfinite(got):
            print(f"Return the mean loss as a number or a one-element tensor, got {got!r}.")
            return False
        want = reference_loss(logits, targets).item()
        if abs(got - want) > 1e-4 * max(1.0, abs(want)):
            note = ""
            if abs(got - want * batch * time) < 1e-3 * abs(want * batch * time):
                note = " That is the sum over tokens: take the mean."
            print(f"For logits {tuple(logits.shape)}: expected a loss of {want:.4f}, got {got:.4f}.{note} "
                  "Average the cross-entropy over every (batch, time) position, comparing position t's "
                  "logits with target t (the targets are already shifted).")
            return False
    print("Correct: your loss matches the flattened cross-entropy in every case, including time == vocab.")
    return True
