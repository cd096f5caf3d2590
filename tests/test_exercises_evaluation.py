import math

from moe_lab.exercises.evaluation import check_wilson
from moe_lab.stats import wilson_interval


def right(successes, n, z=1.96):
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_accepts_right_answers(capsys):
    assert check_wilson(right)
    assert check_wilson(lambda s, n: list(wilson_interval(s, n)))
    assert "Correct" in capsys.readouterr().out


def test_hint_on_none(capsys):
    assert check_wilson(None) is False
    assert "Hint" in capsys.readouterr().out
    assert check_wilson(lambda s, n: None) is False
    assert "returned None" in capsys.readouterr().out


def test_rejects_wrong_answers(capsys):
    def wald(s, n):
        p = s / n
        half = 1.96 * math.sqrt(p * (1 - p) / n)
        return p - half, p + half

    def no_centre_shift(s, n, z=1.96):
        low, high = right(s, n)
        return s / n - (high - low) / 2, s / n + (high - low) / 2

    def percent(s, n):
        low, high = right(s, n)
        return 100 * low, 100 * high

    def raises(s, n):
        raise ZeroDivisionError("boom")

    for wrong in (wald, no_centre_shift, percent, raises, lambda s, n: (0.5,), lambda s, n: "ab",
                  lambda s, n: (float("nan"), 1.0), lambda s, n: right(s, n)[::-1]):
        assert check_wilson(wrong) is False
    assert check_wilson(0.5) is False
    out = capsys.readouterr().out
    assert "expected" in out and "raised" in out
    assert check_wilson(lambda s, n: wald(s, n) if s in (0, n) else right(s, n)) is False
    assert "zero-width" in capsys.readouterr().out
