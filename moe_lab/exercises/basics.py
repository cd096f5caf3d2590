"""Checker for notebook 01 (MoE basics): the dense mixture for one token, by hand."""

from __future__ import annotations

import torch

from moe_lab.exercises._feedback import NO_ANSWER, call, ready
from moe_lab.layers.dense import DenseMoE

HINT = ("Hint: for one token x of shape (d,): gates = softmax(layer.gating(x)) has shape (E,); "
        "mix the experts' outputs, sum_e gates[e] * layer.experts[e](x), shape (h,); "
        "then apply layer.output to get shape (o,).")


def _cases():
    """Two small layers with seeded weights and four tokens each (the global RNG is untouched)."""
    generator = torch.Generator().manual_seed(1234)
    cases = []
    for sizes in [(3, 5, 4, 2), (4, 6, 3, 5)]:
        with torch.random.fork_rng(devices=[]):  # layer init must not move the learner's seed
            layer = DenseMoE(*sizes)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        cases.append((layer, torch.randn(4, sizes[1], generator=generator)))
    return cases


def check_mix_one_token(fn) -> bool:
    """Check ``fn(layer, x) -> (o,)``: a :class:`moe_lab.DenseMoE`'s output for one token ``x`` (d,).

    Compares ``fn`` with ``layer(x)`` on a few seeded layers and tokens. Prints a hint for
    ``None`` (or a function that returns ``None``) and feedback for a wrong answer; returns
    ``True`` only when every output matches to 1e-5. Never raises on a wrong answer.
    """
    if not ready(fn, HINT, "fn(layer, x)"):
        return False
    for layer, tokens in _cases():
        with torch.no_grad():
            expected = layer(tokens)
            for x, want in zip(tokens, expected):
                got = call(fn, layer, x.clone(), hint=HINT)
                if got is NO_ANSWER:
                    return False
                if not isinstance(got, torch.Tensor):
                    print(f"Return a torch.Tensor, got {type(got).__name__}.")
                    return False
                if tuple(got.shape) != tuple(want.shape):
                    print(f"Wrong shape: expected {tuple(want.shape)} (output_size,), "
                          f"got {tuple(got.shape)}. "
                          "Did you keep the token's output as one vector?")
                    return False
                if not torch.allclose(got.float(), want, atol=1e-5, rtol=1e-4):
                    gap = float((got.float() - want).abs().max())
                    print(f"Values differ from DenseMoE by up to {gap:.3g}. Check that the gates are a "
                          "softmax over the experts (dim=-1), that each expert output is scaled by its own "
                          "gate, and that layer.output is applied after the sum.")
                    return False
    print("Correct: your one-token mixture matches moe_lab.DenseMoE.")
    return True
