"""Checker for notebook 14 (trade-offs): the Pareto frontier of (size, accuracy) points."""

from __future__ import annotations

from moe_lab.evaluation import pareto_front
from moe_lab.exercises._feedback import NO_ANSWER, call, ready

HINT = ("Hint: point i is on the frontier unless some other point j is at least as small "
        "(sizes[j] <= sizes[i]) and at least as accurate (scores[j] >= scores[i]), and strictly better "
        "in one of the two. Return the indices of the points that no other point dominates.")

# (sizes, scores): a chain, a dominated point, ties in size, ties in score, duplicates, one point
CASES = [
    ([100, 50, 25, 10], [0.80, 0.78, 0.70, 0.40]),
    ([100, 60, 50, 30], [0.80, 0.70, 0.75, 0.60]),
    ([100, 50, 50, 20], [0.80, 0.70, 0.72, 0.50]),
    ([100, 80, 40, 30], [0.80, 0.80, 0.60, 0.60]),
    ([50, 50, 100], [0.70, 0.70, 0.60]),
    ([42], [0.5]),
]


def check_pareto(fn) -> bool:
    """Check ``fn(sizes, scores) -> indices`` of the Pareto-optimal points (smaller size and
    higher score are better), in any order, against :func:`moe_lab.evaluate.pareto_front` on
    cases with dominated points, ties and duplicates. Prints a hint for ``None`` and feedback
    for a wrong answer; returns ``True`` only if every case matches. Never raises on a wrong answer.
    """
    if not ready(fn, HINT, "fn(sizes, scores) -> list of indices"):
        return False
    for sizes, scores in CASES:
        got = call(fn, list(sizes), list(scores), hint=HINT)
        if got is NO_ANSWER:
            return False
        try:
            got_set = {int(i) for i in got}
        except (TypeError, ValueError):
            print(f"Return a list of integer indices, got {got!r}.")
            return False
        want = set(pareto_front(sizes, scores, higher_is_better=True))
        if got_set != want:
            missing, extra = sorted(want - got_set), sorted(got_set - want)
            print(f"For sizes {sizes} and scores {scores} expected indices {sorted(want)}, "
                  f"got {sorted(got_set)}"
                  + (f"; missing {missing} (no other point beats them on both)" if missing else "")
                  + (f"; {extra} are dominated" if extra else "")
                  + ". Equal points do not dominate each other; 'dominates' needs strictly better in one.")
            return False
    print("Correct: your frontier matches moe_lab.evaluate.pareto_front in every case.")
    return True
