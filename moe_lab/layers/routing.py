"""Top-k routing as plain functions: gates, auxiliary losses, capacity and token grouping.

Shapes use ``n`` for tokens (all leading dimensions flattened), ``E`` for experts and
``k`` for experts chosen per token. Nothing here holds state; the layers in
:mod:`moe_lab.layers.topk` and :mod:`moe_lab.layers.swiglu` call these functions, and tests
compare them with slow references.

The routing rules of the MoE families in use today:

=====================================  ==============================================================
:func:`top_k_routing` ``softmax_topk``  softmax over all experts, top-k, optionally renormalised
                                        (Mixtral; OLMoE and Qwen-MoE with ``norm_topk_prob``)
:func:`top_k_routing` ``topk_softmax``  top-k logits, softmax over those k (the deck; GPT-OSS,
                                        Granite-MoE)
:func:`sigmoid_top_k_routing`           top-k logits, each gated by its own sigmoid (Llama 4)
:func:`group_limited_routing`           sigmoid scores, group-limited top-k on bias-corrected
                                        scores, renormalised and scaled (DeepSeek-V3, Kimi-K2,
                                        GLM-4.5 MoE, dots.llm1)
=====================================  ==============================================================
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
        probs: ``(n, E)`` each expert's routing probability: the softmax over all experts, or the
            expert's own sigmoid for sigmoid routers (used by the load-balancing loss).
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
    _check_k(k, logits.shape[-1])
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


def _check_k(k: int, num_experts: int) -> None:
    positive_int("k", k)
    if k > num_experts:
        raise ValueError(f"k must be <= num_experts ({num_experts}), got {k}")


def sigmoid_top_k_routing(logits: torch.Tensor, k: int) -> Routing:
    """Llama 4's rule: the ``k`` largest ``logits`` ``(n, E)``, each gated by its own sigmoid
    (gates are not normalised; ``k=1`` in the released models).

    The top-k is taken on the logits as given (their dtype decides ties); the sigmoid is
    computed in float32 and returned in the logits' dtype, as Hugging Face's ``Llama4Router``
    does. ``probs`` are every expert's sigmoid, in float32.
    """
    _check_k(k, logits.shape[-1])
    top, indices = logits.topk(k, dim=-1)
    gates = torch.sigmoid(top.float()).to(logits.dtype)
    return Routing(logits=logits, probs=torch.sigmoid(logits.float()), gates=gates, indices=indices)


def contiguous_groups(num_experts: int, n_group: int) -> torch.Tensor:
    """``(E,)`` group of each expert when ``E`` experts are split into ``n_group`` consecutive
    groups (equal sizes when ``n_group`` divides ``E``), as DeepSeek-V3 lays them out."""
    positive_int("num_experts", num_experts)
    positive_int("n_group", n_group)
    if n_group > num_experts:
        raise ValueError(f"n_group must be <= num_experts ({num_experts}), got {n_group}")
    return torch.arange(num_experts) * n_group // num_experts


def _group_scores(choice: torch.Tensor, groups: torch.Tensor, n_group: int) -> torch.Tensor:
    """``(n, n_group)``: each group's sum of its two best ``choice`` scores (one if it has one
    member, ``-inf`` if it has none). ``groups`` ``(E,)`` may hold groups of unequal sizes (after
    pruning); with equal consecutive groups this is DeepSeek-V3's ``view(n, G, E/G).topk(2).sum``."""
    n, num_experts = choice.shape
    usual = contiguous_groups(num_experts, n_group).to(groups.device)
    if num_experts % n_group == 0 and num_experts // n_group >= 2 and torch.equal(groups, usual):
        return choice.view(n, n_group, -1).topk(2, dim=-1).values.sum(dim=-1)  # the usual layout, fast
    sizes = torch.bincount(groups, minlength=n_group)
    order = torch.argsort(groups, stable=True)
    width = int(sizes.max())
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(num_experts, device=groups.device) - starts[groups[order]]
    table = torch.full((n_group, width), num_experts, dtype=torch.long, device=groups.device)
    table[groups[order], slot] = order  # padding points at an extra -inf column
    padded = torch.cat([choice, choice.new_full((n, 1), float("-inf"))], dim=1)[:, table]
    best = padded.topk(min(2, width), dim=-1).values
    scores = best.masked_fill(best == float("-inf"), 0).sum(dim=-1)
    return scores.masked_fill(sizes == 0, float("-inf"))


def group_limited_routing(logits: torch.Tensor, k: int, *, n_group: int = 1, topk_group: int = 1,
                          correction_bias: torch.Tensor | None = None, groups: torch.Tensor | None = None,
                          normalize: bool = True, scaling_factor: float = 1.0) -> Routing:
    """DeepSeek-V3's rule (also Kimi-K2, GLM-4.5 MoE, dots.llm1) from router ``logits`` ``(n, E)``.

    1. Scores are sigmoids, ``s = sigmoid(logits)``; the choice uses ``s + correction_bias``
       (a per-expert bias trained for balance, not for the gates).
    2. Experts form ``n_group`` groups (``groups`` ``(E,)``; default :func:`contiguous_groups`);
       each group is scored by the sum of its two best corrected scores and only the experts
       of the ``topk_group`` best groups compete.
    3. The ``k`` best corrected scores win; their gates are the *uncorrected* scores,
       divided by their sum (+1e-20) if ``normalize``, times ``scaling_factor``.

    Computed in the logits' dtype (Hugging Face runs it in float32). Ties and the order of
    ``indices`` follow ``torch.topk(..., sorted=False)`` exactly as Hugging Face calls it, so
    the experts see their tokens in the same order.
    """
    num_experts = logits.shape[-1]
    _check_k(k, num_experts)
    positive_int("n_group", n_group)
    positive_int("topk_group", topk_group)
    if topk_group > n_group:
        raise ValueError(f"topk_group must be <= n_group ({n_group}), got {topk_group}")
    scores = logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias
    if n_group > 1:
        if groups is None:
            groups = contiguous_groups(num_experts, n_group).to(logits.device)
        if groups.shape != (num_experts,):
            raise ValueError(f"groups must have shape ({num_experts},), got {tuple(groups.shape)}")
        group_scores = _group_scores(choice, groups, n_group)
        chosen = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, chosen, 1)
        choice = choice.masked_fill(~group_mask[:, groups].bool(), float("-inf"))
    indices = torch.topk(choice, k=k, dim=-1, sorted=False).indices
    gates = scores.gather(1, indices)
    if normalize:
        gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
    return Routing(logits=logits, probs=scores, gates=gates * scaling_factor, indices=indices)


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
