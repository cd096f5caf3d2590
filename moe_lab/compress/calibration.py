"""Calibration for mixtures: what each expert, and each linear inside it, really receives.

Data-free compression (round-to-nearest, a plain SVD) treats every weight alike. Calibrated
methods (GPTQ, activation-aware low rank, REAP pruning) look at the inputs a weight sees, and
in a mixture an expert sees only the tokens the router sends to it. Everything here reads a
layer through the :class:`~moe_lab.layers.base.MixtureLayer` interface (``route``,
``expert_input``, ``expert_modules``, ``ROUTERS`` / ``GATES``), never through its class:

* :func:`routed_tokens`: per expert, the tokens routed to it, their gates and the expert's
  inputs (a dense layer routes every token to every expert, weighted by its gate);
* :class:`HessianAccumulator` / :func:`hessian_from_inputs`: streaming, optionally
  gate-weighted second moments ``mean(x x^T)`` of a linear's inputs; :func:`dampen` makes
  one positive definite;
* :func:`calibrate_sequentially`: replace linears in the order a computation reaches them,
  each calibrated (through forward pre-hooks) on the inputs the already-replaced ones
  produce: a SwiGLU expert's ``down_proj`` sees the intermediate activations of its
  compressed ``gate_up_proj`` (GPTQ's "true sequential");
* :func:`calibrate_mixture`: one mixture layer: the linears inside ``expert_input`` first,
  then every expert on its routed tokens (with a coverage policy for experts that receive
  too few of them), then the rest of the layer (an output projection, a shared expert), with
  a per-expert report;
* :func:`calibrate_layers`: a whole model, layer by layer, each layer calibrated on the
  inputs produced by the already-compressed layers before it;
* :func:`expert_contributions`: each expert's gated contribution to the layer output, per
  token (REAP's score).

Capacity limits are ignored: an assignment an expert's capacity would drop still counts as
routed. A slot layer's experts see mixtures of tokens, not tokens: for it the token view of
``route`` (every token, weighted by its combine mass) stands in for their inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from moe_lab._checks import finite_float, last_dim, positive_int
from moe_lab.compress.targets import check_mixture, layer_inputs, moe_layers, replace_module

COVERAGES = ("all", "fallback", "error")


class CoverageWarning(UserWarning):
    """An expert received too few calibration tokens and was compressed without them."""


class HessianAccumulator:
    """Streaming ``H = sum_t c_t x_t x_t^T / sum_t c_t`` over batches of inputs ``x_t`` ``(in,)``.

    ``c_t`` are optional nonnegative per-token weights (router gates, say: MoEQuant weights an
    expert's Hessian by the gates of the tokens it serves); without them ``H`` is the plain mean.
    GPTQ's result does not depend on the overall scale of ``H``, only on the relative weights.
    Each chunk of ``chunk_size`` tokens is multiplied in float32 and added to a float64 sum, so
    memory stays ``O(chunk_size * in + in^2)`` and the rounding error does not grow with the token count.
    """

    def __init__(self, in_features: int, chunk_size: int = 4096):
        self.in_features = positive_int("in_features", in_features)
        self.chunk_size = positive_int("chunk_size", chunk_size)
        self.count = 0  # tokens seen
        self._sum: torch.Tensor | None = None  # float64 (in, in)
        self._total = 0.0  # sum of the token weights

    @torch.no_grad()
    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> HessianAccumulator:
        """Add the tokens of ``x`` ``(..., in)``, weighted by ``weights`` ``(...)`` if given."""
        last_dim("x", x, self.in_features)
        if weights is not None:
            if not isinstance(weights, torch.Tensor) or weights.shape != x.shape[:-1]:
                raise ValueError(f"weights must be a tensor of shape {tuple(x.shape[:-1])}, "
                                 f"got {tuple(getattr(weights, 'shape', ()))}")
            if not torch.isfinite(weights).all() or (weights < 0).any():
                raise ValueError("weights must be finite and nonnegative")
            weights = weights.detach().reshape(-1).to(device=x.device, dtype=torch.float32)
        x = x.detach().reshape(-1, self.in_features)
        if self._sum is None:
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=x.device)
        for start in range(0, x.shape[0], self.chunk_size):
            chunk = x[start:start + self.chunk_size].float()
            scaled = chunk if weights is None else chunk * weights[start:start + self.chunk_size, None]
            self._sum += (scaled.T @ chunk).double()
        self._total += x.shape[0] if weights is None else float(weights.double().sum())
        self.count += x.shape[0]
        return self

    @property
    def hessian(self) -> torch.Tensor:
        """The float32 ``(in, in)`` weighted mean of ``x x^T`` so far."""
        if self._sum is None or self._total == 0:
            raise ValueError("no tokens (or only zero-weight tokens) were added: the Hessian is undefined")
        return (self._sum / self._total).float()


def hessian_from_inputs(inputs: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 ``(in, in)`` mean of ``x x^T`` over the tokens of ``inputs`` ``(..., in)``, optionally
    weighted by nonnegative ``weights`` ``(...)`` (see :class:`HessianAccumulator`)."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0:
        raise TypeError(f"inputs must be a tensor of shape (..., in), got {type(inputs).__name__}")
    return HessianAccumulator(inputs.shape[-1]).add(inputs, weights).hessian


def dampen(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H', dead)``: a copy of the ``(in, in)`` Hessian whose dead columns (``dead``: zero
    diagonal, inputs always zero) get a diagonal of 1, plus ``damp * mean(diag H)`` on the
    diagonal, the mean taken over the live columns only (so scaling the inputs scales ``H'``)."""
    finite_float("damp", damp, minimum=0.0)
    h = hessian.clone()
    dead = hessian.diagonal() == 0
    h.diagonal()[dead] = 1.0
    level = hessian.diagonal()[~dead].mean() if (~dead).any() else 1.0
    h.diagonal().add_(damp * level)
    return h, dead


@dataclass
class ExpertTokens:
    """The calibration tokens one expert receives.

    Attributes:
        expert: the expert's index.
        index: ``(m,)`` rows of the flattened layer input routed to it.
        gates: ``(m,)`` the gate each of those tokens gives it.
        inputs: ``(m, d)`` what the expert receives for them (``layer.expert_input``).
    """

    expert: int
    index: torch.Tensor
    gates: torch.Tensor
    inputs: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.index.numel())


