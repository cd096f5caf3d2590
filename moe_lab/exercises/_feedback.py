"""What every checker does with a learner's answer before comparing it with the reference."""

from __future__ import annotations

NO_ANSWER = object()


def ready(fn, hint: str, signature: str) -> bool:
    """``True`` if ``fn`` is a function to check; else prints the hint (for ``None``, the
    unanswered exercise) or what was expected, and returns ``False``."""
    if fn is None:
        print(hint)
        return False
    if not callable(fn):
        print(f"Expected a function {signature}, got {type(fn).__name__}.")
        return False
    return True


def call(fn, *args, hint: str):
    """``fn(*args)``; or, after printing feedback, :data:`NO_ANSWER` if it raised or returned
    ``None``. A learner's bug is feedback, never a crash of the notebook."""
    try:
        got = fn(*args)
    except Exception as error:
        print(f"Your function raised {type(error).__name__}: {error}")
        return NO_ANSWER
    if got is None:
        print("Your function returned None. " + hint)
        return NO_ANSWER
    return got
