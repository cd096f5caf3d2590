"""Checkers for notebook 06 (conditional computation): grouping tokens by expert, FLOPs per token.

``check_group_by_expert`` runs the learner's grouping function on a few routings and compares
it with :func:`moe_lab.layers.routing.plan_dispatch`; ``check_topk_flops`` compares a predicted FLOP
count with the formula for :class:`moe_lab.TopKMoE`. Both print feedback and return a bool;
``None`` (not answered yet) prints a hint and returns ``False``.
"""

from __future__ import annotations

import math

import torch

from moe_lab._checks import positive_int
from moe_lab.layers.routing import plan_dispatch

_GROUP_HINT = ("Hint: flatten the (n, k) indices into n*k assignments, remember which token each came "
               "from (torch.arange(n).repeat_interleave(k) for a row-major flatten), sort the "
               "assignments by expert (torch.argsort(..., stable=True)), and count them with "
               "torch.bincount(..., minlength=num_experts).")


def _routing_cases() -> list[tuple[torch.Tensor, int]]:
    """Small routings ``(indices (n, k), num_experts)``: the notebook's example, edge cases, random ones."""
    cases = [(torch.tensor([[2, 0], [0, 1], [2, 1], [3, 0], [0, 2]]), 4),  # expert 3 gets 1, none empty
             (torch.tensor([[1], [1], [1]]), 3),  # everyone to expert 1, experts 0 and 2 empty
             (torch.tensor([[4, 0, 2]]), 5)]  # one token, k = 3
    generator = torch.Generator().manual_seed(6)
    for n, k, num_experts in [(7, 2, 4), (16, 1, 8), (12, 3, 5)]:
        scores = torch.rand(n, num_experts, generator=generator)
        cases.append((scores.topk(k, dim=-1).indices, num_experts))
    return cases


def _as_int_list(value, name: str) -> list[int] | None:
    """``value`` (tensor, list or tuple of ints) as a list of ints, or ``None`` with a message."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.dim() != 1:
            print(f"{name} should be a 1-D integer tensor, got dtype {value.dtype} and shape "
                  f"{tuple(value.shape)}.")
            return None
        return [int(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool)
                                                for v in value):
        return list(value)
    print(f"{name} should be a 1-D integer tensor (or a list of ints), got {type(value).__name__}.")
    return None


def check_group_by_expert(answer) -> bool:
    """Check a grouping function ``answer(indices, num_experts) -> (token_order, counts)``.

    ``indices`` is the router's ``(n, k)`` choice of experts; ``token_order`` must list the
    ``n * k`` (token, expert) assignments' tokens, expert 0's first, then expert 1's, ...;
    ``counts`` (length ``num_experts``) how many assignments each expert got. Any order of
    the tokens *within* one expert's group is accepted. Compared with
    :func:`moe_lab.layers.routing.plan_dispatch` on several routings (empty experts included).
    """
    if answer is None:
        print("Not answered yet. " + _GROUP_HINT)
        return False
    if not callable(answer):
        print(f"Expected a function (indices, num_experts) -> (token_order, counts), got "
              f"{type(answer).__name__}.")
        return False
    for indices, num_experts in _routing_cases():
        n, k = indices.shape
        plan = plan_dispatch(indices, torch.ones(n, k), num_experts)
        try:
            result = answer(indices.clone(), num_experts)
        except Exception as error:  # the learner's code failing is feedback, not a crash
            print(f"Your function raised {type(error).__name__}: {error} on indices {indices.tolist()}.")
            return False
        if result is None:
            print("Your function returns None: not answered yet. " + _GROUP_HINT)
            return False
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            print("Return two things: (token_order, counts).")
            return False
        order = _as_int_list(result[0], "token_order")
        counts = _as_int_list(result[1], "counts")
        if order is None or counts is None:
            return False
        where = f"for indices {indices.tolist()} with {num_experts} experts"
        if counts != plan.counts:
            print(f"counts should be {plan.counts} {where}, got {counts}. Did you pass "
                  f"minlength=num_experts so that empty experts count 0?")
            return False
        if len(order) != n * k:
            print(f"token_order should have n*k = {n * k} entries (one per assignment) {where}, "
                  f"got {len(order)}.")
            return False
        start = 0
        expected = plan.token_index.tolist()
        for expert, count in enumerate(plan.counts):
            got, want = sorted(order[start:start + count]), sorted(expected[start:start + count])
            if got != want:
                print(f"Expert {expert}'s group should hold tokens {want} {where}, got {got}. "
                      f"Sort the assignments by expert, and map each back to its token.")
                return False
            start += count
    print("Correct: tokens grouped by expert, with the right counts (same groups as plan_dispatch).")
    return True


def topk_flops_per_token(num_experts: int, input_size: int, expert_size: int, output_size: int,
                         k: int) -> int:
    """Forward matmul FLOPs per token of a :class:`moe_lab.TopKMoE` (2 per multiply-add, biases free).

    Router ``2*d*E`` + ``k`` experts ``k * 2*d*h`` + output ``2*h*o``, the count torch's
    ``FlopCounterMode`` reports for the layer.
    """
    for name, value in [("num_experts", num_experts), ("input_size", input_size),
                        ("expert_size", expert_size), ("output_size", output_size), ("k", k)]:
        positive_int(name, value)
    if k > num_experts:
        raise ValueError(f"k must be <= num_experts ({num_experts}), got {k}")
    return 2 * input_size * num_experts + k * 2 * input_size * expert_size + 2 * expert_size * output_size


def check_topk_flops(answer, *, num_experts: int, input_size: int, expert_size: int, output_size: int,
                     k: int) -> bool:
    """Check a predicted FLOPs-per-token count for ``TopKMoE(num_experts, input_size, expert_size,
    output_size, k=k)`` (within 1 %), with a diagnosis of common slips."""
    sizes = dict(num_experts=num_experts, input_size=input_size, expert_size=expert_size,
                 output_size=output_size, k=k)
    right = topk_flops_per_token(**sizes)
    if answer is None:
        print("Not answered yet. Hint: a Linear(a, b) costs 2*a*b FLOPs per token (a multiply and an "
              "add per weight). Add the router, the k chosen experts and the output layer.")
        return False
    if isinstance(answer, bool) or not isinstance(answer, (int, float)) or not math.isfinite(answer):
        print(f"Expected a number of FLOPs, got {answer!r}.")
        return False
    if math.isclose(answer, right, rel_tol=0.01):
        print(f"Correct: {right:,} FLOPs per token.")
        return True
    d, h, o, E = input_size, expert_size, output_size, num_experts
    slips = {
        right // 2: "you counted multiply-adds; FlopCounterMode counts 2 FLOPs per multiply-add",
        right - 2 * d * E: "you forgot the router (gating) layer",
        right - 2 * h * o: "you forgot the output layer",
        right - 2 * d * E - 2 * h * o: "you counted only the experts: add the router and the output layer",
        2 * d * E + E * 2 * d * h + 2 * h * o: "that is the cost with all E experts (a dense mixture): "
                                                "only k experts run per token",
        2 * d * E + 2 * d * h + 2 * h * o: "each token runs k experts, not one",
    }
    for value, message in slips.items():
        if value != right and math.isclose(answer, value, rel_tol=0.01):
            print(f"Not quite: {message}.")
            return False
    print(f"Not quite ({answer:,} is off by {answer / right:.2f}x). Count 2*in*out for each Linear a "
          f"token passes through: the router, k experts, the output layer.")
    return False
