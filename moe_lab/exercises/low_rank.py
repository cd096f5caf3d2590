"""Checker for notebook 09 (low-rank experts): the two factors of a truncated SVD."""

from __future__ import annotations

import torch

from moe_lab.exercises._feedback import ready

HINT = ("Hint: u, s, vh = torch.linalg.svd(weight, full_matrices=False) gives weight = u @ diag(s) @ vh "
        "with s sorted from largest to smallest. Keep the first `rank` of each: "
        "down = sqrt(s[:rank])[:, None] * vh[:rank] has shape (rank, in) and "
        "up = u[:, :rank] * sqrt(s[:rank]) has shape (out, rank), so up @ down is the best rank-r matrix.")


def _cases():
    """Seeded (weight, rank) pairs: tall, wide and a trained-looking 'spike + noise' matrix."""
    generator = torch.Generator().manual_seed(909)
    spikes = torch.randn(48, 3, generator=generator) @ torch.randn(3, 24, generator=generator)
    return [(torch.randn(12, 7, generator=generator), 3),
            (torch.randn(6, 10, generator=generator), 2),
            (spikes + 0.1 * torch.randn(48, 24, generator=generator), 3),
            (torch.randn(16, 16, generator=generator), 1)]


def optimal_error(weight: torch.Tensor, rank: int) -> float:
    """Eckart-Young: the smallest ``||W - A||_F`` over rank-``rank`` matrices ``A`` is
    ``sqrt(sum_{i >= rank} s_i**2)``, for ``weight`` ``(out, in)``."""
    s = torch.linalg.svdvals(weight.double())
    return float(s[rank:].square().sum().sqrt())


def check_low_rank_factors(fn) -> bool:
    """Check ``fn(weight, rank) -> (down, up)`` for ``weight`` ``(out, in)``: ``down`` is
    ``(rank, in)`` (a :class:`moe_lab.LowRankLinear`'s ``U.weight``), ``up`` is ``(out, rank)``
    (its ``V.weight``), and ``up @ down`` must reach the Eckart-Young optimum
    ``||W - up @ down||_F = sqrt(sum_{i >= rank} s_i**2)`` (to 1e-4 relative).

    Prints a hint for ``None`` (or a function returning ``None``) and feedback for a wrong
    answer; returns ``True`` only if every seeded case is optimal. Never raises on a wrong answer.
    """
    if not ready(fn, HINT, "fn(weight, rank) returning (down, up)"):
        return False
    for weight, rank in _cases():
        out_features, in_features = weight.shape
        try:
            answer = fn(weight.clone(), rank)
        except Exception as error:  # a learner's bug is feedback, not a crash
            print(f"Your function raised {type(error).__name__}: {error}")
            return False
        if answer is None:
            print("Your function returned None. " + HINT)
            return False
        if not (isinstance(answer, (tuple, list)) and len(answer) == 2
                and all(isinstance(t, torch.Tensor) for t in answer)):
            print("Return a pair of tensors (down, up).")
            return False
        down, up = answer
        if tuple(down.shape) != (rank, in_features) or tuple(up.shape) != (out_features, rank):
            print(f"Wrong shapes for a ({out_features}, {in_features}) weight at rank {rank}: expected down "
                  f"{(rank, in_features)} and up {(out_features, rank)}, got {tuple(down.shape)} and "
                  f"{tuple(up.shape)}. down maps in -> rank (rows of vh), "
                  "up maps rank -> out (columns of u).")
            return False
        error = float((weight.double() - up.double() @ down.double()).norm())
        best = optimal_error(weight, rank)
        if error > best * (1 + 1e-4) + 1e-5:
            print(f"Your rank-{rank} product misses the ({out_features}, {in_features}) weight by "
                  f"{error:.4f} (Frobenius), but the best rank-{rank} matrix misses it by only {best:.4f} "
                  "(Eckart-Young). Keep the LARGEST singular values (the first ones), and multiply "
                  "the singular values in exactly once (e.g. sqrt(s) into each factor).")
            return False
    print("Correct: up @ down is the best rank-r approximation (Eckart-Young) in every case.")
    return True
