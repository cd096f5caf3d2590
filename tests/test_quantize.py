"""Weight-only quantization against a NumPy reference, packing, bytes and bad input."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from moe_lab import load, model_bytes, save
from moe_lab.compress import QuantizedLinear, dequantize_tensor, pack_int4, quantize_tensor, unpack_int4


def numpy_quantize(w: np.ndarray, bits: int, group_size):
    q_max = 2 ** (bits - 1) - 1
    out_f, in_f = w.shape
    g = group_size or in_f
    values = np.zeros_like(w, dtype=np.int8)
    scales = np.zeros((out_f, in_f // g), dtype=np.float16)
    for r in range(out_f):
        for j in range(in_f // g):
            block = w[r, j * g:(j + 1) * g].astype(np.float32)
            s = np.float16(np.abs(block).max() / q_max)
            scales[r, j] = s
            safe = np.float32(s) if s != 0 else np.float32(1.0)
            values[r, j * g:(j + 1) * g] = np.clip(np.round(block / safe), -q_max, q_max)
    return values, scales


@pytest.mark.parametrize("bits, group_size", [(8, None), (8, 16), (4, None), (4, 8)])
def test_matches_numpy_reference(bits, group_size):
    w = torch.randn(12, 32)
    w[3] = 0.0  # an all-zero row must not divide by zero
    values, scales = quantize_tensor(w, bits, group_size)
    ref_values, ref_scales = numpy_quantize(w.numpy(), bits, group_size)
    assert np.array_equal(values.numpy(), ref_values)
    assert np.array_equal(scales.numpy(), ref_scales)
    error = (dequantize_tensor(values, scales) - w).abs()
    step = scales.float().repeat_interleave(group_size or 32, dim=1)
    assert (error <= step / 2 + 1e-6 + step * 1e-3).all()  # rounding error, float16 scales


def test_int4_packing_round_trips():
    values = torch.randint(-8, 8, (5, 10), dtype=torch.int8)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 5)
    assert torch.equal(unpack_int4(packed), values)
    odd = torch.randint(-8, 8, (3, 7), dtype=torch.int8)
    assert pack_int4(odd).shape == (3, 4)
    assert torch.equal(unpack_int4(pack_int4(odd), 7), odd)
    q = QuantizedLinear.from_linear(nn.Linear(7, 3), bits=4)  # odd width: one padding nibble
    torch.testing.assert_close(q.weight, dequantize_tensor(*quantize_tensor(q.weight, 4)))


@pytest.mark.parametrize("bits, group_size", [(8, None), (4, 32)])
def test_quantized_linear_keeps_the_trained_weights(bits, group_size):
    linear = nn.Linear(64, 16)
    q = QuantizedLinear.from_linear(linear, bits, group_size)
    x = torch.randn(7, 64)
    relative = (q(x) - linear(x)).norm() / linear(x).norm()
    assert relative < (0.01 if bits == 8 else 0.15)
    values, scales = quantize_tensor(linear.weight, bits, group_size)
    torch.testing.assert_close(q.weight, dequantize_tensor(values, scales))


@pytest.mark.parametrize("bits, group_size, target", [(8, None, 3.9), (4, None, 7.5), (4, 128, 7.5)])
def test_saved_bytes_shrink_as_promised(bits, group_size, target):
    linear = nn.Linear(256, 512)  # an expert matrix of 512 x 256
    q = QuantizedLinear.from_linear(linear, bits, group_size)
    assert model_bytes(linear) / model_bytes(q) >= target


def test_save_load_round_trip(tmp_path):
    q = QuantizedLinear.from_linear(nn.Linear(32, 8), 4, 16)
    loaded = load(save(q, tmp_path))
    x = torch.randn(3, 32)
    assert torch.equal(loaded(x), q(x))


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=3), "bits must be one of"), (dict(bits=8, group_size=5), "must divide"),
    (dict(bits=8, group_size=0), "group_size must be a positive int"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_tensor(torch.randn(4, 16), **kwargs)


def test_bad_input_types():
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        QuantizedLinear.from_linear(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="pack_int4 values"):
        pack_int4(torch.tensor([[9, 0]], dtype=torch.int8))


def test_quantize_experts_keeps_the_router_float_and_shrinks_bytes():
    from moe_lab import TopKMoE
    from moe_lab.compress import quantize_experts
    from moe_lab.measure import moe_bytes

    layer = TopKMoE(4, 256, 512, 256, k=2)
    x = torch.randn(50, 256)
    reference, before = layer(x), moe_bytes(layer)
    quantize_experts(layer, 8)
    assert type(layer.gating) is nn.Linear
    assert all(isinstance(e, QuantizedLinear) for e in layer.experts)
    assert isinstance(layer.output, QuantizedLinear)
    assert (layer(x) - reference).norm() / reference.norm() < 0.02
    assert before / moe_bytes(layer) > 3.85  # router kept in float32


def test_mixed_precision_by_usage_and_sensitivity():
    from moe_lab import TopKMoE
    from moe_lab.compress import bits_by_usage, expert_sensitivity, quantize_experts

    assert bits_by_usage(torch.tensor([0.1, 0.4, 0.2, 0.3])) == [4, 8, 4, 8]
    assert bits_by_usage(torch.tensor([0.1, 0.4]), high_fraction=0.0) == [4, 4]
    layer = TopKMoE(4, 16, 32, 8, k=2)
    with torch.no_grad():
        layer.experts[2].weight.mul_(20)  # a big expert suffers most from coarse steps
    sensitivity = expert_sensitivity(layer, torch.randn(64, 16), bits=4)
    assert sensitivity.argmax() == 2
    quantize_experts(layer, bits=[4, 4, 8, 4])
    assert [e.bits for e in layer.experts] == [4, 4, 8, 4] and layer.output.bits == 8
    with pytest.raises(ValueError, match="bits has 3 entries"):
        quantize_experts(TopKMoE(4, 16, 32, 8), bits=[8, 8, 4])
    with pytest.raises(ValueError, match="high_bits must be one of"):
        bits_by_usage(torch.ones(3), high_bits=16)


def test_quantize_experts_refuses_a_bare_linear():
    from moe_lab.compress import quantize_experts

    with pytest.raises(ValueError, match="cannot replace the model itself"):
        quantize_experts(nn.Linear(8, 8), 8)
