"""Finding what to compress: the mixture layers of a model, their weight matrices, their inputs."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from moe_lab.layers.base import MixtureLayer, mixture_layers

moe_layers = mixture_layers  # ``(name, layer)`` for every mixture layer in a model


def check_mixture(layer) -> MixtureLayer:
    """``layer`` if it is a mixture layer, else a ``TypeError`` naming what it is."""
    if not isinstance(layer, MixtureLayer):
        raise TypeError(f"layer must be a mixture layer (moe_lab.MixtureLayer), got {type(layer).__name__}")
    return layer


def expert_linears(model: nn.Module, include_router: bool = False) -> Iterator[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` inside the model's MoE layers (experts, low-rank factors, output
    projections), the routers only if ``include_router``. A model without MoE layers yields
    all its ``nn.Linear`` modules."""
    layers = moe_layers(model)
    if not layers:
        yield from ((n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear))
        return
    for prefix, layer in layers:
        for name, module in layer.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if not include_router and name.split(".")[0] in layer.routing_modules:
                continue
            yield (f"{prefix}.{name}" if prefix else name), module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` inside ``model``."""
    if not name:
        raise ValueError(f"cannot replace the model itself ({type(model).__name__}) in place: apply this "
                         f"to a model or layer that contains it, or convert it directly "
                         f"(e.g. QuantizedLinear.from_linear)")
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@torch.no_grad()
def layer_inputs(model: nn.Module, layer: nn.Module, inputs: torch.Tensor, batch_size: int = 256
                 ) -> torch.Tensor:
    """Run ``model`` on ``inputs`` and return what ``layer`` received, flattened to ``(n, d)``."""
    captured = []
    hook = layer.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(inputs), batch_size):
            model(inputs[start:start + batch_size])
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])
