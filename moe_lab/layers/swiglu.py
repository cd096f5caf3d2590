"""A top-k mixture of SwiGLU experts: the block of Mixtral, OLMoE, Qwen-MoE, DeepSeek-V3, GPT-OSS,
Granite-MoE and Llama 4.

Each expert is ``down(act(gate(x)) * up(x))``, stored as ``nn.Linear`` modules (``gate_up_proj``
holds the gate and up rows together, one matmul, as in Hugging Face's layout), not as slices of
fused 3-D tensors, so every technique of :mod:`moe_lab.compress` applies to them. The families
differ in how the router turns logits into gates, in the precision it does it in, and in a few
extras; each is a constructor option, so one class covers them all:

=====================  ==========================================================================
Mixtral                ``routing="softmax_topk"``, ``float32_gates=True``
OLMoE, Qwen2/3-MoE     ``routing="softmax_topk"``, ``normalize=norm_topk_prob``; Qwen2-MoE and
and Qwen3-Next         Qwen3-Next add a ``shared_expert`` scaled by ``sigmoid(shared_expert_gate(x))``
DeepSeek-V3 (Kimi-K2,  ``routing="sigmoid_group_topk"``, ``n_group``, ``topk_group``,
GLM-4.5 MoE, dots1)    ``routed_scaling_factor``, ``router_precision="float32"``,
                       ``float32_gates=True``, ungated shared experts (one wider SwiGLU)
GPT-OSS                ``routing="topk_softmax"``, ``router_bias=True``, ``router_precision="input"``,
                       ``expert_bias=True``, ``swiglu_limit`` / ``swiglu_alpha`` (clamped SwiGLU)
Granite-MoE            ``routing="topk_softmax"``
Llama 4                ``routing="sigmoid_topk"``, ``router_precision="input"``, ``gate_input=True``
                       (gates scale the experts' input), ungated shared expert
=====================  ==========================================================================

Tokens are grouped by expert by :func:`moe_lab.layers.dispatch.routed_mixture`, exactly as in
:class:`moe_lab.TopKMoE`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab._checks import finite_float, last_dim, positive_int
from moe_lab.layers.activations import get_activation
from moe_lab.layers.base import MixtureLayer
from moe_lab.layers.dispatch import routed_mixture
from moe_lab.layers.registry import register_layer
from moe_lab.layers.routing import (
    DispatchPlan,
    Routing,
    contiguous_groups,
    group_limited_routing,
    load_balancing_loss,
    plan_dispatch,
    router_z_loss,
    sigmoid_top_k_routing,
    top_k_routing,
)

RULES = ("softmax_topk", "topk_softmax", "sigmoid_topk", "sigmoid_group_topk")
PRECISIONS = ("float32_scores", "float32", "input")


def _project(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)``; a plain ``nn.Linear`` adds its bias after the matmul, as GPT-OSS's experts do
    (in bfloat16 that rounds twice, and moe_lab reproduces it bit for bit)."""
    if type(linear) is nn.Linear and linear.bias is not None:
        return F.linear(x, linear.weight) + linear.bias
    return linear(x)


