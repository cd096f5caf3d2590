"""Checker for notebook 02 (architecture): predict the share of parameters held by the experts."""

from __future__ import annotations

import math

import torch

from moe_lab.exercises._feedback import NO_ANSWER, call
from moe_lab.layers.dense import DenseMoE
from moe_lab.measure import param_count

HINT = ("Hint: count weights and biases. Each expert is Linear(input_size -> expert_size): "
        "input_size * expert_size + expert_size numbers. The router is Linear(input_size -> num_experts) "
        "and the output projection Linear(expert_size -> output_size). "
        "Return experts / (experts + router + output projection), a fraction between 0 and 1.")

CASES = [(4, 16, 32, 4), (8, 64, 256, 64), (1, 3, 2, 5), (16, 128, 512, 128)]


def true_expert_share(num_experts: int, input_size: int, expert_size: int, output_size: int) -> float:
    """Fraction of a :class:`moe_lab.DenseMoE`'s parameters that sit in its experts (built and counted)."""
    with torch.random.fork_rng(devices=[]):  # building a layer must not move the learner's seed
        layer = DenseMoE(num_experts, input_size, expert_size, output_size)
    experts = sum(p.numel() for p in layer.experts.parameters())
    return experts / param_count(layer)


def check_expert_share(fn) -> bool:
    """Check ``fn(num_experts, input_size, expert_size, output_size) -> float`` against real layers.

    The answer must be the fraction (0..1) of a :class:`moe_lab.DenseMoE`'s parameters in its
    experts, within 1e-6, for several sizes. Prints a hint for ``None`` (or a function that
    returns ``None``); returns ``True`` only if every case matches. Never raises on a wrong answer.
    """
    if fn is None:
        print(HINT)
        return False
    if not callable(fn):
        print(f"Expected a function fn(num_experts, input_size, expert_size, output_size), "
              f"got {type(fn).__name__}.")
        return False
    for case in CASES:
        got = call(fn, *case, hint=HINT)
        if got is NO_ANSWER:
            return False
        try:
            got = float(got)
        except (TypeError, ValueError):
            print(f"Return a number, got {type(got).__name__}.")
            return False
        want = true_expert_share(*case)
        if not math.isfinite(got):
            print(f"Return a finite number, got {got}.")
            return False
        if 1.0 < got <= 100.0 and math.isclose(got / 100.0, want, abs_tol=1e-6):
            print("That looks like a percentage: return a fraction between 0 and 1.")
            return False
        if not math.isclose(got, want, abs_tol=1e-6):
            E, d, h, o = case
            print(f"For num_experts={E}, input_size={d}, expert_size={h}, output_size={o} you returned "
                  f"{got:.6f} but the experts hold {want:.6f} of the parameters. "
                  "Did you count the biases, the router and the output projection?")
            return False
    print("Correct: your formula matches the parameter counts of real DenseMoE layers.")
    return True
