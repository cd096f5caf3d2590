"""Router fidelity: does a compressed model still send each token where the original did?

Compressing the experts (or, worse, the router) changes the hidden states that reach the next
router, so tokens can land on other experts even when the task metric barely moves. Three
numbers per mixture layer, on the same inputs, against a reference model (the uncompressed one):

* ``agreement``: mean over tokens of ``|S_ref & S| / k``, the share of a token's reference experts
  it still uses (``S``: the ``k`` experts a token is routed to; a dense layer's first choice);
* ``kl``: mean over tokens of ``KL(p_ref || p)`` between the routers' softmax distributions;
* ``changed``: share of tokens whose expert set is not exactly the reference's.

:func:`router_fidelity` averages them over layers and lists them per layer. Layers are matched by
name. When a layer lost experts (expert pruning, merging), its experts are matched to the
reference's by their router rows (nearest row, each reference expert used once: exact after
pruning, which copies the rows; approximate after merging), a token whose reference set held a
removed expert counts as changed, and ``kl`` compares the reference distribution restricted to the
kept experts (renormalised) with the new one: pruning alone, which renormalises the router over
the kept experts, leaves it at 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from moe_lab._checks import positive_int
from moe_lab.layers.base import mixture_layers
from moe_lab.training import as_loader


@dataclass
class LayerRouting:
    """The routing of one mixture layer over ``n`` tokens.

    Attributes:
        probs: ``(n, E)`` float32 router softmax.
        chosen: ``(n, k)`` experts each token is routed to (a dense layer: its first choice, ``k = 1``).
        router_rows: ``(E, d + 1)`` float64 router weights (and bias), to match experts after
            pruning; ``None`` if the router is not a linear with one row per expert.
    """

    probs: torch.Tensor
    chosen: torch.Tensor
    router_rows: torch.Tensor | None


def _router_rows(layer: nn.Module) -> torch.Tensor | None:
    router = layer.router
    weight = getattr(router, "weight", None)
    if not isinstance(router, nn.Module) or not isinstance(weight, torch.Tensor) or weight.dim() != 2 \
            or weight.shape[0] != layer.num_experts:
        return None
    bias = getattr(router, "bias", None)
    rows = weight.detach().double()
    return torch.cat([rows, bias.detach().double()[:, None]], 1) if isinstance(bias, torch.Tensor) else rows


class RoutingRecorder:
    """Collects the routing of every mixture layer of ``model`` after each forward (from
    ``layer.last_routing``): call :meth:`add` after every batch, then :meth:`result`."""

    def __init__(self, model: nn.Module):
        self.layers = mixture_layers(model)
        self._probs = {name: [] for name, _ in self.layers}
        self._chosen = {name: [] for name, _ in self.layers}

    def add(self) -> None:
        for name, layer in self.layers:
            routing = layer.last_routing
            if routing is None:
                raise ValueError(f"mixture layer {name or '(the model)'} has not run a forward yet")
            self._probs[name].append(routing.probs.detach().float())
            self._chosen[name].append(routing.indices[:, :1] if layer.DENSE else routing.indices)

    def result(self) -> dict[str, LayerRouting]:
        """``{layer name: LayerRouting}`` over every batch added so far."""
        return {name: LayerRouting(torch.cat(self._probs[name]), torch.cat(self._chosen[name]),
                                   _router_rows(layer)) for name, layer in self.layers if self._probs[name]}


def _batches(inputs, batch_size: int):
    if isinstance(inputs, torch.Tensor):
        yield from inputs.split(batch_size)
    else:
        for batch in as_loader(inputs, batch_size, shuffle=False):
            yield batch[0]


@torch.no_grad()
def routing_of(model: nn.Module, inputs, batch_size: int = 256) -> dict[str, LayerRouting]:
    """The routing of every mixture layer of ``model`` (eval mode) on ``inputs``: a tensor of model
    inputs (split into batches of ``batch_size`` along the first dimension), ``(inputs, targets)``
    or a DataLoader yielding ``(inputs, ...)`` batches."""
    positive_int("batch_size", batch_size)
    if not mixture_layers(model):
        raise ValueError("model has no mixture-of-experts layer: it has no routing to compare")
    recorder = RoutingRecorder(model)
    was = model.training
    model.eval()
    try:
        for batch in _batches(inputs, batch_size):
            model(batch)
            recorder.add()
    finally:
        model.train(was)
    return recorder.result()


def _match(reference: LayerRouting, routing: LayerRouting, name: str) -> torch.Tensor:
    """Reference index of each of ``routing``'s experts (identity when the counts agree)."""
    experts, reference_experts = routing.probs.shape[1], reference.probs.shape[1]
    if experts == reference_experts:
        return torch.arange(experts)
    if experts > reference_experts or reference.router_rows is None or routing.router_rows is None \
            or reference.router_rows.shape[1] != routing.router_rows.shape[1]:
        raise ValueError(f"layer {name or '(the model)'}: {experts} experts against the reference's "
                         f"{reference_experts}, and no router rows to match them by")
    distance = torch.cdist(routing.router_rows.cpu(), reference.router_rows.cpu())  # (E, E_ref)
    match = torch.full((experts,), -1, dtype=torch.long)
    used = torch.zeros(reference_experts, dtype=torch.bool)
    for flat in distance.flatten().argsort(stable=True).tolist():  # greedy: closest pairs first
        e, r = divmod(flat, reference_experts)
        if match[e] < 0 and not used[r]:
            match[e], used[r] = r, True
    return match


