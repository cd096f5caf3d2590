"""Is a difference real? Confidence intervals and significance tests for measured scores.

* :func:`wilson_interval` / :func:`mean_interval`: the uncertainty of one accuracy or mean;
* :func:`mcnemar_p` (same test items) and :func:`two_proportion_p` (independent test sets):
  do two models differ, or is the gap noise of a finite test set?
* :func:`n_for_difference`: how many test items a difference needs to become significant;
* :func:`compare`: paired scores of two models -> "better" / "worse" / "no clear difference",
  with the interval of the difference (:class:`Comparison`);
* :func:`per_class_accuracy`, and :func:`verdict`, which turns a computed ``True`` / ``False`` /
  ``None`` into the words a notebook prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (accuracy) from ``successes`` out of ``n``."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    z = _z(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: torch.Tensor, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` and a normal-approximation interval for it: ``(mean, low, high)``."""
    values = values.double().reshape(-1)
    mean = float(values.mean())
    if values.numel() < 2:
        return mean, mean, mean
    half = _z(confidence) * float(values.std()) / math.sqrt(values.numel())
    return mean, mean - half, mean + half


@torch.no_grad()
def per_class_accuracy(correct: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Accuracy per class ``(num_classes,)`` from ``(N,)`` correctness flags and labels."""
    hits = torch.bincount(targets[correct.bool()], minlength=num_classes).double()
    totals = torch.bincount(targets, minlength=num_classes).double()
    return hits / totals.clamp(min=1)


def mcnemar_p(correct_a: torch.Tensor, correct_b: torch.Tensor) -> float:
    """Two-sided exact McNemar p-value: do two models, scored on the *same* test images, differ?

    Only the discordant images count (``a`` right and ``b`` wrong, or the reverse); under
    "no difference" each is a fair coin flip, so the p-value is a binomial tail.
    """
    correct_a, correct_b = correct_a.bool().reshape(-1), correct_b.bool().reshape(-1)
    if correct_a.shape != correct_b.shape:
        raise ValueError(f"correct_a and correct_b differ in length "
                         f"({correct_a.numel()} vs {correct_b.numel()})")
    only_a = int((correct_a & ~correct_b).sum())
    only_b = int((~correct_a & correct_b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + confidence / 2)))


def two_proportion_p(acc_a: float, acc_b: float, n: int) -> float:
    """Two-sided p-value of a two-proportion z-test for accuracies measured on ``n`` images each
    (independent test sets; on the same images use :func:`mcnemar_p`, which is sharper)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    pooled = (acc_a + acc_b) / 2
    se = math.sqrt(2 * pooled * (1 - pooled) / n)
    if se == 0:
        return 1.0 if acc_a == acc_b else 0.0
    return math.erfc(abs(acc_a - acc_b) / se / math.sqrt(2))


def n_for_difference(accuracy: float, difference: float, confidence: float = 0.95) -> int:
    """Test-set size at which an accuracy ``difference`` (e.g. 0.005) around ``accuracy`` becomes
    significant in a two-proportion test at ``confidence`` (no power margin)."""
    if not 0 < accuracy < 1 or difference <= 0:
        raise ValueError(f"need 0 < accuracy < 1 and difference > 0, got {accuracy}, {difference}")
    return math.ceil(2 * _z(confidence) ** 2 * accuracy * (1 - accuracy) / difference ** 2)


def verdict(held: bool | None) -> str:
    """``"held"``, ``"did not hold"`` or ``"n/a here"`` (for ``None``)."""
    if held is None:
        return "n/a here"
    return "held" if bool(held) else "did not hold"


@dataclass(frozen=True)
class Comparison:
    """The outcome of :func:`compare`: ``b`` against ``a`` on the same test items.

    Attributes:
        difference: mean of ``b - a`` per item (in the score's units; for accuracy, points / 100).
        low, high: confidence interval of that mean difference.
        p: two-sided p-value of "no difference" (exact McNemar for 0/1 scores, else a paired
            normal test).
        outcome: ``"better"``, ``"worse"`` (``b`` than ``a``, by the score's direction) or
            ``"no clear difference"`` (``p`` above ``1 - confidence``).
    """

    difference: float
    low: float
    high: float
    p: float
    outcome: str

    def __str__(self) -> str:
        return (f"{self.outcome} (difference {self.difference:+.4g}, {self.low:+.4g} to {self.high:+.4g}, "
                f"p = {self.p:.2g})")

    def within(self, margin: float) -> bool:
        """Whether the whole interval lies within ``+-margin``: "close", not just "not shown apart"."""
        return -margin <= self.low and self.high <= margin


def compare(scores_a: torch.Tensor, scores_b: torch.Tensor, *, higher_is_better: bool = True,
            confidence: float = 0.95) -> Comparison:
    """Is ``b`` better than ``a``? Paired per-item scores ``(N,)`` of two models on the same items:
    0/1 correctness (accuracy) or per-item losses (``higher_is_better=False``).

    The words a notebook prints ("better", "worse", "no clear difference") come from here, so that
    a sentence can never claim more than the test set shows.
    """
    a = torch.as_tensor(scores_a).double().reshape(-1)
    b = torch.as_tensor(scores_b).double().reshape(-1)
    if a.shape != b.shape or a.numel() < 2:
        raise ValueError(f"scores_a and scores_b must hold the same number (>= 2) of paired scores, "
                         f"got {a.numel()} and {b.numel()}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("scores must be finite")
    diff = b - a
    mean, low, high = mean_interval(diff, confidence)
    binary = bool(((a == 0) | (a == 1)).all() and ((b == 0) | (b == 1)).all())
    if binary:
        p = mcnemar_p(a.bool(), b.bool())
    else:
        se = float(diff.std()) / math.sqrt(diff.numel())
        p = 1.0 if se == 0 and mean == 0 else (0.0 if se == 0 else math.erfc(abs(mean) / se / math.sqrt(2)))
    sign = 1 if higher_is_better else -1
    if p >= 1 - confidence or mean == 0:
        outcome = "no clear difference"
    else:
        outcome = "better" if sign * mean > 0 else "worse"
    return Comparison(difference=mean, low=low, high=high, p=p, outcome=outcome)
