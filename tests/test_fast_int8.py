import copy
import warnings

import pytest
import torch
import torch.nn as nn

from moe_lab import TopKMoE
from moe_lab.compress.fast_int8 import int8_dynamic_deprecated, int8_dynamic_torchao, ops_on_quantized_tensors


def _layer():
    torch.manual_seed(0)
    return TopKMoE(4, 32, 64, 8, k=2).eval()


def test_torchao_int8_keeps_router_float_and_outputs_close():
    pytest.importorskip("torchao")
    layer = _layer()
    x = torch.randn(64, 32)
    with torch.no_grad():
        reference = layer(x)
        quantized = int8_dynamic_torchao(copy.deepcopy(layer))
        out = quantized(x)
    assert type(quantized.gating.weight) is nn.Parameter and quantized.gating.weight.dtype == torch.float32
    assert type(quantized.experts[0].linear.weight).__module__.startswith("torchao")
    assert (out - reference).norm() / reference.norm() < 0.05
    everything = int8_dynamic_torchao(copy.deepcopy(layer), skip_router=False)
    assert type(everything.gating.linear.weight).__module__.startswith("torchao")


def test_torchao_int8_survives_an_expert_without_tokens():
    torchao = pytest.importorskip("torchao.quantization")
    layer = _layer()
    with torch.no_grad():
        layer.gating.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -1e4]))  # expert 3 never chosen
    x = torch.randn(16, 32)
    raw = copy.deepcopy(layer)
    torchao.quantize_(raw, torchao.Int8DynamicActivationInt8WeightConfig(),
                      filter_fn=lambda module, fqn: fqn.startswith("experts."))
    with pytest.raises(TypeError):  # torchao cannot quantize an empty batch (expert 3 gets none)
        raw.experts[3](torch.zeros(0, 32))
    with torch.no_grad():  # the shared dispatch never calls an expert without tokens
        assert (raw(x) - layer(x)).norm() / layer(x).norm() < 0.05
    quantized = int8_dynamic_torchao(copy.deepcopy(layer))
    with torch.no_grad():
        assert (quantized(x) - layer(x)).norm() / layer(x).norm() < 0.05
    assert quantized.experts[3](torch.zeros(0, 32)).shape == (0, 64)


def test_deprecated_route_returns_a_copy_and_its_warnings():
    layer = _layer()
    x = torch.randn(64, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing escapes: every warning is returned instead
        quantized, caught = int8_dynamic_deprecated(layer)
    assert isinstance(layer.experts[0], nn.Linear)  # the original is untouched
    expert_type = type(quantized.experts[0])
    assert expert_type.__name__ == "Linear" and "dynamic" in expert_type.__module__
    assert type(quantized.gating) is nn.Linear  # router kept float
    assert any("deprecated" in str(w.message) for w in caught)
    with torch.no_grad():
        assert (quantized(x) - layer(x)).norm() / layer(x).norm() < 0.1


def test_ops_on_quantized_tensors_names_the_failing_ops():
    results = ops_on_quantized_tensors()
    assert results["topk (choose experts)"] == "ok"
    assert results["softmax (gates)"] != "ok" and results["mul (scale by gate)"] != "ok"


@pytest.mark.parametrize("fn", [int8_dynamic_torchao, int8_dynamic_deprecated])
def test_bad_arguments(fn):
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fn("not a model")
    with pytest.raises(TypeError, match="skip_router must be a bool"):
        fn(_layer(), skip_router="yes")
    with pytest.raises(ValueError, match="no parameters"):
        fn(nn.ReLU())
