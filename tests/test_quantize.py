"""Weight-only quantization against a NumPy reference: the grid (2, 3, 4, 8 bits), bfloat16 scales for
tiny and huge weights, packing, the forward against dequantize-then-matmul, saved bytes, bad input."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab import load, model_bytes, save
from moe_lab.compress import QuantizedLinear, dequantize_tensor, pack_int4, quantize_tensor, unpack_int4
from moe_lab.layers.compact import quantized
from moe_lab.layers.compact.quantized import pack_bits, unpack_bits

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def bfloat16_up(value: np.float32) -> np.float32:
    """The smallest bfloat16 >= a nonnegative float32, from its bits: keep the top 16 bits and add one
    unit in their last place when any of the 16 dropped bits is set."""
    bits = int(np.array(value, dtype=np.float32).view(np.uint32))
    top = (bits >> 16) + (1 if bits & 0xFFFF else 0)
    return np.array(top << 16, dtype=np.uint32).view(np.float32)[()]


def numpy_quantize(w: np.ndarray, bits: int, group_size):
    """One group at a time: float32 scale max|w| / q_max rounded up to bfloat16, integers from it."""
    q_max = 2 ** (bits - 1) - 1
    out_f, in_f = w.shape
    g = group_size or in_f
    values = np.zeros_like(w, dtype=np.int8)
    scales = np.zeros((out_f, in_f // g), dtype=np.float32)
    for r in range(out_f):
        for j in range(in_f // g):
            block = w[r, j * g:(j + 1) * g].astype(np.float32)
            s = bfloat16_up(np.float32(np.abs(block).max()) / np.float32(q_max))
            scales[r, j] = s
            safe = s if s != 0 else np.float32(1.0)
            values[r, j * g:(j + 1) * g] = np.clip(np.round(block / safe), -q_max, q_max)
    return values, scales


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bits, group_size", [(8, None), (8, 16), (4, None), (4, 8), (3, 16), (2, None)])
def test_matches_numpy_reference(bits, group_size, dtype):
    w = torch.randn(12, 32).to(dtype)
    w[3] = 0.0  # an all-zero row must not divide by zero
    values, scales = quantize_tensor(w, bits, group_size)
    assert values.dtype == torch.int8 and scales.dtype == torch.bfloat16
    ref_values, ref_scales = numpy_quantize(w.float().numpy(), bits, group_size)
    assert np.array_equal(values.numpy(), ref_values)
    assert np.array_equal(scales.float().numpy(), ref_scales)
    error = (dequantize_tensor(values, scales) - w.float()).abs()
    step = scales.float().repeat_interleave(group_size or 32, dim=1)
    assert (error <= step / 2).all()  # integers computed from the stored scale: never clamped


@pytest.mark.parametrize("magnitude", [1e-6, 1e-30, 1e30])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_tiny_and_huge_weights_keep_their_scales(magnitude, dtype, bits):
    if dtype == torch.float16 and magnitude != 1e-6:
        pytest.skip("float16 cannot hold weights of 1e-30 or 1e30")
    w = (torch.randn(64, 32, dtype=torch.float64) * magnitude).to(dtype)
    values, scales = quantize_tensor(w, bits, 16)
    assert (scales > 0).all(), f"{int((scales == 0).sum())} of {scales.numel()} scales are 0"
    exact = w.float().reshape(64, 2, 16).abs().amax(-1) / (2 ** (bits - 1) - 1)
    assert ((scales.float() >= exact) & (scales.float() <= exact * (1 + 2 ** -7))).all()
    restored = dequantize_tensor(values, scales)
    assert ((restored - w.float()).abs() <= scales.float().repeat_interleave(16, 1) / 2).all()
    linear = nn.Linear(32, 64, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(torch.randn(64, dtype=torch.float64) * magnitude)
    layer = QuantizedLinear.from_linear(linear, bits, 16)
    assert layer.bias.dtype == torch.bfloat16 and torch.equal(layer.bias != 0, linear.bias != 0)
    torch.testing.assert_close(layer.bias.double(), linear.bias.double(), rtol=2 ** -8, atol=0)
    assert torch.equal(layer.weight, restored)


def test_float64_weights_outside_float32_and_scale_overflow_are_refused():
    with pytest.raises(ValueError, match="weight must be finite"):
        quantize_tensor(torch.full((2, 4), 1e300, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight must be finite"):
        quantize_tensor(torch.tensor([[1.0, float("nan")]]))
    huge_bias = nn.Linear(4, 2, dtype=torch.float64)
    with torch.no_grad():
        huge_bias.bias.fill_(1e300)
    with pytest.raises(ValueError, match="linear.bias must be finite"):
        QuantizedLinear.from_linear(huge_bias)
    with pytest.raises(ValueError, match="overflow the bfloat16 scales"):
        quantize_tensor(torch.full((2, 4), 3.4e38), bits=2)  # q_max = 1: the scale exceeds bfloat16's max
    values, scales = quantize_tensor(torch.full((2, 4), 3.4e38), bits=8)
    assert torch.isfinite(dequantize_tensor(values, scales)).all()
    values, _ = quantize_tensor(torch.full((2, 4), 1e-300, dtype=torch.float64))
    assert (values == 0).all()  # below float32's range: zero, as documented


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


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_features", [5, 16, 24])
def test_stored_values_are_honestly_packed(bits, in_features):
    linear = nn.Linear(in_features, 6)
    q = QuantizedLinear.from_linear(linear, bits)
    values, scales = quantize_tensor(linear.weight, bits)
    width = in_features if bits == 8 else -(-in_features * bits // 8)
    assert q.qweight.shape == (6, width)
    assert q.qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    stored = q.qweight if bits == 8 else unpack_bits(q.qweight, bits, in_features)
    assert torch.equal(stored, values) and torch.equal(q.scales, scales)
    if bits != 8:
        assert torch.equal(q.qweight, pack_bits(values, bits))


def test_unpack_bits_against_a_bit_by_bit_reference():
    for bits in (2, 3, 4, 5, 7):
        values = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (4, 11), dtype=torch.int8)
        packed = pack_bits(values, bits)
        stream = [(int(byte) >> i) & 1 for row in packed for byte in row for i in range(8)]
        per_row = packed.shape[1] * 8
        expected = []
        for r in range(4):
            for i in range(11):
                code = sum(stream[r * per_row + i * bits + b] << b for b in range(bits))
                expected.append(code - 2 ** bits if code >= 2 ** (bits - 1) else code)
        assert values.reshape(-1).tolist() == expected
        assert torch.equal(unpack_bits(packed, bits, 11), values)


TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
             torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2), torch.float16: dict(rtol=1e-3, atol=1e-3)}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bits, group_size", [(8, None), (8, 8), (4, 16), (3, 8), (2, None)])
@pytest.mark.parametrize("block_bytes", [1 << 20, 3 * 4 * 48])  # one block; blocks of 3 rows (+ a rest)
def test_forward_equals_dequantize_then_matmul(bits, group_size, dtype, block_bytes, monkeypatch):
    monkeypatch.setattr(quantized, "BLOCK_BYTES", block_bytes)
    linear = nn.Linear(48, 20)
    q = QuantizedLinear.from_linear(linear, bits, group_size)
    values, scales = quantize_tensor(linear.weight, bits, group_size)
    weight = dequantize_tensor(values, scales)
    for shape in [(1, 48), (7, 48), (2, 3, 48), (0, 48)]:
        x = torch.randn(shape).to(dtype)
        with torch.no_grad():
            out = q(x)
        expected = F.linear(x, weight.to(dtype), q.bias.to(dtype))
        assert out.dtype == dtype and out.shape == (*shape[:-1], 20)
        torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    x = torch.randn(4, 48, dtype=dtype, requires_grad=True)  # with autograd: gradients reach the input
    q(x).square().sum().backward()
    reference = x.detach().clone().requires_grad_()
    F.linear(reference, weight.to(dtype), q.bias.to(dtype)).square().sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, **TOLERANCE[dtype])


def test_forward_adds_nothing_to_the_saved_state_and_runs_on_meta():
    q = QuantizedLinear.from_linear(nn.Linear(32, 8), 4, 16)
    before = {name: t.clone() for name, t in q.state_dict().items()}
    with torch.no_grad():
        q(torch.randn(3, 32))
    after = q.state_dict()
    assert list(after) == ["qweight", "scales", "bias"]
    assert all(torch.equal(before[name], after[name]) for name in before)
    on_meta = q.to("meta")(torch.randn(5, 32, device="meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == (5, 8)


def test_unpacked_values_are_cached_until_qweight_changes():
    a, b = (QuantizedLinear.from_linear(nn.Linear(32, 8), 4, 16) for _ in range(2))
    x = torch.randn(3, 32)
    with torch.no_grad():
        first = a(x)
        assert a._unpacked[0] is a.qweight and torch.equal(a._unpacked[2], unpack_bits(a.qweight, 4, 32))
        a.load_state_dict(b.state_dict())  # copies in place: qweight's version moves on
        assert torch.equal(a(x), b(x)) and not torch.equal(a(x), first)
        a.qweight.copy_(pack_bits(-unpack_bits(a.qweight, 4, 32), 4))  # any in-place write
        torch.testing.assert_close(a(x), 2 * b.bias.float() - b(x))
        a.to("meta")(x.to("meta"))  # a new tensor: rebuilt on the new device
        assert a._unpacked[0] is a.qweight and a._unpacked[2].device.type == "meta"
        expected = b(x)
        b.cache_codes = False  # memory at the packed size: unpacked on every call
        assert torch.equal(b(x), expected) and b._unpacked is None
        with torch.inference_mode():  # inference tensors have no version to check: never cached
            c = QuantizedLinear.from_linear(nn.Linear(32, 8), 4, 16)
            assert c(x).shape == (3, 8) and c._unpacked is None


@pytest.mark.parametrize("bits, group_size", [(8, None), (4, 32), (3, 16), (2, None)])
def test_quantized_linear_keeps_the_trained_weights(bits, group_size):
    linear = nn.Linear(64, 16)
    q = QuantizedLinear.from_linear(linear, bits, group_size)
    x = torch.randn(7, 64)
    relative = (q(x) - linear(x)).norm() / linear(x).norm()
    assert relative < {8: 0.01, 4: 0.15, 3: 0.3, 2: 0.7}[bits]
    values, scales = quantize_tensor(linear.weight, bits, group_size)
    torch.testing.assert_close(q.weight, dequantize_tensor(values, scales))


@pytest.mark.parametrize("bits, group_size, target", [(8, None, 3.9), (4, None, 7.5), (4, 128, 7.5),
                                                      (3, 128, 9.5), (2, 128, 14.0), (2, None, 14.5)])
def test_saved_bytes_shrink_as_promised(bits, group_size, target):
    linear = nn.Linear(256, 512)  # an expert matrix of 512 x 256
    q = QuantizedLinear.from_linear(linear, bits, group_size)
    groups = 256 // (group_size or 256)
    payload = 512 * 256 * bits // 8 + 512 * groups * 2 + 512 * 2  # values, bfloat16 scales and bias
    assert sum(t.numel() * t.element_size() for t in q.state_dict().values()) == payload
    assert model_bytes(q) - payload < 1024  # plus a small header and config
    assert model_bytes(linear) / model_bytes(q) >= target


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_save_load_round_trip(tmp_path, bits):
    q = QuantizedLinear.from_linear(nn.Linear(32, 8), bits, 16)
    loaded = load(save(q, tmp_path))
    x = torch.randn(3, 32)
    assert torch.equal(loaded(x), q(x))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), q.state_dict().values()))


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=5), "bits must be one of"), (dict(bits=True), "bits must be one of"),
    (dict(bits=8, group_size=5), "must divide"),
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
    with pytest.raises(ValueError, match="weight must be a 2-D float tensor"):
        quantize_tensor(torch.ones(4, 4, dtype=torch.int64))
    q = QuantizedLinear.from_linear(nn.Linear(8, 4))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        q(torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="x must have last dimension 8"):
        q(torch.ones(2, 7))


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
