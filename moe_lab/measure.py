"""Honest measurements: bytes of the saved artifact, parameters, active work per token, latency.

``sum(p.numel() for p in model.parameters())`` (the deck's size measure) counts a zeroed
weight and an int8 weight the same as a float32 one. :func:`model_bytes` instead saves the
model and returns the size of the files on disk.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from moe_lab import artifact
from moe_lab._checks import positive_int
from moe_lab.layers.base import MixtureLayer, mixture_layers
from moe_lab.layers.compact.base import CompactLinear


def model_bytes(model: nn.Module) -> int:
    """Size in bytes of ``model`` saved with :func:`moe_lab.save` (weights + config).

    Tensors that share storage (tied embeddings) are stored, and counted, once. A pruned
    weight full of zeros costs as many bytes as before unless a sparse format stores it.
    """
    with tempfile.TemporaryDirectory() as folder:
        saved = artifact.save(model, folder)
        return sum(f.stat().st_size for f in Path(saved).iterdir() if f.is_file())


def _unique_parameters(model: nn.Module):
    seen = set()
    for p in model.parameters():  # parameters() already skips tied duplicates
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def param_count(model: nn.Module, nonzero: bool = False) -> int:
    """Number of parameters (shared ones once); with ``nonzero=True`` only non-zero entries.

    Only ``nn.Parameter`` tensors count: the integer and sparse weights of ``QuantizedLinear``
    and ``SparseLinear`` are buffers, so a count is no size measure: use :func:`model_bytes`.
    """
    if nonzero:
        return sum(int(torch.count_nonzero(p)) for p in _unique_parameters(model))
    return sum(p.numel() for p in _unique_parameters(model))


def _stores_weight_as_buffers(module: nn.Module) -> bool:
    return isinstance(module, CompactLinear) and module.WEIGHT_IN_BUFFERS


def _logical_size(module: nn.Module) -> int:
    """Weights a module holds, counting quantized / sparse layers at their logical size."""
    total = 0
    for m in module.modules():
        if _stores_weight_as_buffers(m):
            total += m.logical_params()
        else:
            total += sum(p.numel() for p in m.parameters(recurse=False))
    return total


def active_params_per_token(model: nn.Module) -> int:
    """Parameters that one token (or one image) touches in a forward pass.

    A top-k layer (:class:`~moe_lab.TopKMoE`, :class:`~moe_lab.SwiGLUMoE`) counts its router,
    ``k`` of its experts (the largest, if sizes differ) and everything else it holds; dense
    mixtures count every expert; an ``nn.Embedding`` counts one row; every other parameter
    counts fully. A tied parameter counts once, at its largest use (a tied output projection
    reads the whole matrix). Quantized and sparse layers count their logical weight
    (``in * out`` + bias): they touch the same weights per token, stored more compactly.
    """
    used: dict[int, int] = {}

    def use(p: torch.Tensor, n: int) -> None:
        used[id(p)] = max(used.get(id(p), 0), n)

    def visit(module: nn.Module) -> None:
        if isinstance(module, MixtureLayer) and not module.DENSE:
            for name, child in module.named_children():
                if name != module.EXPERTS:
                    visit(child)
            for expert in sorted(module.expert_modules(), key=_logical_size, reverse=True)[:module.k]:
                visit(expert)
            return
        if isinstance(module, nn.Embedding):
            use(module.weight, module.embedding_dim)
            return
        if _stores_weight_as_buffers(module):
            used[id(module)] = _logical_size(module)
            return
        for p in module.parameters(recurse=False):
            use(p, p.numel())
        for child in module.children():
            visit(child)

    visit(model)
    return sum(used.values())


def _tokens_in(example: torch.Tensor) -> int:
    if not example.is_floating_point():
        return example.numel()  # token ids (batch, time)
    if example.dim() == 4:
        return example.shape[0]  # images (batch, C, H, W)
    return example[..., 0].numel()  # features (..., d)


def flops_per_token(model: nn.Module, example: torch.Tensor, tokens: int | None = None) -> float:
    """Measured forward FLOPs per token: runs ``model(example)`` under PyTorch's FLOP counter.

    Only the matmuls and convolutions that actually execute are counted, so a
    :class:`~moe_lab.TopKMoE` pays for its ``k`` routed experts and a dense mixture for all.
    Tokens are the ids in an integer ``example``, the images in a 4-D one, and the rows
    (all leading dimensions) of a feature tensor; pass ``tokens`` to override.
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example)
    count = _tokens_in(example) if tokens is None else positive_int("tokens", tokens)
    return counter.get_total_flops() / count


def latency(fn, *inputs, warmup: int = 3, repeats: int = 20) -> float:
    """Median wall-clock seconds of ``fn(*inputs)`` under ``torch.no_grad()``, after warm-up.

    One number from a noisy machine means little on its own: compare two functions timed
    in the same run (a ratio), as ``bench/`` does.
    """
    positive_int("repeats", repeats)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            fn(*inputs)
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def moe_bytes(model: nn.Module) -> int:
    """Saved bytes of the model's mixture-of-experts layers alone (each saved on its own)."""
    layers = mixture_layers(model)
    if not layers:
        raise ValueError("model has no mixture-of-experts layer")
    return sum(model_bytes(layer) for _, layer in layers)
