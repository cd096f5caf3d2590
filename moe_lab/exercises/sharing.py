"""Checker for notebook 07 (weight sharing): the router row of a merged group of experts."""

from __future__ import annotations

import torch

from moe_lab.compress.prune import expert_usage
from moe_lab.compress.share import merge_experts
from moe_lab.layers.dense import DenseMoE


def _cases() -> list[tuple[str, DenseMoE, torch.Tensor, list[list[int]]]]:
    """``(name, layer, calibration inputs (n, d), groups)`` cases, from fixed seeds."""
    generator = torch.Generator().manual_seed(7)
    cases = []
    for name, experts, groups in [("4 experts, groups [[0, 2], [1, 3]]", 4, [[0, 2], [1, 3]]),
                                  ("6 experts, groups of 3, 1 and 2", 6, [[0, 1, 2], [3], [4, 5]]),
                                  ("5 experts, one group of all", 5, [[0, 1, 2, 3, 4]])]:
        layer = DenseMoE(experts, 8, 6, 3)
        with torch.no_grad():  # fixed weights (global RNG untouched); biases spread usage unevenly
            for parameter in layer.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
            layer.gating.bias.copy_(torch.randn(experts, generator=generator) * 2)
        cases.append((name, layer, torch.randn(64, 8, generator=generator), groups))
    return cases


def check_merged_router(fn) -> bool:
    """Check ``fn(weight (E, d), bias (E,), usage (E,), members list[int]) -> (row (d,), bias scalar)``,
    the router row and bias of one merged group, against :func:`moe_lab.compress.share.merge_experts`.

    ``usage`` is each expert's mean gate weight on the calibration data (summing to one over
    all experts). Prints the first case that differs; returns ``True`` only if all match to 1e-5.
    """
    if fn is None:
        print("Hint: w = usage[members] / usage[members].sum(); row = sum_i w_i * weight[i]; "
              "bias = sum_i w_i * bias[i] + log(len(members)) (so a group of identical experts keeps "
              "the probability mass of all its members).")
        return False
    if not callable(fn):
        print(f"Expected a function fn(weight, bias, usage, members), got {type(fn).__name__}.")
        return False
    with torch.random.fork_rng(devices=[]):  # building layers draws random numbers: keep the learner's RNG
        cases = [(name, layer, groups, merge_experts(layer, x, len(groups), groups=groups),
                  expert_usage(layer, x)["gate_weight"].clamp_min(1e-6))
                 for name, layer, x, groups in _cases()]
    for name, layer, groups, merged, usage in cases:
        for g, members in enumerate(groups):
            try:
                with torch.no_grad():
                    answer = fn(layer.gating.weight.detach().clone(), layer.gating.bias.detach().clone(),
                                usage.clone(), list(members))
                if answer is None:
                    return check_merged_router(None)
                row, bias = answer
                row = torch.as_tensor(row, dtype=torch.float32).reshape(-1)
                bias = float(torch.as_tensor(bias))
            except Exception as error:  # a learner's bug should print, not stop the notebook
                print(f"{name}, group {members}: your function raised {type(error).__name__}: {error}")
                return False
            expected_row = merged.gating.weight[g].detach()
            expected_bias = float(merged.gating.bias[g].detach())
            if row.shape != expected_row.shape:
                print(f"{name}, group {members}: row has shape {tuple(row.shape)}, expected "
                      f"{tuple(expected_row.shape)} (one weight per input feature).")
                return False
            if not torch.allclose(row, expected_row, rtol=1e-5, atol=1e-5):
                print(f"{name}, group {members}: the row differs (max error "
                      f"{(row - expected_row).abs().max().item():.2e}). Weight the members' rows by their "
                      "usage, renormalised to sum to one within the group.")
                return False
            if not abs(bias - expected_bias) <= 1e-5 * max(1.0, abs(expected_bias)):
                print(f"{name}, group {members}: bias {bias:.5f}, expected {expected_bias:.5f}. Average the "
                      "biases the same way, then add log(group size).")
                return False
    print("Correct: your merged router rows and biases match moe_lab.compress.share.merge_experts.")
    return True
