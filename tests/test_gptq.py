"""GPTQ against a slow float64 transcription of the paper's Algorithm 1, its error against
round-to-nearest, the Hessian accumulation, bit packing and bad input."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab.compress.gptq import (
    HessianAccumulator,
    gptq_quantize,
    gptq_quantize_weight,
    hessian_from_inputs,
    pack_bits,
    unpack_bits,
)
from moe_lab.layers.compact import quantized as quantize_module
from moe_lab.layers.compact.quantized import QuantizedLinear, dequantize_tensor, pack_int4, quantize_tensor

TIE = 1e-5  # a decision this close (relative) to a rounding tie may go either way in float32


def _tie_distance(ratio: torch.Tensor) -> torch.Tensor:
    """Relative distance of ``ratio`` from the nearest ``k + 1/2`` (where rounding flips)."""
    return ((ratio - ratio.floor()) - 0.5).abs() / ratio.abs().clamp(min=1)


def reference_gptq(weight, hessian, bits, group_size, damp=0.01, act_order=False):
    """Algorithm 1 of Frantar et al. one column at a time in float64, with the full inverse Hessian's
    upper Cholesky factor. Returns values, scales and, per row, the closest call to a tie it made
    (in the rounding of ``w / s`` or of a scale to float16)."""
    w, h = weight.double().clone(), hessian.double().clone()
    n = w.shape[1]
    q_max, g = 2 ** (bits - 1) - 1, group_size or n
    dead = h.diagonal() == 0
    live_mean = h.diagonal()[~dead].mean() if (~dead).any() else 1.0  # damping level: live columns
    order = sorted(range(n), key=lambda c: -float(h[c, c])) if act_order else list(range(n))
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    closest = torch.full((w.shape[0],), math.inf, dtype=torch.float64)

    def scale_of(columns):
        exact = columns.float().abs().amax(1).double() / q_max
        ulp = 2.0 ** (torch.floor(torch.log2(exact.clamp(min=2.0 ** -14))) - 10)  # float16 spacing
        closest.copy_(torch.minimum(closest, _tie_distance(exact / ulp)))
        return exact.half().double()

    scales = torch.stack([scale_of(w[:, k * g:(k + 1) * g]) for k in range(n // g)], 1)
    w, h = w[:, order], h[order][:, order]
    h += damp * live_mean * torch.eye(n, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h)).T  # H^-1 = U^T U
    values = torch.zeros_like(w)
    for j in range(n):
        if group_size and not act_order and j % g == 0:
            scales[:, j // g] = scale_of(w[:, j:j + g])
        s = scales[:, order[j] // g]
        ratio = w[:, j] / torch.where(s == 0, 1.0, s)
        inside = ratio.abs() < q_max + 0.5  # clamped values are no close call
        closest = torch.minimum(closest, torch.where(inside, _tie_distance(ratio), math.inf))
        values[:, j] = torch.round(ratio).clamp(-q_max, q_max)
        error = (w[:, j] - values[:, j] * s) / u[j, j]
        w[:, j:] -= torch.outer(error, u[j, j:])
    back = torch.argsort(torch.tensor(order))
    return values[:, back].to(torch.int8), scales.float(), closest


def rtn(weight, bits, group_size):
    """Round-to-nearest on the same grid for any width (``quantize_tensor`` stores only 4 and 8)."""
    q_max, out_features = 2 ** (bits - 1) - 1, weight.shape[0]
    groups = weight.float().reshape(out_features, -1, group_size or weight.shape[1])
    scales = (groups.abs().amax(-1, keepdim=True) / q_max).half().float()
    values = torch.round(groups / torch.where(scales == 0, 1.0, scales)).clamp(-q_max, q_max)
    return values.reshape(weight.shape).to(torch.int8), scales.squeeze(-1)


def correlated(n, d, decades=2.0):
    """``n`` tokens ``z @ diag(s) @ Q``: covariance eigenvalues spread over ``2 * decades`` decades."""
    mixing = torch.diag(torch.logspace(0, -decades, d)) @ torch.linalg.qr(torch.randn(d, d))[0]
    return lambda: torch.randn(n, d) @ mixing


def output_error(weight, quantized, x):
    return float((x @ (weight - quantized).detach().T).square().sum())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 16, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_matches_the_column_by_column_reference(bits, group_size, act_order):
    sample = correlated(512, 64, decades=1.0)
    x = sample()
    x[:, 5] = 0.0  # a dead input
    h, w = hessian_from_inputs(x), torch.randn(32, 64)
    ref_values, ref_scales, closest = reference_gptq(w, h, bits, group_size, act_order=act_order)
    for block_size in (1, 7, 128):
        values, scales = gptq_quantize_weight(w, h, bits, group_size, act_order=act_order,
                                              block_size=block_size)
        assert values.dtype == torch.int8 and scales.dtype == torch.float32
        differ = (values != ref_values).any(1) | (scales != ref_scales).any(1)
        # rows are independent: a row may only differ if the reference made a near-tie decision in it
        assert (closest[differ] < TIE).all(), (block_size, closest[differ])
        assert differ.float().mean() <= 1 / 16, (block_size, int(differ.sum()))
        assert (values == ref_values).float().mean() >= 0.99
    assert (values[:, 5] == 0).all()


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_beats_round_to_nearest_on_correlated_inputs(bits, group_size, act_order):
    sample = correlated(4096, 128)
    calibration, held_out, w = sample(), sample(), torch.randn(64, 128)
    values, scales = gptq_quantize_weight(w, hessian_from_inputs(calibration), bits, group_size,
                                          act_order=act_order)
    ratio = (output_error(w, dequantize_tensor(values, scales), held_out)
             / output_error(w, dequantize_tensor(*rtn(w, bits, group_size)), held_out))
    bound = 0.5 if bits >= 3 else 0.75
    assert ratio <= bound, f"GPTQ/RTN output error {ratio:.3f} at {bits} bits, group {group_size}"


@pytest.mark.parametrize("bits, group_size", [(4, None), (3, 32), (2, None)])
def test_no_worse_than_round_to_nearest_on_white_inputs(bits, group_size):
    calibration, held_out, w = torch.randn(4096, 128), torch.randn(4096, 128), torch.randn(64, 128)
    values, scales = gptq_quantize_weight(w, hessian_from_inputs(calibration), bits, group_size)
    ratio = (output_error(w, dequantize_tensor(values, scales), held_out)
             / output_error(w, dequantize_tensor(*rtn(w, bits, group_size)), held_out))
    assert ratio <= 1.05, f"GPTQ/RTN output error {ratio:.3f} on white inputs"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_gives_round_to_nearest_exactly(bits, group_size, act_order):
    w = torch.randn(24, 64) * torch.rand(24, 1) * 3
    w[2] = 0.0  # a zero row: scale 0
    values, scales = gptq_quantize_weight(w, torch.eye(64), bits, group_size, act_order=act_order)
    expected_values, expected_scales = rtn(w, bits, group_size)
    assert torch.equal(values, expected_values) and torch.equal(scales, expected_scales)
    if bits in quantize_module.SUPPORTED_BITS:  # and the library's own RTN agrees
        library_values, library_scales = quantize_tensor(w, bits, group_size)
        assert torch.equal(values, library_values) and torch.equal(scales, library_scales.float())


def test_hessian_scale_does_not_matter_and_dead_columns_are_zeroed():
    x = correlated(256, 32)()
    x[:, [3, 17]] = 0.0
    h, w = hessian_from_inputs(x), torch.randn(16, 32)
    values, scales = gptq_quantize_weight(w, h, 3, 8, act_order=True)
    assert (values[:, [3, 17]] == 0).all()
    for factor in (4.0, 0.0625):  # powers of four: every float step (square roots too) scales exactly
        again = gptq_quantize_weight(w, h * factor, 3, 8, act_order=True)
        assert torch.equal(again[0], values) and torch.equal(again[1], scales)
    values, scales = gptq_quantize_weight(w, torch.zeros(32, 32), 4)  # all inputs dead
    assert (values == 0).all() and torch.isfinite(scales).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights(dtype):
    sample = correlated(1024, 64)
    x, w = sample(), torch.randn(32, 64)
    h = hessian_from_inputs(x)
    low = w.to(dtype)
    values, scales = gptq_quantize_weight(low, h, 4, 16)
    assert values.device == low.device and scales.dtype == torch.float32
    same = gptq_quantize_weight(low.float(), h, 4, 16)  # float32 inside: the same as upcasting first
    assert torch.equal(values, same[0]) and torch.equal(scales, same[1])
    full = dequantize_tensor(*gptq_quantize_weight(w, h, 4, 16))
    ratio = output_error(w, dequantize_tensor(values, scales), x) / output_error(w, full, x)
    assert 0.8 < ratio < 1.25, ratio  # the dtype's own rounding is far below the int4 step
    step = scales.repeat_interleave(16, 1)
    assert ((dequantize_tensor(values, scales) - full).abs() <= 8 * step).all()


def test_hessian_matches_float64_and_weighted_sum():
    x = torch.randn(3, 700, 24) * 5 + 2  # nonzero mean: float32 sums lose digits
    dense = x.reshape(-1, 24).double()
    exact = dense.T @ dense / dense.shape[0]
    torch.testing.assert_close(hessian_from_inputs(x).double(), exact, rtol=1e-6,
                               atol=1e-6 * exact.abs().max())
    gates = torch.rand(3, 700)
    gates[0, :10] = 0.0
    g = gates.reshape(-1).double()
    weighted = (dense * g[:, None]).T @ dense / g.sum()
    torch.testing.assert_close(hessian_from_inputs(x, gates).double(), weighted, rtol=1e-6,
                               atol=1e-6 * weighted.abs().max())
    assert hessian_from_inputs(x.to(torch.bfloat16)).dtype == torch.float32


def test_accumulator_over_batches_equals_one_batch():
    x, gates = torch.randn(1000, 16), torch.rand(1000)
    whole = hessian_from_inputs(x, gates)
    streamed = HessianAccumulator(16, chunk_size=64)
    for part in torch.split(torch.arange(1000), [1, 300, 99, 600]):
        streamed.add(x[part], gates[part])
    assert streamed.count == 1000
    torch.testing.assert_close(streamed.hessian, whole, rtol=1e-6, atol=1e-7)
    unweighted = HessianAccumulator(16).add(x[:500]).add(x[500:])
    torch.testing.assert_close(unweighted.hessian, hessian_from_inputs(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits, group_size", [(4, None), (8, 32), (4, 16)])
def test_gptq_quantize_builds_a_quantized_linear(bits, group_size):
    linear = nn.Linear(64, 24)
    x = correlated(512, 64)()
    layer = gptq_quantize(linear, x, bits, group_size, act_order=True)
    values, scales = gptq_quantize_weight(linear.weight, hessian_from_inputs(x), bits, group_size,
                                          act_order=True)
    assert isinstance(layer, QuantizedLinear) and (layer.bits, layer.group_size) == (bits, group_size)
    assert torch.equal(layer.qweight, pack_int4(values) if bits == 4 else values)
    assert torch.equal(layer.scales.float(), scales)
    probe = torch.randn(5, 64)
    expected = F.linear(probe, dequantize_tensor(values, scales), linear.bias.detach().half().float())
    assert torch.equal(layer(probe), expected)
    rtn_layer = QuantizedLinear.from_linear(linear, bits, group_size)
    assert output_error(linear.weight, layer.weight, x) < output_error(linear.weight, rtn_layer.weight, x)
    from_accumulator = gptq_quantize(linear, HessianAccumulator(64).add(x), bits, group_size, act_order=True)
    assert torch.equal(from_accumulator.qweight, layer.qweight)
    no_bias = gptq_quantize(nn.Linear(64, 8, bias=False), x, bits, group_size)
    assert no_bias.bias is None


@pytest.mark.parametrize("bits", [2, 3])
def test_gptq_quantize_at_widths_the_storage_lacks(bits):
    linear, x = nn.Linear(32, 8), torch.randn(64, 32)
    if bits in quantize_module.SUPPORTED_BITS:
        layer = gptq_quantize(linear, x, bits)
        values, scales = gptq_quantize_weight(linear.weight, hessian_from_inputs(x), bits)
        torch.testing.assert_close(layer.weight, dequantize_tensor(values, scales))
    else:
        with pytest.raises(ValueError, match=f"bits={bits}: QuantizedLinear stores only"):
            gptq_quantize(linear, x, bits)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("width", [1, 3, 8, 13, 64])
def test_pack_bits_round_trips(bits, width):
    values = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (5, width), dtype=torch.int8)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, math.ceil(width * bits / 8))
    assert torch.equal(unpack_bits(packed, bits, width), values)
    if bits == 4:
        assert torch.equal(packed, pack_int4(values))


def test_pack_bits_layout():
    assert pack_bits(torch.tensor([1, -1, 0, -2], dtype=torch.int8), 2).tolist() == [0b10001101]
    three = torch.tensor([1, 2, 3, -4, -3, -2, -1, 0], dtype=torch.int8)  # a true 3-bit stream
    stream = sum(int(v) % 8 << (3 * i) for i, v in enumerate(three))
    assert pack_bits(three, 3).tolist() == [stream & 0xFF, stream >> 8 & 0xFF, stream >> 16]
    assert pack_bits(torch.zeros(2, 0, dtype=torch.int8), 3).shape == (2, 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=5), "bits must be one of"), (dict(bits=True), "bits must be one of"),
    (dict(group_size=5), "group_size .* must divide in_features"), (dict(group_size=0), "group_size must"),
    (dict(damp=-0.1), "damp must be >= 0"), (dict(damp=float("nan")), "damp must be finite"),
    (dict(block_size=0), "block_size must be >= 1"),
    (dict(hessian=torch.eye(8)), r"hessian must have shape \(16, 16\)"),
    (dict(hessian=torch.eye(16) + torch.triu(torch.ones(16, 16), 1)), "hessian must be symmetric"),
    (dict(hessian=-torch.eye(16)), "hessian must be finite with a nonnegative diagonal"),
    (dict(hessian=torch.full((16, 16), float("inf"))), "hessian must be finite"),
    (dict(hessian=torch.ones(16, 16), damp=0.0), "not positive definite after damping"),
    (dict(weight=torch.randn(16)), "weight must be a 2-D float tensor"),
    (dict(weight=torch.full((4, 16), float("nan"))), "weight must be finite"),
])
def test_bad_arguments(kwargs, match):
    arguments = dict(weight=torch.randn(4, 16), hessian=torch.eye(16)) | kwargs
    with pytest.raises(ValueError, match=match):
        gptq_quantize_weight(**arguments)


def test_bad_inputs_to_the_hessian_and_packing():
    with pytest.raises(ValueError, match="weights must be a tensor of shape"):
        hessian_from_inputs(torch.randn(10, 4), torch.rand(9))
    with pytest.raises(ValueError, match="weights must be finite and nonnegative"):
        hessian_from_inputs(torch.randn(10, 4), -torch.rand(10))
    with pytest.raises(ValueError, match="no tokens"):
        hessian_from_inputs(torch.randn(10, 4), torch.zeros(10))
    with pytest.raises(ValueError, match="no tokens"):
        _ = HessianAccumulator(4).hessian
    with pytest.raises(ValueError, match="x must have last dimension 4"):
        HessianAccumulator(4).add(torch.randn(3, 5))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        hessian_from_inputs(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="inputs must have last dimension 8"):
        gptq_quantize(nn.Linear(8, 2), torch.randn(5, 7))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        gptq_quantize(nn.Conv1d(1, 1, 1), torch.randn(5, 1))
    with pytest.raises(ValueError, match=r"values must lie in \[-4, 3\]"):
        pack_bits(torch.tensor([4], dtype=torch.int8), 3)
    with pytest.raises(ValueError, match="bits must be an int in"):
        pack_bits(torch.tensor([0], dtype=torch.int8), 9)
    with pytest.raises(ValueError, match="packed must be uint8 with last dimension 2"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stays_on_the_weights_device():
    x = correlated(512, 64)()
    w, h = torch.randn(16, 64), hessian_from_inputs(x)
    values, scales = gptq_quantize_weight(w.cuda(), h.cuda(), 4, 16, act_order=True)
    assert values.is_cuda and scales.is_cuda
    cpu_values, _ = gptq_quantize_weight(w, h, 4, 16, act_order=True)
    assert (values.cpu() == cpu_values).float().mean() >= 0.99
    torch.testing.assert_close(hessian_from_inputs(x.cuda()).cpu(), h, rtol=1e-5, atol=1e-5)
