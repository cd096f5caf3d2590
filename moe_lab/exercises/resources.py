"""Checker for notebook 15 (capstone): the dispatch and combine weights of Soft MoE."""

from __future__ import annotations

import torch

from moe_lab.layers.slot import SlotSoftMoE


def _cases() -> list[tuple[str, SlotSoftMoE, torch.Tensor]]:
    """``(name, layer, x (batch, tokens, d))`` cases from fixed seeds (the global RNG is untouched)."""
    generator = torch.Generator().manual_seed(15)
    cases = []
    for name, experts, slots, batch, tokens, width in [("1 sequence of 3 tokens, 2 slots", 2, 1, 1, 3, 2),
                                                       ("2 sequences of 5 tokens, 6 slots", 3, 2, 2, 5, 4),
                                                       ("3 sequences of 4 tokens, 8 slots", 4, 2, 3, 4, 3)]:
        with torch.random.fork_rng(devices=[]):
            layer = SlotSoftMoE(experts, slots, width, 4, 2)
        with torch.no_grad():
            layer.phi.copy_(torch.randn(layer.phi.shape, generator=generator))
        cases.append((name, layer, torch.randn(batch, tokens, width, generator=generator) * 1.5))
    return cases


def check_soft_moe_weights(fn) -> bool:
    """Check ``fn(x (B, T, d), phi (d, n)) -> (dispatch, combine)``, both ``(B, T, n)``, against
    :meth:`moe_lab.layers.slot.SlotSoftMoE.routing_weights`.

    Prints what is wrong in the first case that differs; returns ``True`` only if every case
    matches to 1e-5.
    """
    if fn is None:
        print("Hint: logits = x @ phi has shape (B, T, n). dispatch = softmax over the tokens (dim=1): "
              "each slot averages the tokens of its sequence. combine = softmax over the slots (dim=2): "
              "each token averages the slot outputs.")
        return False
    if not callable(fn):
        print(f"Expected a function fn(x, phi) returning (dispatch, combine), got {type(fn).__name__}.")
        return False
    for name, layer, x in _cases():
        phi = layer.phi.detach().clone()
        with torch.no_grad():
            dispatch, combine = layer.routing_weights(x)
        try:
            with torch.no_grad():
                answer = fn(x.clone(), phi.clone())
            if answer is None:
                return check_soft_moe_weights(None)
            mine_d, mine_c = (torch.as_tensor(a, dtype=torch.float32) for a in answer)
        except Exception as error:  # a learner's bug should print, not stop the notebook
            print(f"{name}: your function raised {type(error).__name__}: {error}")
            return False
        for label, mine, expected in [("dispatch", mine_d, dispatch), ("combine", mine_c, combine)]:
            if mine.shape != expected.shape:
                print(f"{name}: {label} has shape {tuple(mine.shape)}, expected {tuple(expected.shape)} "
                      "(batch, tokens, slots).")
                return False
        if torch.allclose(mine_d, combine, atol=1e-5) and torch.allclose(mine_c, dispatch, atol=1e-5):
            print(f"{name}: dispatch and combine are swapped. Dispatch normalises over the tokens (dim=1), "
                  "combine over the slots (dim=2).")
            return False
        for label, mine, expected, dim, what in [("dispatch", mine_d, dispatch, 1, "tokens"),
                                                 ("combine", mine_c, combine, 2, "slots")]:
            if not torch.allclose(mine, expected, rtol=1e-5, atol=1e-5):
                sums = mine.sum(dim=dim)
                why = ("" if torch.allclose(sums, torch.ones_like(sums), atol=1e-4)
                       else f" Its sums over the {what} (dim={dim}) are not all one.")
                print(f"{name}: {label} differs (max error {(mine - expected).abs().max().item():.2e}).{why} "
                      f"It is softmax(x @ phi) over the {what} (dim={dim}).")
                return False
    print("Correct: your dispatch and combine weights match SlotSoftMoE.routing_weights.")
    return True
