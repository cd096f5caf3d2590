from moe_lab.evaluation import pareto_front
from moe_lab.exercises.tradeoffs import check_pareto


def right(sizes, scores):
    def dominates(j, i):
        return (sizes[j] <= sizes[i] and scores[j] >= scores[i]
                and (sizes[j] < sizes[i] or scores[j] > scores[i]))
    return [i for i in range(len(sizes)) if not any(dominates(j, i) for j in range(len(sizes)))]


def test_accepts_right_answers(capsys):
    assert check_pareto(right)
    assert check_pareto(lambda sizes, scores: reversed(pareto_front(sizes, scores)))  # any order
    assert "Correct" in capsys.readouterr().out


def test_hint_on_none(capsys):
    assert check_pareto(None) is False
    assert "Hint" in capsys.readouterr().out
    assert check_pareto(lambda a, b: None) is False
    assert "returned None" in capsys.readouterr().out


def test_rejects_wrong_answers(capsys):
    def weak_dominance(sizes, scores):  # equal points knock each other out
        return [i for i in range(len(sizes))
                if not any(j != i and sizes[j] <= sizes[i] and scores[j] >= scores[i]
                           for j in range(len(sizes)))]

    def strict_both(sizes, scores):  # misses points beaten only on one axis with a tie on the other
        return [i for i in range(len(sizes))
                if not any(sizes[j] < sizes[i] and scores[j] > scores[i] for j in range(len(sizes)))]

    def lower_is_better(sizes, scores):
        return pareto_front(sizes, scores, higher_is_better=False)

    def raises(sizes, scores):
        raise IndexError("boom")

    for wrong in (weak_dominance, strict_both, lower_is_better, raises, lambda a, b: list(range(len(a))),
                  lambda a, b: ["x"], lambda a, b: 3):
        assert check_pareto(wrong) is False
    assert check_pareto([0, 1]) is False
    out = capsys.readouterr().out
    assert "expected" in out and "raised" in out
