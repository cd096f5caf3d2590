"""Checker for notebook 08 (sparse gating): the Switch Transformer load-balancing loss."""

from __future__ import annotations

import torch

from moe_lab.exercises._feedback import ready
from moe_lab.layers.routing import load_balancing_loss, top_k_routing

HINT = ("Hint: f_i = (assignments to expert i) / (n * k), counted with torch.bincount on "
        "indices.reshape(-1); P_i = probs.mean(dim=0)[i]; return E * sum_i f_i * P_i.")


def _cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, probs (n, E), indices (n, k))`` test cases, from fixed seeds."""
    generator = torch.Generator().manual_seed(8)
    cases = []
    uniform = torch.zeros(8, 4)
    uniform[torch.arange(8), torch.arange(8) % 4] = 5.0
    collapsed = torch.zeros(6, 4)
    collapsed[:, 0] = 10.0
    for name, logits, k in [("uniform routing, E=4, k=1", uniform, 1),
                            ("collapsed routing, E=4, k=1", collapsed, 1),
                            ("random logits, E=8, k=1", torch.randn(32, 8, generator=generator), 1),
                            ("random logits, E=8, k=2", torch.randn(32, 8, generator=generator) * 2, 2),
                            ("random logits, E=3, k=2", torch.randn(10, 3, generator=generator), 2)]:
        routing = top_k_routing(logits, k)
        cases.append((name, routing.probs, routing.indices))
    return cases


def check_balance_loss(fn) -> bool:
    """Check ``fn(probs, indices) -> scalar`` against :func:`moe_lab.layers.routing.load_balancing_loss`.

    ``probs`` is ``(n, E)`` (softmax over all experts), ``indices`` is ``(n, k)``. Prints which
    case differs; returns ``True`` only if every case matches to 1e-5.
    """
    if not ready(fn, HINT, "fn(probs, indices)"):
        return False
    for name, probs, indices in _cases():
        expected = float(load_balancing_loss(probs, indices))
        try:
            got = fn(probs.clone(), indices.clone())
            got = float(torch.as_tensor(got))
        except Exception as error:  # a learner's bug should print, not stop the notebook
            print(f"{name}: your function raised {type(error).__name__}: {error}")
            return False
        if not abs(got - expected) <= 1e-5 * max(1.0, abs(expected)):
            print(f"{name}: got {got:.5f}, expected {expected:.5f}. Check f_i sums to 1 over experts "
                  "(divide by n * k) and the factor E.")
            return False
    print("Correct: your loss matches moe_lab.layers.routing.load_balancing_loss on every case "
          "(1.0 when uniform, E when collapsed).")
    return True
