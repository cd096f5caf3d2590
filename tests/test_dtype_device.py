"""dtype and device fidelity: every layer, stage and helper on float32, float64, bfloat16 and
float16 weights, and on a non-CPU device.

* Layer forwards are compared with a float64 copy of the same (rounded) weights on the same
  (rounded) inputs, so the tolerance measures the arithmetic of the low-precision forward alone.
  Top-k layers get tokens whose routing is clear in float64 (the k-th and (k+1)-th router
  logits differ by a margin), so that rounding cannot flip an expert choice.
* Stages and helpers must keep the dtype and device of every tensor they create (new modules,
  parameters, buffers, returned statistics).
* The device is ``fake:0`` (:mod:`fake_device`): real CPU numbers behind a tensor that reports
  another device and raises, as CUDA does, when an op mixes it with a CPU tensor.
"""

from __future__ import annotations

import copy

import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn as nn
from fake_device import FakeDeviceTensor, fake_device

from moe_lab import DenseMoE, ImageClassifierMoE, SharedTrunkMoE, SlotSoftMoE, SwiGLUMoE, TopKMoE
from moe_lab.compress import ExpertPrune, FineTune, LowRank, MagnitudePrune, MergeExperts, Quantize, compress
from moe_lab.compress.distill import distill, distillation_loss
from moe_lab.compress.lowrank import low_rank_from_linear, rank_for_energy
from moe_lab.compress.prune import EXPERT_SCORES, expert_usage, prune_hidden_units, select_experts
from moe_lab.compress.share import base_delta_experts, group_experts, merge_experts
from moe_lab.compress.targets import layer_inputs
from moe_lab.diagnostics import measure_shares, train_recording_shares
from moe_lab.evaluation import report
from moe_lab.layers.compact import BaseDeltaLinear, LowRankLinear, QuantizedLinear, SparseLinear
from moe_lab.measure import active_params_per_token, flops_per_token, latency, model_bytes
from moe_lab.training import evaluate, task_loss, train
from moe_lab.viz import routing_heatmap, routing_matrix

matplotlib.use("Agg")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["float32", "float64", "bfloat16", "float16"]
# max |out - float64 reference| / max |reference|: a few units of each format's rounding
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 3e-2, torch.float16: 4e-3}
D = 16


@pytest.fixture(scope="module")
def device():
    try:
        return fake_device()
    except RuntimeError as error:  # pragma: no cover - depends on the PyTorch build
        pytest.skip(str(error))


# ---------------------------------------------------------------------------------------------
# The fake device itself: it must raise where CUDA raises, or the tests below prove nothing.


def test_fake_device_computes_and_raises_when_mixed_with_cpu(device):
    x = torch.randn(4, 3)
    fake = x.to(device)
    assert isinstance(fake, FakeDeviceTensor) and fake.device == device
    torch.testing.assert_close((fake @ fake.T).cpu(), x @ x.T)
    assert (fake * torch.tensor(2.0)).device == device  # a 0-dim CPU tensor in a pointwise op: fine
    assert torch.zeros(3, device=device).device == device
    assert torch.tensor([1, 2], device=device).tolist() == [1, 2]
    for mixed in (lambda: fake + x, lambda: torch.stack([fake[0], x[0]]),
                  lambda: torch.searchsorted(fake[:, 0].sort().values, torch.tensor(0.5)),
                  lambda: fake.new_zeros(4, 3).index_add_(0, torch.arange(4), fake)):
        with pytest.raises(RuntimeError, match="same device"):
            mixed()
    with pytest.raises(TypeError, match="numpy"):
        fake.numpy()
    linear = nn.Linear(3, 2).to(device)
    assert isinstance(linear.weight, nn.Parameter) and linear.weight.device == device
    linear(fake).sum().backward()
    assert linear.weight.grad.device == device
    with pytest.raises(RuntimeError, match="same device"):
        linear(x)


# ---------------------------------------------------------------------------------------------
# Layers


def _sparse_linear():
    linear = nn.Linear(D, 8)
    with torch.no_grad():
        linear.weight[linear.weight.abs() < 0.1] = 0
    return SparseLinear.from_linear(linear)


def _base_delta_linear():
    layer = BaseDeltaLinear(D, 8, rank=3)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


