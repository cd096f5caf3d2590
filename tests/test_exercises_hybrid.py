import math

import torch

from moe_lab.compress.lowrank import low_rank_from_linear
from moe_lab.compress.quantize import quantize_experts
from moe_lab.exercises.hybrid import check_expert_bytes, expert_payload_bytes
from moe_lab.layers.dense import DenseMoE


def right(in_f, out_f, rank, bits):
    def matrix(rows, cols):  # integer values + one bfloat16 scale per row
        return rows * (cols if bits == 8 else math.ceil(cols / 2)) + rows * 2
    return matrix(rank, in_f) + matrix(out_f, rank) + out_f * 2


def test_accepts_right_answer(capsys):
    assert check_expert_bytes(right)
    assert check_expert_bytes(lambda *a: torch.tensor(right(*a)))
    assert "Correct" in capsys.readouterr().out


def test_hint_on_none(capsys):
    assert check_expert_bytes(None) is False
    assert "Hint" in capsys.readouterr().out
    assert check_expert_bytes(lambda *a: None) is False
    assert "returned None" in capsys.readouterr().out


def test_rejects_wrong_answers(capsys):
    def no_scales(in_f, out_f, rank, bits):
        return right(in_f, out_f, rank, bits) - 2 * (rank + out_f)

    def no_bias(in_f, out_f, rank, bits):
        return right(in_f, out_f, rank, bits) - 2 * out_f

    def int4_unpacked(in_f, out_f, rank, bits):
        return right(in_f, out_f, rank, 8)

    def int4_floor(in_f, out_f, rank, bits):
        return (rank * (in_f * bits // 8) + out_f * (rank * bits // 8) + 2 * (rank + out_f) + 4 * out_f)

    def dense_float(in_f, out_f, rank, bits):
        return 4 * (in_f * out_f + out_f)

    def raises(*a):
        raise ValueError("boom")

    for wrong in (no_scales, no_bias, int4_unpacked, int4_floor, dense_float, raises, lambda *a: "12"):
        assert check_expert_bytes(wrong) is False
    assert check_expert_bytes(3) is False
    out = capsys.readouterr().out
    assert "expected" in out and "raised" in out


def test_payload_matches_a_compressed_layer():
    torch.manual_seed(0)
    layer = DenseMoE(2, 32, 64, 4)
    for i in range(2):
        layer.experts[i] = low_rank_from_linear(layer.experts[i], 5)
    quantize_experts(layer, 4)
    stored = sum(b.numel() * b.element_size() for b in layer.experts[0].buffers())
    assert stored == expert_payload_bytes(32, 64, 5, 4) == right(32, 64, 5, 4)