@torch.no_grad()
def routed_tokens(layer: nn.Module, x: torch.Tensor) -> list[ExpertTokens]:
    """For every expert of a mixture layer, the tokens of ``x`` ``(..., d)`` the router sends
    to it (eval mode: no routing noise), with their gates and the expert's inputs."""
    check_mixture(layer)
    last_dim("x", x, layer.input_size)
    was = layer.training
    layer.eval()
    try:
        routing = layer.route(x)
        inputs = layer.expert_input(x.reshape(-1, x.shape[-1]))
    finally:
        layer.train(was)
    result = []
    for e in range(layer.num_experts):
        chosen = routing.indices == e  # (n, k): at most one True per row
        index = chosen.any(dim=1).nonzero().squeeze(1)
        gates = (routing.gates * chosen).sum(dim=1)[index]
        result.append(ExpertTokens(e, index, gates, inputs.index_select(0, index)))
    return result


def _linears(module: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules inside ``module`` (itself included, as ``""``), except those under
    the top-level children named in ``skip``."""
    return {name: m for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[0] not in skip}


def calibrate_sequentially(run: Callable[[], object], targets: dict[str, nn.Linear],
                           transform: Callable[[str, nn.Linear, HessianAccumulator], nn.Module],
                           put: Callable[[str, nn.Module], None], weights: torch.Tensor | None = None
                           ) -> dict[str, HessianAccumulator]:
    """Replace ``targets`` in the order ``run()`` reaches them, each calibrated on what it receives
    once every earlier one is replaced.

    Repeatedly: ``run()`` with a forward pre-hook on each remaining target accumulating its
    inputs (weighted per token by ``weights`` ``(m,)`` if given: every call must then see
    ``m`` tokens), then the first target reached is replaced by ``transform(name, linear,
    accumulator)`` through ``put(name, new)``. Stops when a run reaches no remaining target.
    Returns the accumulator each replaced target was calibrated on, in replacement order.
    """
    remaining, done = dict(targets), {}
    while remaining:
        seen: dict[str, HessianAccumulator] = {}

        def hook(name, seen=seen):
            def capture(module, args):
                x = args[0]
                rows = x.numel() // max(x.shape[-1], 1)
                if weights is not None and rows != weights.numel():
                    raise ValueError(f"{name or 'the module'} received {rows} tokens in one call, but "
                                     f"{weights.numel()} token weights were given: cannot weight them")
                accumulator = seen.setdefault(name, HessianAccumulator(module.in_features))
                accumulator.add(x, None if weights is None else weights.reshape(x.shape[:-1]))
            return capture

        handles = [m.register_forward_pre_hook(hook(name)) for name, m in remaining.items()]
        try:
            with torch.no_grad():
                run()
        finally:
            for handle in handles:
                handle.remove()
        if not seen:
            break
        first = next(iter(seen))  # dicts keep insertion order: the first target reached
        put(first, transform(first, remaining.pop(first), seen[first]))
        done[first] = seen[first]
    return done


def _relative(before: torch.Tensor, after: torch.Tensor) -> float:
    return float((after.float() - before.float()).norm() / before.float().norm().clamp_min(1e-30))


def _hessian_error(old: nn.Module, new: nn.Module, hessian: torch.Tensor) -> float:
    """Relative output error ``sqrt(tr(D H D^T) / tr(W H W^T))``, ``D = W - W_new``, of replacing
    ``old`` by ``new`` on the inputs summarised by ``hessian``."""
    w = old.weight.detach().double()
    d = w - new.weight.detach().double().to(w.device)
    h = hessian.double().to(w.device)
    return float(((d @ h * d).sum().clamp_min(0) / (w @ h * w).sum().clamp_min(1e-300)).sqrt())


def calibrate_mixture(layer: nn.Module, x: torch.Tensor,
                      transform: Callable[[str, nn.Linear, HessianAccumulator], nn.Module],
                      fallback: Callable[[str, nn.Linear], nn.Module], *, method: str, fallback_method: str,
                      experts_only: bool = False, weight_by_gate: bool = False, coverage: str = "fallback",
                      min_tokens: int | None = None, name: str = "") -> list[dict]:
    """Compress one mixture layer in place, every linear calibrated on what it receives for the
    layer inputs ``x`` ``(..., d)``; routers and gates (``ROUTERS`` / ``GATES``) are left alone.

    Order: the linears inside ``layer.expert_input`` (a shared trunk), on every token; then each
    expert on its routed tokens (:func:`routed_tokens`, as produced by the compressed trunk; the
    Hessian weighted by the gates if ``weight_by_gate``), its linears in the order the expert
    runs them (:func:`calibrate_sequentially`); then the remaining linears of the layer (an
    output projection, a shared expert) on the layer's forward with the experts compressed.
    ``experts_only`` leaves everything but the experts alone.

    An expert with fewer than ``min_tokens`` routed tokens (default: its input width, below
    which its Hessian cannot have full rank) follows ``coverage``: ``"all"`` calibrates it on
    every token (unweighted; llm-compressor's calibrate-all-experts does this for every
    expert: pass a large ``min_tokens``), ``"fallback"`` compresses it with ``fallback(name,
    linear)`` and warns (:class:`CoverageWarning`) naming it, ``"error"`` raises naming it.

    ``transform(name, linear, accumulator)`` and ``fallback(name, linear)`` return the
    replacement of a linear (names relative to the expert, ``""`` for an expert that is itself
    a linear, or to the layer for the other linears); ``method`` / ``fallback_method`` label
    them in the report. Returns one dict per expert, then per other linear: ``layer``
    (``name``), ``module`` (path inside the layer), ``expert`` (index or ``None``), ``tokens``
    (calibration tokens it saw), ``calibration`` (``"routed"``: an expert on its routed tokens, ``"all"``:
    on every token, as the other linears are, ``"none"``: not calibrated),
    ``method`` and ``relative_error``: for an expert, ``||y_new - y|| / ||y||`` of its outputs on
    its routed tokens (``None`` when it has none); for another linear, the same on its
    calibration inputs.
    """
    check_mixture(layer)
    last_dim("x", x, layer.input_size)
    if coverage not in COVERAGES:
        raise ValueError(f"coverage must be one of {COVERAGES}, got {coverage!r}")
    if min_tokens is not None:
        positive_int("min_tokens", min_tokens)
    where = f"layer {name!r}" if name else "the layer"
    was = layer.training
    layer.eval()
    try:
        with torch.no_grad():
            flat = x.reshape(-1, x.shape[-1])
            others = {} if experts_only else _linears(layer, layer.routing_modules + (layer.EXPERTS,))
            rows = []

            def put_in_layer(path: str, new: nn.Module) -> None:
                replace_module(layer, path, new)

            def other_rows(done: dict[str, HessianAccumulator], before: dict[str, nn.Module]) -> None:
                for path, accumulator in done.items():
                    rows.append({"layer": name, "module": path, "expert": None, "tokens": accumulator.count,
                                 "calibration": "all", "method": method,
                                 "relative_error": _hessian_error(before[path], layer.get_submodule(path),
                                                                  accumulator.hessian)})

            originals = dict(others)
            done = calibrate_sequentially(lambda: layer.expert_input(flat), others, transform, put_in_layer)
            other_rows(done, originals)
            for path in done:
                del others[path]
            every = layer.expert_input(flat)
            for tokens in routed_tokens(layer, x):
                row = _calibrate_expert(layer, tokens, every, transform, fallback, method=method,
                                        fallback_method=fallback_method, weight_by_gate=weight_by_gate,
                                        coverage=coverage, min_tokens=min_tokens, where=where)
                if row is not None:
                    rows.append({"layer": name, **row})
            done = calibrate_sequentially(lambda: layer(x), others, transform, put_in_layer)
            other_rows(done, originals)
            for path, linear in others.items():  # never reached by the forward: nothing to calibrate on
                if path not in done:
                    put_in_layer(path, fallback(path, linear))
                    rows.append({"layer": name, "module": path, "expert": None, "tokens": 0,
                                 "calibration": "none", "method": fallback_method, "relative_error": None})
    finally:
        layer.train(was)
    return rows


def _calibrate_expert(layer, tokens: ExpertTokens, every: torch.Tensor, transform, fallback, *, method,
                      fallback_method, weight_by_gate, coverage, min_tokens, where) -> dict | None:
    """Compress expert ``tokens.expert`` of ``layer`` (see :func:`calibrate_mixture`); its report row."""
    e, experts = tokens.expert, layer.expert_modules()
    linears = _linears(experts[e])
    if not linears:  # already compressed: nothing left to calibrate
        return None

    def put(path: str, new: nn.Module) -> None:
        if path:
            replace_module(experts[e], path, new)
        else:
            experts[e] = new

    needed = tokens.inputs.shape[-1] if min_tokens is None else min_tokens
    before = experts[e](tokens.inputs) if tokens.count else None
    if tokens.count >= needed:
        inputs, weights, how = tokens.inputs, tokens.gates if weight_by_gate else None, "routed"
    elif coverage == "all":
        inputs, weights, how = every, None, "all"
    elif coverage == "error":
        raise ValueError(f"expert {e} of {where} received {tokens.count} calibration tokens, fewer than "
                         f"min_tokens={needed}: give more calibration data, lower min_tokens, or use "
                         f"coverage='all' or 'fallback'")
    else:
        warnings.warn(f"expert {e} of {where} received {tokens.count} calibration tokens (fewer than "
                      f"min_tokens={needed}): {fallback_method} instead of {method}", CoverageWarning,
                      stacklevel=2)
        inputs, weights, how = None, None, "none"
    done = {} if inputs is None else calibrate_sequentially(lambda: experts[e](inputs), linears, transform,
                                                             put, weights)
    left = {path: m for path, m in linears.items() if path not in done}  # not reached, or no calibration
    for path, linear in left.items():
        put(path, fallback(path, linear))
    if len(left) == len(linears):
        how = "none"
    error = None if before is None else _relative(before, experts[e](tokens.inputs))
    return {"module": f"{layer.EXPERTS}.{e}", "expert": e, "tokens": tokens.count, "calibration": how,
            "method": fallback_method if how == "none" else method, "relative_error": error}


def calibrate_layers(model: nn.Module, calibration: torch.Tensor,
                     compress_layer: Callable[[str, nn.Module, torch.Tensor], list]) -> list:
    """Run ``compress_layer(name, layer, x)`` on every mixture layer of ``model`` in order (it
    compresses ``layer`` in place and returns report rows), ``x`` being what the layer receives
    when ``model`` runs on ``calibration`` with the layers before it already compressed (the
    model itself, if it is a mixture layer, gets ``calibration``). Returns all the rows."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("model has no mixture-of-experts layer to calibrate")
    rows = []
    for name, layer in layers:
        x = calibration if not name else layer_inputs(model, layer, calibration)
        rows.extend(compress_layer(name, layer, x))
    return rows


class _Silenced(nn.Module):
    """Stands in for an expert: same output shape and dtype, all zeros."""

    def __init__(self, expert: nn.Module):
        super().__init__()
        self.expert = expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(self.expert(x))


@torch.no_grad()
def expert_contributions(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(n, E)`` float64: for every token of ``x`` ``(..., d)`` and expert ``e``, the norm of what
    ``e`` adds to the layer's output, ``||layer(x) - layer_without_e(x)||_2`` (eval mode), where
    ``layer_without_e`` has expert ``e`` output zeros and the same routing.

    It is ``gate_e(x) * ||expert_e(x)||`` for a layer that adds gated expert outputs (SwiGLU
    experts), and ``gate_e(x) * ||W_out act(expert_e(x))||`` for one with a shared output
    projection (:class:`~moe_lab.TopKMoE`, :class:`~moe_lab.DenseMoE`): the expert's output
    measured where the model sees it. Zero for tokens not routed to ``e``. Costs ``E + 1``
    forwards of the layer (every supported activation maps 0 to 0).
    """
    check_mixture(layer)
    last_dim("x", x, layer.input_size)
    was = layer.training
    layer.eval()
    experts = layer.expert_modules()
    try:
        full = layer(x)
        norms = []
        for e in range(layer.num_experts):
            original = experts[e]
            experts[e] = _Silenced(original)
            try:
                without = layer(x)
            finally:
                experts[e] = original
            difference = (full.double() - without.double()).reshape(-1, full.shape[-1])
            norms.append(difference.norm(dim=1))
    finally:
        layer.train(was)
    return torch.stack(norms, dim=1)