LAYERS = {
    "dense": lambda: DenseMoE(4, D, 24, 8, activation="gelu"),
    "shared_trunk": lambda: SharedTrunkMoE(4, D, 24, 8, shared_size=12, activation="relu"),
    "topk": lambda: TopKMoE(6, D, 24, 8, k=2, activation="relu"),
    "topk_mixtral_rule": lambda: TopKMoE(6, D, 24, 8, k=2, routing="softmax_topk", normalize=False),
    "topk_capacity_balance": lambda: TopKMoE(6, D, 24, 8, k=2, capacity_factor=0.75,
                                             balance_loss_weight=0.01, z_loss_weight=1e-3),
    "topk_noisy": lambda: TopKMoE(6, D, 24, 8, k=2, noisy_gating=True),
    "swiglu": lambda: SwiGLUMoE(6, D, 24, k=2, shared_expert_size=20),
    "slot": lambda: SlotSoftMoE(4, 2, D, 24, 8, activation="silu"),
    "lowrank_linear": lambda: LowRankLinear(D, 8, 3),
    "sparse_linear": _sparse_linear,
    "base_delta_linear": _base_delta_linear,
    "quantized_linear": lambda: QuantizedLinear.from_linear(nn.Linear(D, 8), bits=8, group_size=8),
}


def _inputs(layer: nn.Module, n: int = 48, margin: float = 0.25) -> torch.Tensor:
    """float64 inputs for ``layer`` (float64): for a top-k layer, tokens whose k-th and (k+1)-th
    router logits differ by more than ``margin``, so no rounding can change the routing."""
    if isinstance(layer, SlotSoftMoE):
        return torch.randn(3, 8, D, dtype=torch.float64)
    if not isinstance(layer, (TopKMoE, SwiGLUMoE)):
        return torch.randn(n, D, dtype=torch.float64)
    candidates = torch.randn(40 * n, D, dtype=torch.float64)
    with torch.no_grad():
        top = layer.router(candidates).topk(layer.k + 1, dim=-1).values
    clear = candidates[(top[:, -2] - top[:, -1]) > margin]
    assert len(clear) >= n
    return clear[:n]


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.double() - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", LAYERS)
def test_layer_forward_keeps_dtype_and_matches_float64(name, dtype):
    layer = LAYERS[name]().to(dtype).eval()
    reference = copy.deepcopy(layer).double()
    x = _inputs(reference).to(dtype)
    with torch.no_grad():
        expected = reference(x.double())
        out = layer(x)
    assert out.dtype == dtype and out.shape == expected.shape
    assert _relative_error(out, expected) <= TOLERANCE[dtype]
    if hasattr(layer, "aux_loss") and isinstance(layer.aux_loss, torch.Tensor):
        assert layer.aux_loss.dtype in (dtype, torch.float32, torch.float64)
        torch.testing.assert_close(layer.aux_loss.double(), reference.aux_loss, rtol=TOLERANCE[dtype] + 1e-6,
                                   atol=1e-7)
    if hasattr(layer, "tokens_per_expert") and layer.tokens_per_expert is not None:
        assert torch.equal(layer.tokens_per_expert, reference.tokens_per_expert)


MIXTURES = ["dense", "shared_trunk", "topk", "topk_mixtral_rule", "topk_noisy", "swiglu", "slot"]


def _gate_matrix(routing, num_experts: int) -> torch.Tensor:
    """``(n, E)`` gate of every token on every expert (0 where not routed)."""
    gates = torch.zeros(routing.gates.shape[0], num_experts, dtype=routing.gates.dtype)
    return gates.scatter(1, routing.indices, routing.gates)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", MIXTURES)
