"""The checker of notebook 01's exercise accepts right answers and rejects wrong ones without raising."""

import torch

from moe_lab.exercises.basics import check_mix_one_token


def right(layer, x):
    gates = torch.softmax(layer.gating(x), dim=-1)
    mixed = sum(g * expert(x) for g, expert in zip(gates, layer.experts))
    return layer.output(mixed)


def right_vectorised(layer, x):
    gates = layer.gating(x).softmax(-1)
    hidden = torch.stack([e(x) for e in layer.experts])  # (E, h)
    return layer.output(gates @ hidden)


def test_accepts_right_answers(capsys):
    assert check_mix_one_token(right) is True
    assert check_mix_one_token(right_vectorised) is True
    assert "Correct" in capsys.readouterr().out


def test_none_prints_hint(capsys):
    assert check_mix_one_token(None) is False
    assert "Hint" in capsys.readouterr().out
    assert check_mix_one_token(lambda layer, x: None) is False
    assert "Hint" in capsys.readouterr().out


def test_rejects_wrong_answers(capsys):
    wrong = [
        # no softmax: raw logits as gates
        lambda layer, x: layer.output(sum(g * e(x) for g, e in zip(layer.gating(x), layer.experts))),
        # uniform gates
        lambda layer, x: layer.output(sum(e(x) for e in layer.experts) / len(layer.experts)),
        # softmax over the wrong axis of a (1, E) row: all gates become 1
        lambda layer, x: layer.output(sum(g * e(x) for g, e in
                                          zip(layer.gating(x[None]).softmax(0)[0], layer.experts))),
        # forgot the output projection (wrong shape)
        lambda layer, x: sum(g * e(x) for g, e in zip(layer.gating(x).softmax(-1), layer.experts)),
        # output applied per expert without bias handling: output(sum) != sum(output) * gates with bias twice
        lambda layer, x: sum(g * layer.output(e(x)) + layer.output.bias
                             for g, e in zip(layer.gating(x).softmax(-1), layer.experts)),
    ]
    for fn in wrong:
        assert check_mix_one_token(fn) is False
    out = capsys.readouterr().out
    assert "Correct" not in out


def test_never_raises_on_bad_answers(capsys):
    def boom(layer, x):
        raise RuntimeError("oops")

    assert check_mix_one_token(boom) is False
    assert check_mix_one_token(42) is False
    assert check_mix_one_token(lambda layer, x: [1.0, 2.0]) is False
    out = capsys.readouterr().out
    assert "RuntimeError" in out and "function" in out and "Tensor" in out


def test_does_not_touch_global_rng():
    state = torch.random.get_rng_state()
    check_mix_one_token(right)
    assert torch.equal(state, torch.random.get_rng_state())
