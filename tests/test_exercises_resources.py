import torch

from moe_lab.exercises.resources import check_soft_moe_weights


def right(x, phi):
    logits = x @ phi
    return logits.softmax(dim=1), logits.softmax(dim=2)


def test_accepts_right_answer(capsys):
    assert check_soft_moe_weights(right)
    assert "Correct" in capsys.readouterr().out


def test_accepts_an_explicit_loop_answer():
    def loop(x, phi):
        logits = torch.einsum("btd,dn->btn", x, phi)
        e = logits.exp()
        return e / e.sum(dim=1, keepdim=True), e / e.sum(dim=2, keepdim=True)

    assert check_soft_moe_weights(loop)


def test_hint_on_none(capsys):
    assert check_soft_moe_weights(None) is False
    assert "Hint" in capsys.readouterr().out
    assert check_soft_moe_weights(lambda x, phi: None) is False
    assert "Hint" in capsys.readouterr().out


def test_rejects_wrong_answers(capsys):
    wrong = {
        "swapped": (lambda x, phi: right(x, phi)[::-1], "swapped"),
        "both over slots": (lambda x, phi: ((x @ phi).softmax(2), (x @ phi).softmax(2)), "dispatch differs"),
        "both over tokens": (lambda x, phi: ((x @ phi).softmax(1), (x @ phi).softmax(1)), "combine differs"),
        "no softmax": (lambda x, phi: (x @ phi, x @ phi), "not all one"),
        "softmax over the batch": (lambda x, phi: ((x @ phi).softmax(0), (x @ phi).softmax(2)), "dispatch"),
        "transposed": (lambda x, phi: tuple(w.transpose(1, 2) for w in right(x, phi)), "shape"),
        "raises": (lambda x, phi: x @ phi.T, "raised"),
    }
    for name, (fn, message) in wrong.items():
        assert check_soft_moe_weights(fn) is False, name
        assert message in capsys.readouterr().out, name


def test_not_callable_and_rng_untouched(capsys):
    assert check_soft_moe_weights(3) is False
    assert "Expected a function" in capsys.readouterr().out
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check_soft_moe_weights(right)
    assert torch.equal(torch.rand(3), expected)
