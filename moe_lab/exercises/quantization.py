"""Checker for notebook 04 (quantization): symmetric per-channel int8 quantization of a weight."""

from __future__ import annotations

import torch

from moe_lab.exercises._feedback import ready
from moe_lab.layers.compact.quantized import dequantize_tensor, quantize_tensor

HINT = ("Hint: for a weight (out, in), each output row r gets its own scale s_r = max_j |W[r, j]| / 127 "
        "(W.abs().amax(dim=1, keepdim=True) / 127). values = round(W / s) clamped to [-127, 127], as "
        "torch.int8; guard rows that are all zero (scale 0). Return (values, scales). "
        "moe_lab.compress.quantize_tensor(W, bits=8) is the reference.")


def _cases() -> list[tuple[str, torch.Tensor]]:
    """``(name, weight (out, in))`` from a fixed seed, without moving the learner's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        rows_differ = torch.randn(16, 32) * torch.logspace(-2, 1, 16).unsqueeze(1)
        zero_row = torch.randn(8, 24)
        zero_row[5] = 0.0
        outlier = torch.randn(12, 64) * 0.02
        outlier[3, 7] = 4.0
        return [("random 32 x 64", torch.randn(32, 64)), ("rows of very different size", rows_differ),
                ("a row of zeros", zero_row), ("one outlier weight", outlier)]


def _check_case(fn, name: str, weight: torch.Tensor) -> bool:
    _, stored_scales = quantize_tensor(weight, bits=8)  # (out, 1) bfloat16, rounded up
    exact_scales = weight.abs().amax(dim=1, keepdim=True) / 127
    try:
        answer = fn(weight.clone())
    except Exception as error:  # a learner's bug should print, not stop the notebook
        print(f"{name}: your function raised {type(error).__name__}: {error}")
        return False
    if not (isinstance(answer, (tuple, list)) and len(answer) == 2
            and all(isinstance(t, torch.Tensor) for t in answer)):
        print(f"{name}: return a pair of tensors (values, scales), got {type(answer).__name__}.")
        return False
    values, scales = answer
    if values.dtype != torch.int8 or values.shape != weight.shape:
        print(f"{name}: values must be torch.int8 with the weight's shape {tuple(weight.shape)}, "
              f"got {values.dtype} {tuple(values.shape)}.")
        return False
    if scales.numel() != weight.shape[0]:
        print(f"{name}: expected one scale per output row ({weight.shape[0]}), got shape "
              f"{tuple(scales.shape)}. Per-channel means per row of W (out, in): reduce over dim=1.")
        return False
    scales = scales.detach().float().reshape(-1, 1)
    if not torch.isfinite(scales).all() or int(values.abs().max()) > 127:
        print(f"{name}: scales must be finite and values within [-127, 127] (symmetric int8).")
        return False
    if not (torch.allclose(scales, exact_scales, rtol=2e-3, atol=1e-8)
            or torch.equal(scales, stored_scales.float())):  # the library's own, rounded up to bfloat16
        print(f"{name}: scales differ from max|row| / 127 (largest gap "
              f"{float((scales - exact_scales).abs().max()):.2e}). Divide by 127, not 128 or 255.")
        return False
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    expected = torch.round(weight / safe).clamp(-127, 127)  # round-to-nearest with the learner's own scales
    off = (values.float() - expected).abs()
    if int(off.max()) > 1 or float((off > 0).float().mean()) > 0.005:
        print(f"{name}: {float((off > 0).float().mean()):.1%} of the values differ from round(W / s). "
              "Round to nearest (torch.round) before casting: .to(torch.int8) alone truncates.")
        return False
    error = (dequantize_tensor(values, scales) - weight).abs()
    if not (error <= scales / 2 * 1.01 + 1e-8).all():
        print(f"{name}: values * scales is further than half a step from W somewhere.")
        return False
    return True


def check_int8_per_channel(fn) -> bool:
    """Check ``fn(weight (out, in)) -> (values int8 (out, in), scales (out,) or (out, 1))``
    against :func:`moe_lab.compress.quantize_tensor` with ``bits=8`` per channel.

    Scales may be float16 or float32 (they must agree with ``max|row| / 127`` to 0.2%) or the
    library's own (rounded up to bfloat16); the values must be ``round(W / s)`` for the learner's
    own scales ``s`` (a float32 scale rounds a few borderline weights differently from the
    library's bfloat16 one, which is fine).
    Prints which case fails; returns ``True`` only if every case passes.
    """
    if not ready(fn, HINT, "fn(weight) -> (values, scales)"):
        return False
    for name, weight in _cases():
        if not _check_case(fn, name, weight):
            return False
    print("Correct: your int8 values and per-row scales match moe_lab.compress.quantize_tensor(W, bits=8) "
          "on every case, zero rows and outliers included.")
    return True
