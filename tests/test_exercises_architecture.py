"""The checker of notebook 02's exercise: the experts' share of a DenseMoE's parameters."""

from moe_lab import DenseMoE, param_count
from moe_lab.exercises.architecture import check_expert_share, true_expert_share


def right(num_experts, input_size, expert_size, output_size):
    experts = num_experts * (input_size * expert_size + expert_size)
    router = input_size * num_experts + num_experts
    output = expert_size * output_size + output_size
    return experts / (experts + router + output)


def test_true_share_matches_a_real_layer():
    layer = DenseMoE(4, 16, 32, 4)
    assert param_count(layer) == 2376
    assert true_expert_share(4, 16, 32, 4) == 2176 / 2376


def test_accepts_right_answer(capsys):
    assert check_expert_share(right) is True
    assert "Correct" in capsys.readouterr().out


def test_none_prints_hint(capsys):
    assert check_expert_share(None) is False
    assert "Hint" in capsys.readouterr().out
    assert check_expert_share(lambda *sizes: None) is False
    assert "Hint" in capsys.readouterr().out


def test_rejects_wrong_answers(capsys):
    def no_biases(E, d, h, o):
        return E * d * h / (E * d * h + d * E + h * o)

    def experts_only_vs_router(E, d, h, o):
        return E * (d * h + h) / (E * (d * h + h) + d * E + E)

    def percentage(*sizes):
        return 100 * right(*sizes)

    def one_expert(E, d, h, o):
        return (d * h + h) / (E * (d * h + h) + d * E + E + h * o + o)

    for fn in (no_biases, experts_only_vs_router, one_expert, lambda *s: 1.0, lambda *s: 0.5):
        assert check_expert_share(fn) is False
    assert check_expert_share(percentage) is False
    assert "percentage" in capsys.readouterr().out


def test_never_raises_on_bad_answers(capsys):
    def boom(*sizes):
        raise ZeroDivisionError("x")

    assert check_expert_share(boom) is False
    assert check_expert_share("0.9") is False
    assert check_expert_share(lambda *s: "abc") is False
    assert check_expert_share(lambda *s: float("nan")) is False
    out = capsys.readouterr().out
    assert "ZeroDivisionError" in out and "function" in out and "number" in out
