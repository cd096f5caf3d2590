"""Int8 for CPU speed (activations and weights in int8), next to :mod:`moe_lab.compress.quantize`.

:class:`~moe_lab.compress.quantize.QuantizedLinear` is about *bytes*: it stores int8/int4
weights and dequantizes them on every call, so it is no faster than float. These wrappers are
about *time*: they run the matmuls in int8 on the CPU.

* :func:`int8_dynamic_torchao`: ``torchao.quantization.quantize_`` with
  ``Int8DynamicActivationInt8WeightConfig`` (the supported route). Its weights are torchao
  tensor subclasses, which :func:`moe_lab.save` (safetensors) cannot store.
* :func:`int8_dynamic_deprecated`: ``torch.ao.quantization.quantize_dynamic``, the route
  PyTorch deprecated in favour of torchao; returns the warnings it emits so they can be read.
* :func:`ops_on_quantized_tensors`: which operations of an MoE forward accept a
  ``torch.quint8`` tensor, i.e. why eager *static* quantization breaks on an MoE.

All of them keep the router in float by default (``skip_router=True``).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from moe_lab.compress.targets import expert_linears, replace_module


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(next(iter(model.parameters()), None), torch.Tensor):
        raise ValueError("model has no parameters to quantize")


def _target_names(model: nn.Module, skip_router) -> set[str]:
    if not isinstance(skip_router, bool):
        raise TypeError(f"skip_router must be a bool, got {type(skip_router).__name__}")
    names = {name for name, _ in expert_linears(model, include_router=not skip_router)}
    if not names:
        raise ValueError("model has no nn.Linear to quantize (already quantized?)")
    return names


def int8_dynamic_torchao(model: nn.Module, skip_router: bool = True) -> nn.Module:
    """Quantize the experts' (and output projections') ``nn.Linear`` layers of ``model`` in
    place with torchao's int8 dynamic-activation, int8-weight config; return ``model``.

    Each forward quantizes the activations ``(n, in)`` per token on the fly and runs an int8
    matmul with the per-channel int8 weight ``(out, in)``. The router stays float when
    ``skip_router`` (its logits decide where each token goes, and it is tiny). Each quantized
    linear is wrapped in :class:`SkipEmptyBatch` (an expert may receive no token).
    """
    _check_model(model)
    names = _target_names(model, skip_router)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as error:  # torchao is the course's optional extra
        raise ImportError("int8_dynamic_torchao needs torchao: pip install 'moe_lab[course]' "
                          "or pip install torchao") from error
    quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda module, fqn: fqn in names)
    for name in names:  # an expert may receive no token in a batch
        replace_module(model, name, SkipEmptyBatch(model.get_submodule(name)))
    return model


class SkipEmptyBatch(nn.Module):
    """Wraps a torchao-quantized linear so that an empty batch ``(0, in)`` gives ``(0, out)``.

    A top-k MoE calls every expert on the tokens routed to it, and a rarely used expert often
    gets none. torchao's dynamic activation quantization fails on an empty tensor (the
    zero point of nothing), so the wrapper skips the call.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x.new_zeros(*x.shape[:-1], self.linear.out_features)
        return self.linear(x)


def int8_dynamic_deprecated(model: nn.Module, skip_router: bool = True
                            ) -> tuple[nn.Module, list[warnings.WarningMessage]]:
    """The old route: ``torch.ao.quantization.quantize_dynamic`` (int8 weights per tensor,
    activations quantized per call). Returns ``(quantized copy, warnings emitted)``; ``model``
    itself is left unchanged.

    The warnings are recorded, not hidden: ``torch.ao.quantization`` is deprecated (PyTorch
    points to torchao), and quantized-tensor creation functions warn as well.
    """
    _check_model(model)
    names = _target_names(model, skip_router)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), names, dtype=torch.qint8)
    return quantized, list(caught)


def ops_on_quantized_tensors() -> dict[str, str]:
    """Try each operation a top-k MoE forward applies to its router logits and expert
    outputs, on a ``torch.quint8`` tensor ``(6, 8)``: ``{op: "ok" or the error's first line}``.

    This is what a statically quantized MoE would have to run between its quantized linears.
    """
    logits = torch.linspace(-2, 2, 48).reshape(6, 8)  # (n=6 tokens, E=8 experts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_per_tensor is deprecated too; the point is below
        q = torch.quantize_per_tensor(logits, 0.05, 128, torch.quint8)
    ops = {
        "topk (choose experts)": lambda t: t.topk(2, dim=-1),
        "softmax (gates)": lambda t: t.softmax(dim=-1),
        "index_select (gather tokens)": lambda t: t.index_select(0, torch.tensor([0, 2])),
        "cat (join expert outputs)": lambda t: torch.cat([t, t]),
        "mul (scale by gate)": lambda t: t * t,
        "index_add_ (scatter back)": lambda t: t.new_zeros(6, 8).index_add_(0, torch.arange(6), t),
    }
    results = {}
    for name, op in ops.items():
        try:
            op(q)
            results[name] = "ok"
        except (RuntimeError, NotImplementedError) as error:  # the point: which ops refuse quint8
            results[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:90]}"
    return results
