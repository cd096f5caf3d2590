"""Checker for notebook 13 (evaluation): a Wilson score interval for an accuracy."""

from __future__ import annotations

import math

from moe_lab.exercises._feedback import NO_ANSWER, call, ready
from moe_lab.stats import wilson_interval

HINT = ("Hint: with p = successes / n and z = 1.96 (95%), the Wilson interval is centre +- half where "
        "centre = (p + z**2 / (2n)) / (1 + z**2 / n) and "
        "half = z * sqrt(p (1 - p) / n + z**2 / (4 n**2)) / (1 + z**2 / n). Return (low, high).")

# (successes, n): ordinary, tiny, all wrong, all right, and a test-set-sized case
CASES = [(384, 500), (7, 10), (0, 20), (50, 50), (2712, 5000), (1, 3)]
TOLERANCE = 1e-3  # z = 1.96 instead of 1.959964... moves the bounds by far less than this


def check_wilson(fn) -> bool:
    """Check ``fn(successes, n) -> (low, high)``: the 95% Wilson score interval of an accuracy.

    Compared with :func:`moe_lab.evaluate.wilson_interval` on several cases (including 0 and
    ``n`` successes, where the naive ``p +- z * sqrt(p (1 - p) / n)`` interval collapses to a
    point). Prints a hint for ``None`` and feedback for a wrong answer; returns ``True`` only
    if every bound is within 0.001. Never raises on a wrong answer.
    """
    if not ready(fn, HINT, "fn(successes, n) -> (low, high)"):
        return False
    for successes, n in CASES:
        got = call(fn, successes, n, hint=HINT)
        if got is NO_ANSWER:
            return False
        try:
            low, high = (float(v) for v in got)
        except (TypeError, ValueError):
            print(f"Return two numbers (low, high), got {got!r}.")
            return False
        want_low, want_high = wilson_interval(successes, n)
        if not (math.isfinite(low) and math.isfinite(high)):
            print(f"For {successes}/{n} your bounds are not finite: ({low}, {high}).")
            return False
        if abs(low - want_low) > TOLERANCE or abs(high - want_high) > TOLERANCE:
            p = successes / n
            note = (" The naive (Wald) interval gives a zero-width interval here; Wilson does not."
                    if p in (0.0, 1.0) else "")
            print(f"For {successes} correct out of {n} (accuracy {p:.3f}) expected "
                  f"({want_low:.4f}, {want_high:.4f}), got ({low:.4f}, {high:.4f}).{note} "
                  "Check the centre shift z**2 / (2n) and the z**2 / (4 n**2) term.")
            return False
    print("Correct: your Wilson interval matches moe_lab.evaluate.wilson_interval in every case.")
    return True
