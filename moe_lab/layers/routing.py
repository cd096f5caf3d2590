"""Top-k routing as plain functions: gates, auxiliary losses, capacity and token grouping.

Shapes use ``n`` for tokens (all leading dimensions flattened), ``E`` for experts and
``k`` for experts chosen per token. Nothing here holds state; the layers in
:mod:`moe_lab.layers.topk` call these functions, and tests compare them with slow references.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_lab._checks import finite_float, positive_int

ROUTINGS = ("topk_softmax", "softmax_topk")


@dataclass
class Routing:
    """The router's decision for ``n`` tokens.

    Attributes:
        logits: ``(n, E)`` raw router scores (noise included, if any).
        probs: ``(n, E)`` softmax over all experts (used by the load-balancing loss).
        gates: ``(n, k)`` weight given to each chosen expert.
        indices: ``(n, k)`` chosen experts, highest score first.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    gates: torch.Tensor
    indices: torch.Tensor


def top_k_routing(logits: torch.Tensor, k: int, *, routing: str = "topk_softmax",
                  normalize: bool = True) -> Routing:
    """Choose ``k`` experts per token from router ``logits`` of shape ``(n, E)``.

    ``routing="topk_softmax"`` is the deck's rule: take the top-k logits, then softmax over
    those k values. ``routing="softmax_topk"`` is Mixtral's: softmax over all experts, take
    the top-k probabilities and (if ``normalize``) divide by their sum. The two give the same
    gates when ``normalize=True``; with ``normalize=False`` the gates are the raw
    probabilities (Switch Transformer, Qwen-MoE with ``norm_topk_prob=False``), which keeps a
    gradient flowing to the router even when ``k=1``.
    """
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    num_experts = logits.shape[-1]
    positive_int("k", k)
    if k > num_experts:
        raise ValueError(f"k must be <= num_experts ({num_experts}), got {k}")
    probs = logits.softmax(dim=-1)
    if routing == "topk_softmax":
        if not normalize:
            raise ValueError("normalize=False needs routing='softmax_topk'")
        top_logits, indices = logits.topk(k, dim=-1)
        gates = top_logits.softmax(dim=-1)
    else:
        gates, indices = probs.topk(k, dim=-1)
        if normalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
    return Routing(logits=logits, probs=probs, gates=gates, indices=indices)


def noisy_logits(clean_logits: torch.Tensor, noise_logits: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Noisy top-k gating (Shazeer et al. 2017): ``clean + N(0, 1) * softplus(noise_logits)``.

    Both inputs are ``(n, E)``; the noise scale is learned per token and expert.
    """
    noise = torch.randn(clean_logits.shape, generator=generator, device=clean_logits.device,
                        dtype=clean_logits.dtype)
    return clean_logits + noise * F.softplus(noise_logits)


def load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Switch Transformer balance loss without its weight: ``E * sum_i f_i * P_i``.

    ``f_i`` is the fraction of the ``n * k`` routed assignments that went to expert ``i``
    (counted before any capacity drop) and ``P_i`` the mean router probability of expert
    ``i``. It equals 1.0 when routing is perfectly uniform and grows to ``E`` when
    everything goes to one expert. ``probs`` is ``(n, E)``, ``indices`` is ``(n, k)``.
    """
    num_experts = probs.shape[-1]
    if indices.numel() == 0:  # no tokens: nothing is unbalanced (0, not 0/0 = nan), graph kept
        return probs.sum() * 0
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts)
    fraction = counts.to(probs.dtype) / indices.numel()
    return num_experts * (fraction * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss without its weight: mean over tokens of ``logsumexp(logits)**2``
    (0 for no tokens)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0
    return torch.logsumexp(logits, dim=-1).square().mean()


def expert_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ``ceil(capacity_factor * num_tokens * k / num_experts)``."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
    positive_int("k", k)
    positive_int("num_experts", num_experts)
    finite_float("capacity_factor", capacity_factor, minimum=0.0, strict=True)
    return math.ceil(capacity_factor * num_tokens * k / num_experts)


@dataclass
class DispatchPlan:
    """Routed assignments grouped by expert, ready for one matmul per expert.

    Attributes:
        token_index: ``(m,)`` token of each kept assignment, expert 0's first.
        gate: ``(m,)`` gate weight of each kept assignment.
        counts: kept assignments per expert, a list of ``E`` ints summing to ``m``.
        tokens_per_expert: ``(E,)`` assignments per expert before the capacity cut.
        dropped: number of assignments cut by the capacity limit.
    """

    token_index: torch.Tensor
    gate: torch.Tensor
    counts: list[int]
    tokens_per_expert: torch.Tensor
    dropped: int


def plan_dispatch(indices: torch.Tensor, gates: torch.Tensor, num_experts: int,
                  capacity: int | None = None) -> DispatchPlan:
    """Group the ``(n, k)`` assignments by expert, keeping at most ``capacity`` per expert.

    Under a capacity limit, first choices are served before second choices and, within a
    choice rank, earlier tokens before later ones (GShard's priority). A dropped assignment
    simply contributes nothing to its token's output.
    """
    n, k = indices.shape
    flat_expert = indices.t().reshape(-1)  # rank-major: every token's first choice first
    flat_token = torch.arange(n, device=indices.device).repeat(k)
    flat_gate = gates.t().reshape(-1)
    order = torch.argsort(flat_expert, stable=True)
    tokens_per_expert = torch.bincount(flat_expert, minlength=num_experts)
    dropped = 0
    if capacity is not None:
        starts = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
        position = torch.arange(order.numel(), device=order.device) - starts[flat_expert[order]]
        keep = position < capacity
        dropped = int((~keep).sum())
        order = order[keep]
        kept = tokens_per_expert.clamp(max=capacity)
    else:
        kept = tokens_per_expert
    return DispatchPlan(token_index=flat_token[order], gate=flat_gate[order],
                        counts=kept.tolist(), tokens_per_expert=tokens_per_expert,
                        dropped=dropped)