def comparable(reference: dict[str, LayerRouting], routing: dict[str, LayerRouting]) -> bool:
    """Whether :func:`compare_routing` can compare the two (same layers, same tokens, and experts
    that can be matched)."""
    if not reference or set(reference) != set(routing):
        return False
    for name, ref in reference.items():
        new = routing[name]
        if ref.probs.shape[0] != new.probs.shape[0]:
            return False
        if new.probs.shape[1] != ref.probs.shape[1] and (
                new.probs.shape[1] > ref.probs.shape[1] or ref.router_rows is None or new.router_rows is None
                or ref.router_rows.shape[1] != new.router_rows.shape[1]):
            return False
    return True


def compare_routing(reference: dict[str, LayerRouting], routing: dict[str, LayerRouting]) -> dict:
    """Router fidelity of ``routing`` against ``reference`` (both from :func:`routing_of` on the
    same inputs): ``{"agreement", "kl", "changed"}`` averaged over layers, plus ``"layers"``:
    the same three per layer name (see the module docstring)."""
    if not reference or set(reference) != set(routing):
        raise ValueError(f"the models' mixture layers differ: {sorted(reference)} vs {sorted(routing)}")
    layers, tiny = {}, torch.finfo(torch.float64).tiny
    for name, ref in reference.items():
        new = routing[name]
        if ref.probs.shape[0] != new.probs.shape[0]:
            raise ValueError(f"layer {name or '(the model)'}: routings of {ref.probs.shape[0]} and "
                             f"{new.probs.shape[0]} tokens: run both models on the same inputs")
        match = _match(ref, new, name).to(ref.chosen.device)
        kept = ref.probs.double()[:, match]
        kept = kept / kept.sum(dim=1, keepdim=True).clamp_min(tiny)
        probs = new.probs.double().to(kept.device)
        probs = probs / probs.sum(dim=1, keepdim=True).clamp_min(tiny)
        kl = (kept * (kept.clamp_min(tiny).log() - probs.clamp_min(tiny).log())).sum(dim=1).clamp_min(0)
        chosen = match[new.chosen.to(match.device)]  # reference indices
        shared = (ref.chosen[:, :, None] == chosen[:, None, :]).any(dim=2).sum(dim=1)
        k = ref.chosen.shape[1]
        same = (shared == k) & (chosen.shape[1] == k)
        layers[name] = {"agreement": float((shared.double() / k).mean()), "kl": float(kl.mean()),
                        "changed": float(1 - same.double().mean())}
    summary = {key: sum(layer[key] for layer in layers.values()) / len(layers)
               for key in ("agreement", "kl", "changed")}
    return {**summary, "layers": layers}


def router_fidelity(reference_model: nn.Module, model: nn.Module, inputs, batch_size: int = 256) -> dict:
    """Router fidelity of ``model`` against ``reference_model`` on ``inputs`` (see
    :func:`routing_of` for what ``inputs`` may be and :func:`compare_routing` for the result)."""
    reference = routing_of(reference_model, inputs, batch_size)
    return compare_routing(reference, routing_of(model, inputs, batch_size))
