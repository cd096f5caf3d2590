"""Checker for notebook 10 (hybrid compression): the bytes of one low-rank, quantized expert."""

from __future__ import annotations

import torch
import torch.nn as nn

from moe_lab.compress.lowrank import low_rank_from_linear
from moe_lab.exercises._feedback import NO_ANSWER, call, ready
from moe_lab.layers.compact import QuantizedLinear

HINT = ("Hint: a low-rank expert is two matrices, down (rank, in) without bias and up (out, rank) with an "
        "(out,) bfloat16 bias (2 bytes each). Quantized per output channel, each matrix stores its integer "
        "values (1 byte each for int8; 2 values per byte for int4, a row of width w takes ceil(w / 2) bytes) "
        "plus one bfloat16 scale (2 bytes) per output row. Add the two matrices and the bias.")

CASES = [(32, 128, 4, 8), (128, 64, 16, 8), (32, 128, 5, 4), (33, 20, 7, 4), (64, 64, 1, 8)]


def expert_payload_bytes(in_features: int, out_features: int, rank: int, bits: int) -> int:
    """Bytes of the tensors that store one expert ``nn.Linear(in_features, out_features)`` after
    a rank-``rank`` truncated SVD and per-channel ``bits``-bit quantization of both factors,
    measured by building it (file-format overhead not included)."""
    with torch.random.fork_rng(devices=[]):  # building a layer must not move the learner's seed
        low = low_rank_from_linear(nn.Linear(in_features, out_features), rank)
    total = 0
    for factor in (low.U, low.V):
        quantized = QuantizedLinear.from_linear(factor, bits)
        total += sum(b.numel() * b.element_size() for b in quantized.buffers())
    return total


def check_expert_bytes(fn) -> bool:
    """Check ``fn(in_features, out_features, rank, bits) -> int``: the stored bytes of one expert
    after low-rank (``rank``) and per-channel int8/int4 quantization (``bits``), compared with
    the buffers of the module moe_lab builds for a few shapes (odd widths and int4 included).

    Prints a hint for ``None`` (or a function returning ``None``) and feedback for a wrong
    answer; returns ``True`` only if every case matches exactly. Never raises on a wrong answer.
    """
    if not ready(fn, HINT, "fn(in_features, out_features, rank, bits)"):
        return False
    for in_f, out_f, rank, bits in CASES:
        got = call(fn, in_f, out_f, rank, bits, hint=HINT)
        if got is NO_ANSWER:
            return False
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            print(f"Return a number of bytes (an int), got {type(got).__name__}.")
            return False
        want = expert_payload_bytes(in_f, out_f, rank, bits)
        if got != want:
            dense = in_f * out_f * 4 + out_f * 4
            print(f"For in={in_f}, out={out_f}, rank={rank}, int{bits}: expected {want:,} bytes, got {got:,} "
                  f"(the dense float32 expert is {dense:,}). Check the bfloat16 scales (one per output row "
                  "of each factor), the bfloat16 bias (only on up), and for int4 that each row is packed "
                  "into ceil(width / 2) bytes.")
            return False
    print("Correct: your byte count matches the stored tensors in every case.")
    return True