def test_routing_runs_in_at_least_float32(name, dtype):
    """Softmax, top-k and gates in float32 for half-precision layers (as Hugging Face's Mixtral
    does), in float64 for float64 layers; the same gates as float64 routing, up to the rounding of
    the router's own output."""
    layer = LAYERS[name]().to(dtype).eval()
    reference = copy.deepcopy(layer).double()
    x = _inputs(reference).to(dtype)
    with torch.no_grad():
        routing, expected = layer.route(x), reference.route(x.double())
    wide = torch.promote_types(dtype, torch.float32)
    # SwiGLUMoE follows Hugging Face: raw router logits and (Mixtral-style) gates in the input dtype,
    # scores computed widened
    assert routing.probs.dtype == wide
    assert routing.logits.dtype == routing.gates.dtype == (dtype if name == "swiglu" else wide)
    torch.testing.assert_close(routing.probs.double(), expected.probs, rtol=0, atol=TOLERANCE[dtype])
    torch.testing.assert_close(_gate_matrix(routing, layer.num_experts).double(),
                               _gate_matrix(expected, layer.num_experts), rtol=0, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_losses_are_computed_in_at_least_float32(dtype):
    torch.manual_seed(0)
    logits = (4 * torch.randn(64, 10, 50)).to(dtype)
    targets = torch.randint(0, 50, (64, 10))
    expected = torch.nn.functional.cross_entropy(logits.double().reshape(-1, 50), targets.reshape(-1))
    loss = task_loss(logits, targets, "language_model")
    assert loss.dtype == torch.promote_types(dtype, torch.float32)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    soft = distillation_loss(logits, logits.flip(0), targets, alpha=0.5)
    assert soft.dtype == loss.dtype
    reference = distillation_loss(logits.double(), logits.flip(0).double(), targets, alpha=0.5)
    assert float(soft) == pytest.approx(float(reference), rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_noisy_top_k_trains_in_every_dtype(dtype):
    layer = TopKMoE(6, D, 24, 8, k=2, noisy_gating=True, balance_loss_weight=0.01).to(dtype).train()
    out = layer(torch.randn(32, D, dtype=dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    (out.float().square().mean() + layer.aux_loss).backward()
    assert all(p.grad.dtype == dtype for p in layer.parameters() if p.grad is not None)
    assert layer.gating.weight.grad is not None


@pytest.mark.parametrize("name", LAYERS)
def test_layer_runs_on_another_device(name, device):
    layer = LAYERS[name]().eval()
    x = _inputs(copy.deepcopy(layer).double()).float()
    with torch.no_grad():
        expected = layer(x)
    moved = copy.deepcopy(layer).to(device)
    with torch.no_grad():
        out = moved(x.to(device))
    assert out.device == device
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-6)
    routing = getattr(moved, "last_routing", None)
    if routing is not None:
        assert {t.device for t in vars(routing).values()} == {device}
        assert moved.tokens_per_expert.device == device


@pytest.mark.parametrize("name", LAYERS)
def test_layer_built_on_another_device_trains_there(name, device):
    torch.manual_seed(0)
    with torch.device(device):
        layer = LAYERS[name]()
    assert {t.device for t in _tensors(layer)} == {device}
    x = _inputs(copy.deepcopy(layer).cpu().double()).float().to(device)
    out = layer.train()(x)
    assert out.device == device
    trainable = [p for p in layer.parameters() if p.requires_grad]
    if getattr(layer, "WEIGHT_IN_BUFFERS", False):  # quantized, sparse: nothing to train
        assert not trainable
        return
    aux = getattr(layer, "aux_loss", None)
    (out.square().mean() + (0 if aux is None else aux)).backward()
    assert all(p.grad.device == device for p in trainable if p.grad is not None)
    assert any(p.grad is not None for p in trainable)


@pytest.mark.parametrize("name", [n for n in LAYERS if n != "sparse_linear"])  # from_linear needs data
def test_layer_builds_on_the_meta_device(name):
    """A constructor that names a device (or copies a CPU tensor in) leaves a non-meta tensor.
    The meta device holds no data, so forwards that read values (top-k dispatch, sparse masks)
    are checked on the fake device instead."""
    with torch.device("meta"):  # quantizing reads values: build the storage with its constructor
        layer = QuantizedLinear(D, 8, bits=8, group_size=8) if name == "quantized_linear" else LAYERS[name]()
    assert {t.device.type for t in _tensors(layer)} == {"meta"}


# ---------------------------------------------------------------------------------------------
# Stages and helpers


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters()) + [b for b in module.buffers() if b is not None]


def _float_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Floating-point parameters and buffers, except quantization scales (their own format)."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return [(name, t) for name, t in named if t is not None and t.is_floating_point()
            and not isinstance(module.get_submodule(name.rpartition(".")[0]), QuantizedLinear)]


def _assert_kept(module: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    wrong = [(name, t.dtype) for name, t in _float_tensors(module) if t.dtype != dtype]
    assert not wrong, f"tensors not in {dtype}: {wrong}"
    elsewhere = [name for name, t in list(module.named_parameters()) + list(module.named_buffers())
                 if t is not None and t.device != device]
    assert not elsewhere, f"tensors not on {device}: {elsewhere}"


MODEL_LAYERS = {
    "topk": lambda: TopKMoE(6, D, 32, 5, k=2, activation="relu"),
    "dense": lambda: DenseMoE(6, D, 32, 5, activation="relu"),
    "swiglu": lambda: nn.Sequential(SwiGLUMoE(6, D, 32, k=2), nn.Linear(D, 5)),
}


def _model(kind: str, dtype=torch.float32, device=None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), nn.Tanh(), MODEL_LAYERS[kind]()).to(dtype)
    return model.to(device) if device is not None else model


STAGES = {
    **{f"prune-experts:{score}": (lambda s=score: ExpertPrune(0.5, s)) for score in EXPERT_SCORES},
    "sparsity": lambda: MagnitudePrune(0.5),
    "sparsity-dense-zeros": lambda: MagnitudePrune(0.5, sparse_storage=False),
    "lowrank-rank": lambda: LowRank(rank=4),
    "lowrank-energy": lambda: LowRank(energy=0.8),
    "merge": lambda: MergeExperts(3),
    "int8": lambda: Quantize(8),
    "int4-g8": lambda: Quantize(4, 8),
}


def _check_stage(stage_name: str, kind: str, dtype: torch.dtype, device: torch.device | None) -> None:
    model = _model(kind, dtype, device)
    calibration = torch.randn(64, D, dtype=dtype)
    calibration = calibration.to(device) if device is not None else calibration
    with torch.no_grad():
        before = model(calibration)
    compressed = STAGES[stage_name]().apply(model, calibration)
    _assert_kept(compressed, dtype, device or torch.device("cpu"))
    with torch.no_grad():
        out = compressed(calibration)
    assert out.dtype == dtype and out.device == before.device and out.shape == before.shape
    assert torch.isfinite(out.cpu()).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", MODEL_LAYERS)
@pytest.mark.parametrize("stage_name", STAGES)
def test_stage_keeps_dtype(stage_name, kind, dtype):
    _check_stage(stage_name, kind, dtype, None)


@pytest.mark.parametrize("kind", MODEL_LAYERS)
@pytest.mark.parametrize("stage_name", STAGES)
def test_stage_keeps_device(stage_name, kind, device):
    _check_stage(stage_name, kind, torch.float32, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_compact_linears_built_from_a_linear_keep_its_dtype_and_device(dtype, device):
    for where in (torch.device("cpu"), device):
        linear = nn.Linear(D, 8).to(dtype=dtype, device=where)
        with torch.no_grad():
            linear.weight[linear.weight.abs() < 0.1] = 0
        x = torch.randn(5, D, dtype=dtype, device=where)
        for layer in (low_rank_from_linear(linear, rank=8), low_rank_from_linear(linear, energy=0.9),
                      SparseLinear.from_linear(linear)):
            _assert_kept(layer, dtype, where)
            assert layer(x).dtype == dtype
        sparse = SparseLinear.from_linear(linear)
        assert torch.equal(sparse.weight.cpu(), linear.weight.detach().cpu())
        assert torch.equal(sparse(x).cpu(), linear(x).detach().cpu())
        full = low_rank_from_linear(linear, rank=8)  # full rank: the same map, up to rounding the factors
        with torch.no_grad():
            expected = copy.deepcopy(linear).cpu().double()(x.cpu().double())
            assert _relative_error(full(x).cpu(), expected) <= 4 * TOLERANCE[dtype]
    # values and bias cost their dtype's bytes (a random weight: every value is stored)
    dense = nn.Linear(D, 8)
    size = {t: model_bytes(SparseLinear.from_linear(dense.to(t))) for t in (torch.float32, dtype)}
    saved = (4 - torch.finfo(dtype).bits // 8) * (D * 8 + 8)
    assert size[torch.float32] - size[dtype] == pytest.approx(saved, abs=16)  # safetensors header


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rank_for_energy_on_any_device_and_dtype(dtype, device):
    s = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=dtype)
    expected = rank_for_energy(s.double(), 0.9)
    assert rank_for_energy(s, 0.9) == expected == 2
    assert rank_for_energy(s.to(device), 0.9) == expected


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("on_device", [False, True], ids=["cpu", "fake"])
def test_expert_helpers_keep_dtype_and_device(dtype, on_device, device):
    where = device if on_device else torch.device("cpu")
    torch.manual_seed(0)
    layer = TopKMoE(6, D, 32, 5, k=2).to(dtype=dtype, device=where)
    dense = DenseMoE(6, D, 32, 5).to(dtype=dtype, device=where)
    x = torch.randn(64, D, dtype=dtype, device=where)
    for mixture in (layer, dense):
        usage = expert_usage(mixture, x)
        assert {v.device for v in usage.values()} == {where}
        assert {v.dtype for v in usage.values()} == {torch.float32}
        load = mixture.expert_load(x)
        assert load.counts.device == load.gate_weight.device == where
        for score in EXPERT_SCORES:
            assert len(select_experts(mixture, x, 3, score)) == 3
        assert sorted(sum(group_experts(mixture, x, 3), [])) == list(range(6))
        merged = merge_experts(mixture, x, 3)
        _assert_kept(merged, dtype, where)
        assert merged(x).dtype == dtype
        smaller = prune_hidden_units(mixture, 20)
        _assert_kept(smaller, dtype, where)
        assert smaller(x).dtype == dtype
        for calibration in (x, None):
            shared = base_delta_experts(copy.deepcopy(mixture), 2, calibration)
            _assert_kept(shared, dtype, where)
            assert shared(x).dtype == dtype
            bases = {id(e.base) for e in shared.experts}
            assert len(bases) == 1  # one base tensor, shared


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_base_delta_at_full_rank_reproduces_the_experts(dtype):
    torch.manual_seed(0)
    layer = DenseMoE(4, D, 8, 5).to(dtype)
    x = torch.randn(32, D, dtype=dtype)
    shared = base_delta_experts(copy.deepcopy(layer), 8, x)
    with torch.no_grad():
        expected = layer.double()(x.double())
        out = shared(x)
    assert out.dtype == dtype
    assert _relative_error(out, expected) <= 4 * TOLERANCE[dtype] + 1e-6


def _classifier(dtype=torch.float32, device=None):
    model = _model("topk", dtype, device)
    torch.manual_seed(1)
    x = torch.randn(200, D, dtype=dtype)
    y = torch.randint(0, 5, (200,))
    if device is not None:
        x, y = x.to(device), y.to(device)
    return model, x, y


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("on_device", [False, True], ids=["cpu", "fake"])
def test_compress_pipeline_and_report(dtype, on_device, device):
    where = device if on_device else None
    model, x, y = _classifier(dtype, where)
    result = compress(model, [ExpertPrune(0.5), LowRank(rank=4), MagnitudePrune(0.3, sparse_storage=False),
                              FineTune((x, y), epochs=1, batch_size=50)],
                      calibration=x[:64], evaluate=lambda m: evaluate(m, (x, y))["accuracy"])
    assert [r["stage"] for r in result.records][0] == "original" and len(result.records) == 5
    _assert_kept(result.model, dtype, where or torch.device("cpu"))
    table = report({"original": model, "compressed": result.model}, (x, y), example=x[:8], latency_repeats=1)
    assert list(table.index) == ["original", "compressed"]
    assert (table["bytes"] > 0).all() and table["value"].between(0, 1).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("on_device", [False, True], ids=["cpu", "fake"])
def test_measures_and_routing_matrix(dtype, on_device, device):
    where = device if on_device else None
    model, x, y = _classifier(dtype, where)
    layer = model[2]
    assert model_bytes(model) > 0
    assert active_params_per_token(model) > 0
    assert flops_per_token(model, x[:8]) > 0
    assert latency(model, x[:8], warmup=0, repeats=1) > 0
    inputs = layer_inputs(model, layer, x)
    assert inputs.dtype == dtype and inputs.device == x.device
    groups = torch.arange(len(x)) % 4
    for mixture in (layer, DenseMoE(6, D, 8, 3).to(dtype=dtype, device=x.device)):
        matrix = routing_matrix(mixture, x, groups)
        assert matrix.device == x.device and matrix.shape == (4, 6)
        torch.testing.assert_close(matrix.sum(1).cpu().double(), torch.ones(4, dtype=torch.float64),
                                   rtol=0, atol=1e-5)
    ax = routing_heatmap(matrix)
    assert len(ax.texts) == matrix.numel()
    plt.close(ax.figure)
    shares = measure_shares(model, x)
    assert shares.shape == (6,) and float(shares.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("on_device", [False, True], ids=["cpu", "fake"])
def test_training_helpers_on_a_device(on_device, device):
    where = device if on_device else None
    model, x, y = _classifier(torch.float32, where)
    history = train_recording_shares(model, (x, y), epochs=1, lr=1e-3, batch_size=50, test_data=(x, y))
    assert history.shares.shape == (2, 6) and 0 <= history.accuracy <= 1
    student = _model("topk", torch.float32, where)
    assert len(distill(model, student, (x, y), epochs=1, batch_size=50, progress=False)) == 1
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 3
    classifier = ImageClassifierMoE(num_classes=3, num_experts=4, expert_size=8, channels=(4,),
                                    hidden_size=8, moe="topk")
    if where is not None:
        images, labels, classifier = images.to(where), labels.to(where), classifier.to(where)
    assert len(train(classifier, (images, labels), epochs=1, batch_size=4, progress=False)) == 1
    assert {p.device for p in classifier.parameters()} == {where or torch.device("cpu")}
