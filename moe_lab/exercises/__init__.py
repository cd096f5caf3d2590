"""Checkers for the notebooks' exercises.

Each checker takes the learner's answer, prints what is right or wrong, and returns ``True``
only for a correct answer. An unanswered exercise (``None``) gets a hint, not an error, so
"Restart and run all" keeps working before the exercise is done.
"""
