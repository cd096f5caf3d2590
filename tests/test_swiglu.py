"""SwiGLUMoE against a dense masked reference; bad input; artifacts; compression tools on it."""

import copy

import pytest
import torch
import torch.nn.functional as F

from moe_lab import load, model_bytes, save
from moe_lab.compress import ExpertPrune, LowRank, MergeExperts, Quantize, compress
from moe_lab.layers.swiglu import SwiGLUMoE


def dense_reference(layer: SwiGLUMoE, x: torch.Tensor) -> torch.Tensor:
    probs = layer.gate(x).softmax(-1)
    top, idx = probs.topk(layer.k, dim=-1)
    if layer.config["normalize"]:
        top = top / top.sum(-1, keepdim=True)
    weights = torch.zeros_like(probs).scatter(1, idx, top)
    def expert(e, x):
        inner = e.down_proj.in_features
        gate, up = e.gate_up_proj.weight[:inner], e.gate_up_proj.weight[inner:]
        return e.down_proj(F.silu(x @ gate.T) * (x @ up.T))

    outputs = torch.stack([expert(e, x) for e in layer.experts], 1)
    out = (weights.unsqueeze(-1) * outputs).sum(1)
    if layer.config["shared_expert_size"]:
        out = out + torch.sigmoid(layer.shared_expert_gate(x)) * layer.shared_expert(x)
    return out


@pytest.mark.parametrize("normalize, shared", [(True, None), (False, None), (False, 24)])
def test_matches_dense_reference(normalize, shared):
    layer = SwiGLUMoE(6, 16, 32, k=2, normalize=normalize, shared_expert_size=shared)
    x = torch.randn(40, 16)
    torch.testing.assert_close(layer(x), dense_reference(layer, x), rtol=1e-5, atol=1e-6)
    assert int(layer.tokens_per_expert.sum()) == 80
    assert layer(x.view(4, 10, 16)).shape == (4, 10, 16)


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must be <= num_experts"):
        SwiGLUMoE(2, 8, 8, k=3)
    with pytest.raises(ValueError, match="shared_expert_size must be >= 1"):
        SwiGLUMoE(2, 8, 8, shared_expert_size=0)
    with pytest.raises(ValueError, match="activation must be"):
        SwiGLUMoE(2, 8, 8, activation="tanh")
    with pytest.raises(ValueError, match="x must have last dimension 8"):
        SwiGLUMoE(2, 8, 8)(torch.randn(3, 4))


def test_compression_stages_and_artifacts(tmp_path):
    layer = SwiGLUMoE(8, 32, 64, k=2, shared_expert_size=32)
    x = torch.randn(256, 32)
    report = compress(layer, [ExpertPrune(0.25), MergeExperts(4), LowRank(rank=8), Quantize(8)], x)
    small = report.model
    assert small.num_experts == 4 and small.gate.weight.shape == (4, 32)
    assert report.records[-1]["ratio"] > 3
    loaded = load(save(small, tmp_path))
    assert torch.equal(loaded(x), small(x))
    assert model_bytes(loaded) == model_bytes(small)
    assert copy.deepcopy(small)(x).shape == x.shape