class SwiGLUExpert(nn.Module):
    """``down_proj(act(gate) * up)`` with ``gate, up = gate_up_proj(x).chunk(2)``:
    ``(..., hidden) -> (..., hidden)``. The first ``intermediate_size`` rows of
    ``gate_up_proj`` are the gate, the rest the up projection.

    ``bias``: both projections have biases (GPT-OSS). ``swiglu_limit``: GPT-OSS's clamped
    SwiGLU instead of ``act(gate) * up``: ``gate`` clamped above at the limit, ``up`` to
    ``[-limit, limit]``, then ``(up + 1) * gate * sigmoid(swiglu_alpha * gate)``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu", *,
                 bias: bool = False, swiglu_limit: float | None = None, swiglu_alpha: float = 1.702):
        super().__init__()
        positive_int("hidden_size", hidden_size)
        positive_int("intermediate_size", intermediate_size)
        self._act = get_activation(activation)
        self.limit, self.alpha = swiglu_limit, swiglu_alpha
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = _project(self.gate_up_proj, x).chunk(2, dim=-1)
        if self.limit is None:
            return _project(self.down_proj, self._act(gate) * up)
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return _project(self.down_proj, (up + 1) * (gate * torch.sigmoid(gate * self.alpha)))


@register_layer
class SwiGLUMoE(MixtureLayer):
    """Top-k routed SwiGLU experts, optionally with a shared expert, in any of the routing
    families of the module docstring.

    Args:
        num_experts, hidden_size, intermediate_size: ``E``, the model width ``H`` and each
            expert's inner width ``I``.
        k: experts per token.
        normalize: renormalise the k gates to sum to one (``norm_topk_prob``; used by
            ``softmax_topk`` and ``sigmoid_group_topk``).
        activation: the expert activation (``"silu"`` for all the supported families).
        shared_expert_size: inner width of a shared expert every token uses (``None``: none).
        shared_expert_gate: scale the shared expert by ``sigmoid(shared_expert_gate(x))``
            (Qwen); ``False``: add it as is (DeepSeek-V3, Llama 4).

    Routing (see :mod:`moe_lab.layers.routing`):
        routing: ``"softmax_topk"``, ``"topk_softmax"``, ``"sigmoid_topk"`` or
            ``"sigmoid_group_topk"``.
        n_group, topk_group: group-limited top-k (``sigmoid_group_topk``); the group of each
            expert is the buffer ``expert_group`` (pruned with the experts).
        routed_scaling_factor: the gates are multiplied by it (``sigmoid_group_topk``).
            ``sigmoid_group_topk`` also has the buffer ``e_score_correction_bias`` ``(E,)``.
        router_bias: the router ``gate`` has a bias (GPT-OSS).
        router_precision: ``"float32_scores"``: logits in the input dtype, scores from them in
            float32; ``"float32"``: the router matmul itself in float32; ``"input"``: all in
            the input dtype.
        float32_gates: weight the experts' outputs with float32 gates (then round); otherwise
            the gates are cast to the input dtype first.
        gate_input: the gates scale each expert's *input* instead of its output (Llama 4).

    Experts: ``expert_bias``, ``swiglu_limit``, ``swiglu_alpha`` as in :class:`SwiGLUExpert`.

    Shapes: ``x`` is ``(..., H)``; the result is ``(..., H)`` in ``x``'s dtype. After each forward
    the layer holds ``tokens_per_expert``, ``dropped_tokens`` (always 0), ``last_routing``,
    ``router_logits`` (the raw ``(n, E)`` router output, with its graph: what Hugging Face's
    router loss reads) and the unweighted ``load_balancing_loss`` / ``router_z_loss`` like
    :class:`moe_lab.TopKMoE` (``aux_loss`` is ``None``: these models are compressed, not
    pre-trained, here).
    """

    ROUTERS = ("gate",)
    GATES = ("shared_expert_gate",)
    EXPERT_BUFFERS = ("e_score_correction_bias", "expert_group")
    INPUT = "hidden_size"
    _GRAPH_STATE = MixtureLayer._GRAPH_STATE + ("router_logits",)

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, k: int = 2, *,
                 normalize: bool = True, activation: str = "silu", shared_expert_size: int | None = None,
                 shared_expert_gate: bool = True, routing: str = "softmax_topk", n_group: int = 1,
                 topk_group: int = 1, routed_scaling_factor: float = 1.0, router_bias: bool = False,
                 router_precision: str = "float32_scores", float32_gates: bool = False,
                 gate_input: bool = False, expert_bias: bool = False, swiglu_limit: float | None = None,
                 swiglu_alpha: float = 1.702):
        super().__init__()
        positive_int("num_experts", num_experts)
        positive_int("k", k)
        if k > num_experts:
            raise ValueError(f"k must be <= num_experts ({num_experts}), got {k}")
        if shared_expert_size is not None:
            positive_int("shared_expert_size", shared_expert_size)
        if routing not in RULES:
            raise ValueError(f"routing must be one of {RULES}, got {routing!r}")
        if router_precision not in PRECISIONS:
            raise ValueError(f"router_precision must be one of {PRECISIONS}, got {router_precision!r}")
        positive_int("n_group", n_group)
        positive_int("topk_group", topk_group)
        if topk_group > n_group:
            raise ValueError(f"topk_group must be <= n_group ({n_group}), got {topk_group}")
        if n_group > 1 and routing != "sigmoid_group_topk":
            raise ValueError("n_group > 1 needs routing='sigmoid_group_topk'")
        finite_float("routed_scaling_factor", routed_scaling_factor, minimum=0.0, strict=True)
        if swiglu_limit is not None:
            finite_float("swiglu_limit", swiglu_limit, minimum=0.0, strict=True)
        finite_float("swiglu_alpha", swiglu_alpha)
        self.config = dict(num_experts=num_experts, hidden_size=hidden_size,
                           intermediate_size=intermediate_size, k=k, normalize=normalize,
                           activation=activation, shared_expert_size=shared_expert_size,
                           shared_expert_gate=shared_expert_gate, routing=routing, n_group=n_group,
                           topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
                           router_bias=router_bias, router_precision=router_precision,
                           float32_gates=float32_gates, gate_input=gate_input, expert_bias=expert_bias,
                           swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha)
        self.num_experts, self.k = num_experts, k
        self.router_logits = None
        self.gate = nn.Linear(hidden_size, num_experts, bias=router_bias)
        expert = dict(activation=activation, bias=expert_bias, swiglu_limit=swiglu_limit,
                      swiglu_alpha=swiglu_alpha)
        self.experts = nn.ModuleList([SwiGLUExpert(hidden_size, intermediate_size, **expert)
                                      for _ in range(num_experts)])
        if routing == "sigmoid_group_topk":
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
            if n_group > 1:
                self.register_buffer("expert_group", contiguous_groups(num_experts, n_group))
        if shared_expert_size is not None:
            self.shared_expert = SwiGLUExpert(hidden_size, shared_expert_size, activation)
            if shared_expert_gate:
                self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)

    def _logits(self, flat: torch.Tensor) -> torch.Tensor:
        if self.config["router_precision"] != "float32":
            return self.gate(flat)
        bias = None if self.gate.bias is None else self.gate.bias.float()
        return F.linear(flat.float(), self.gate.weight.float(), bias)

    def route(self, x: torch.Tensor) -> Routing:
        """Routing for ``x`` ``(..., H)`` flattened to ``n`` tokens; ``logits`` are the raw router
        output, gates are float32 (``float32_gates``) or in ``x``'s dtype."""
        last_dim("x", x, self.config["hidden_size"])
        c = self.config
        logits = self._logits(x.reshape(-1, x.shape[-1]))
        scored = logits.to(torch.promote_types(logits.dtype, torch.float32)) \
            if c["router_precision"] == "float32_scores" else logits
        if c["routing"] == "sigmoid_topk":
            routing = sigmoid_top_k_routing(scored, self.k)
        elif c["routing"] == "sigmoid_group_topk":
            routing = group_limited_routing(
                scored, self.k, n_group=c["n_group"], topk_group=c["topk_group"],
                correction_bias=self.e_score_correction_bias, groups=getattr(self, "expert_group", None),
                normalize=c["normalize"], scaling_factor=c["routed_scaling_factor"])
        else:
            routing = top_k_routing(scored, self.k, routing=c["routing"],
                                    normalize=c["normalize"] or c["routing"] == "topk_softmax")
        routing.logits = logits
        if not c["float32_gates"]:
            routing.gates = routing.gates.to(x.dtype)
        return routing

    def _mixture(self, flat: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """The routed experts' weighted sum, ``(n, H)`` in ``flat``'s dtype.

        Each expert computes in ``flat``'s dtype; its output is weighted in the gates' dtype
        (float32 gates: in float32). In 16-bit formats the weighted outputs are summed in
        float32 and rounded once, as transformers' default (grouped) experts do.
        """
        dtype, gate_dtype = flat.dtype, plan.gate.dtype
        gates = [None] * self.num_experts
        if self.config["gate_input"]:
            gates = plan.gate.to(dtype).split(plan.counts)
        if self.config["gate_input"]:  # each expert's input is scaled; its output gets gate 1
            plan = dataclasses.replace(plan, gate=torch.ones_like(plan.gate))

        def run(expert: nn.Module, gate: torch.Tensor | None):
            def call(chunk: torch.Tensor) -> torch.Tensor:
                chunk = chunk.to(dtype)
                return expert(chunk if gate is None else chunk * gate.unsqueeze(1)).to(
                    torch.promote_types(dtype, gate_dtype))
            return call

        sum_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        experts = [run(e, g) for e, g in zip(self.experts, gates)]
        return routed_mixture(flat.to(sum_dtype), plan, experts, self.config["hidden_size"]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.route(x)
        flat = x.reshape(-1, x.shape[-1])
        plan = plan_dispatch(routing.indices, routing.gates, self.num_experts)
        out = self._mixture(flat, plan)
        if self.config["shared_expert_size"] is not None:
            shared = self.shared_expert(flat)
            if self.config["shared_expert_gate"]:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        self._record(routing, plan.tokens_per_expert)
        self.router_logits = routing.logits
        self.load_balancing_loss = load_balancing_loss(routing.probs, routing.indices)
        self.router_z_loss = router_z_loss(routing.logits.float())
        return out.reshape(x.shape)
