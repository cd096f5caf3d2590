"""Judging compressed models: one table with quality (and its uncertainty), size, work and speed.

:func:`report` measures every model on the same data and returns a pandas DataFrame. Size is
the saved artifact (:func:`moe_lab.model_bytes`), never ``numel``: the deck's
``sum(p.numel() for p in model.parameters())`` does not move when weights are zeroed or
stored as int8.

One model, one metric: ``moe_lab.evaluate(model, data)`` (:func:`moe_lab.training.evaluate`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab.diagnostics import expert_share, utilisation_entropy
from moe_lab.fidelity import RoutingRecorder, comparable, compare_routing
from moe_lab.layers.base import ExpertLoad, mixture_layers
from moe_lab.measure import active_params_per_token, flops_per_token, latency, model_bytes, param_count
from moe_lab.stats import mean_interval, wilson_interval
from moe_lab.training import TASKS, as_loader, upcast_logits


def _quality(model: nn.Module, data, task: str, batch_size: int, confidence: float
             ) -> tuple[dict, dict, dict]:
    """Task metric with its interval, expert load per MoE layer (routed token counts, or a dense
    layer's summed gate weights) and the routing of every MoE layer (:mod:`moe_lab.fidelity`)."""
    layers = mixture_layers(model)
    recorder = RoutingRecorder(model)
    loads: dict[str, ExpertLoad] = {}
    losses, correct = [], 0
    model.eval()
    with torch.no_grad():
        for inputs, targets in as_loader(data, batch_size, shuffle=False):
            logits = upcast_logits(model(inputs))
            for name, layer in layers:  # every mixture layer keeps the routing of its last forward
                load = ExpertLoad.from_routing(layer.last_routing, layer.num_experts, layer.DENSE)
                loads[name] = loads[name] + load if name in loads else load
            if layers:
                recorder.add()
            if task == "classification":
                correct += int((logits.argmax(-1) == targets).sum())
                losses.append(F.cross_entropy(logits, targets, reduction="none"))
            else:  # one mean loss per sequence: tokens inside a sequence are not independent
                token_losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                               reduction="none")
                losses.append(token_losses.view(targets.shape).mean(dim=1))
    losses = torch.cat(losses)
    counts = {name: load.share for name, load in loads.items()}
    if task == "classification":
        n = losses.numel()
        low, high = wilson_interval(correct, n, confidence)
        row = {"metric": "accuracy", "value": correct / n, "ci_low": low, "ci_high": high, "n": n}
    else:
        mean, low, high = mean_interval(losses, confidence)
        row = {"metric": "perplexity", "value": math.exp(mean), "ci_low": math.exp(low),
               "ci_high": math.exp(high), "n": losses.numel()}
    return row, counts, recorder.result()


def report(models: dict[str, nn.Module], data, *, task: str = "classification", example=None,
           batch_size: int = 256, confidence: float = 0.95, latency_repeats: int = 10,
           reference: str | None = None):
    """A table (pandas DataFrame, one row per model) for comparing compressed models.

    Columns: ``metric`` (accuracy or perplexity), ``value`` with ``ci_low``/``ci_high``
    (Wilson interval for accuracy; for perplexity an interval on the mean per-sequence loss,
    exponentiated), ``n``, router fidelity against the ``reference`` model (default: the first;
    :mod:`moe_lab.fidelity`) on ``data``: ``router_agreement`` (share of each token's experts kept),
    ``router_kl`` (KL between the routing distributions) and ``router_changed`` (share of tokens
    whose expert set changed), NaN for a model whose mixture layers cannot be matched with the
    reference's (other layer names, no MoE layer), ``bytes`` (saved artifact), ``ratio`` (the first
    model's bytes divided by this one's), ``params`` (float parameters left), ``active_params`` per
    token, ``flops_per_token`` (measured on ``example``), ``latency_ms`` (median, one
    forward of ``example``), ``expert_share`` (per MoE layer, the share of routed tokens
    each expert got on ``data``) and ``utilisation`` (normalised entropy of those shares,
    averaged over layers; 1.0 = even use).

    ``data`` is a DataLoader or ``(inputs, targets)``; ``example`` defaults to the first
    batch of at most 64 inputs.
    """
    import pandas as pd

    if not isinstance(models, dict) or not models:
        raise TypeError("models must be a non-empty dict {name: model}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if reference is None:
        reference = next(iter(models))
    if reference not in models:
        raise ValueError(f"reference must name one of the models {list(models)}, got {reference!r}")
    if example is None:
        first = next(iter(as_loader(data, 64, shuffle=False)), None)
        if first is None:
            raise ValueError("data is empty: nothing to report on")
        example = first[0]
    rows, first_bytes, routings = [], None, {}
    for name, model in models.items():
        quality, counts, routings[name] = _quality(model, data, task, batch_size, confidence)
        size = model_bytes(model)
        first_bytes = first_bytes or size
        shares = {layer or "moe": [round(float(s), 4) for s in expert_share(c)]
                  for layer, c in counts.items()}
        entropies = [utilisation_entropy(c) for c in counts.values()]
        rows.append({"model": name, **quality, "bytes": size, "ratio": first_bytes / size,
                     "params": param_count(model), "active_params": active_params_per_token(model),
                     "flops_per_token": flops_per_token(model, example),
                     "latency_ms": 1e3 * latency(model, example, warmup=2, repeats=latency_repeats),
                     "expert_share": shares,
                     "utilisation": sum(entropies) / len(entropies) if entropies else float("nan")})
    table = pd.DataFrame(rows).set_index("model")
    fidelity = {name: compare_routing(routings[reference], routing)
                if comparable(routings[reference], routing) else {} for name, routing in routings.items()}
    for i, key in enumerate(("agreement", "kl", "changed")):
        table.insert(table.columns.get_loc("n") + 1 + i, f"router_{key}",
                     [fidelity[name].get(key, float("nan")) for name in table.index])
    return table


def pareto_front(sizes, scores, higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point beats on both size (smaller) and score, sorted by size."""
    sizes, scores = list(sizes), list(scores)
    if len(sizes) != len(scores):
        raise ValueError(f"sizes and scores differ in length ({len(sizes)} vs {len(scores)})")
    sign = 1 if higher_is_better else -1
    front = []
    for i in range(len(sizes)):
        dominated = any(sizes[j] <= sizes[i] and sign * scores[j] >= sign * scores[i]
                        and (sizes[j] < sizes[i] or sign * scores[j] > sign * scores[i])
                        for j in range(len(sizes)))
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: sizes[i])
