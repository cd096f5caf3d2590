"""Composing compression stages, measuring bytes and quality after each one.

``compress(model, [ExpertPrune(0.25), LowRank(energy=0.9), Quantize(8), FineTune(data)],
calibration=x, evaluate=fn)`` applies the stages in order to a copy of ``model``. Every
stage starts from the previous stage's trained weights (never from a fresh initialisation,
the deck's mistake on slide 10), and the report records the saved bytes of the whole model
and of its MoE layers, and ``evaluate(model)`` if given, after every stage.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from moe_lab.compress.registry import Stage, check_composition
from moe_lab.compress.targets import moe_layers
from moe_lab.fidelity import compare_routing, routing_of
from moe_lab.layers.compact.base import CompactLinear
from moe_lab.measure import model_bytes, moe_bytes, param_count
from moe_lab.training import train


@dataclass
class FineTune(Stage):
    """A short training run on ``data`` (a DataLoader or ``(inputs, targets)``): it updates
    the parameters that are still float (quantized and sparse weights are buffers and stay)."""

    data: object
    epochs: int = 1
    lr: float = 1e-3
    task: str = "classification"
    batch_size: int = 128
    max_steps: int | None = None

    per_layer = False

    @property
    def name(self) -> str:
        return f"fine-tune {self.epochs} epoch(s)"

    @property
    def recipe(self) -> str:
        return f"finetune={self.epochs}"

    def apply(self, model: nn.Module, calibration: torch.Tensor) -> nn.Module:
        if any(p.requires_grad for p in model.parameters()):
            train(model, self.data, epochs=self.epochs, lr=self.lr, task=self.task,
                  batch_size=self.batch_size, max_steps=self.max_steps, progress=False)
        return model.eval()


@dataclass
class CompressionReport:
    """The compressed model and one record per stage (``"original"`` first).

    Each record: ``stage``, ``bytes`` (whole model, saved), ``ratio`` (original / now),
    ``moe_bytes`` and ``moe_ratio`` (the MoE layers alone), ``params`` (trainable float
    parameters left; quantized and sparse weights are buffers, counted in ``bytes``),
    ``params_logical`` and ``params_stored`` (see :func:`param_counts`), ``metric``
    (``evaluate(model)``, or ``None``), ``router_agreement``, ``router_kl`` and
    ``router_changed`` (router fidelity against the original model, :mod:`moe_lab.fidelity`,
    or ``None``) and ``details`` (the stage's own report, e.g. GPTQ's per-expert table, or ``None``).
    """

    model: nn.Module
    records: list[dict] = field(default_factory=list)

    def table(self) -> str:
        """The records as an aligned text table."""
        fidelity = any(r.get("router_agreement") is not None for r in self.records)
        lines = [f"{'stage':<42} {'bytes':>10} {'ratio':>6} {'MoE bytes':>10} {'MoE ratio':>9} {'metric':>8}"
                 + (f" {'routing kept':>12}" if fidelity else "")]
        for r in self.records:
            metric = "" if r["metric"] is None else f"{r['metric']:.4f}"
            agreement = "" if r.get("router_agreement") is None else f"{r['router_agreement']:.3f}"
            lines.append(f"{r['stage']:<42} {r['bytes']:>10,} {r['ratio']:>6.2f} {r['moe_bytes']:>10,} "
                         f"{r['moe_ratio']:>9.2f} {metric:>8}" + (f" {agreement:>12}" if fidelity else ""))
        return "\n".join(lines)


def param_counts(model: nn.Module) -> dict[str, int]:
    """``params_logical``: the weights the model stands for, a quantized or sparse layer counted
    at its full ``in * out`` (+ bias), so quantization does not change it while pruning,
    merging and low-rank factors do; ``params_stored``: the numbers its artifact stores, every
    entry of every saved tensor (float parameters, int8 values, packed int4 bytes, bitmask
    bytes, scales). Shared tensors count once in both."""
    logical, seen = 0, set()
    for module in model.modules():
        if isinstance(module, CompactLinear) and module.WEIGHT_IN_BUFFERS:
            logical += 0 if id(module) in seen else module.logical_params()
            seen.add(id(module))
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                logical += p.numel()
    stored, saved = 0, set()
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key not in saved:
            saved.add(key)
            stored += t.numel()
    return {"params_logical": logical, "params_stored": stored}


def compress(model: nn.Module, stages: list, calibration: torch.Tensor, evaluate=None,
             copy_model: bool = True, fidelity_inputs=None) -> CompressionReport:
    """Apply ``stages`` in order (to a copy of ``model`` unless ``copy_model=False``).

    ``calibration`` is a batch of model inputs used by stages that look at routing or
    outputs; ``evaluate(model) -> float`` (accuracy, perplexity...) is called after each
    stage if given; with ``fidelity_inputs`` (model inputs, see :func:`moe_lab.fidelity.routing_of`)
    every record gets the router fidelity against the original model on them. A stage's
    ``last_report`` (if it has one) becomes its record's ``details``. Returns a
    :class:`CompressionReport`.
    """
    if not moe_layers(model):
        raise ValueError("model has no mixture-of-experts layer to compress")
    for stage in stages:
        if not isinstance(stage, Stage):
            raise TypeError(f"stages must be compression stages (ExpertPrune, LowRank, Quantize, ...), "
                            f"got {type(stage).__name__}")
    check_composition(stages)
    model = copy.deepcopy(model) if copy_model else model
    model.eval()
    report = CompressionReport(model=model)
    first = {}

    def record(stage_name: str, details: list | None = None) -> None:
        size, moe = model_bytes(model), moe_bytes(model)
        first.setdefault("bytes", size)
        first.setdefault("moe", moe)
        with torch.no_grad():
            metric = None if evaluate is None else float(evaluate(model))
        fidelity = {} if reference is None else compare_routing(reference, routing_of(model, fidelity_inputs))
        router = {f"router_{key}": fidelity.get(key) for key in ("agreement", "kl", "changed")}
        report.records.append({"stage": stage_name, "bytes": size, "ratio": first["bytes"] / size,
                               "moe_bytes": moe, "moe_ratio": first["moe"] / moe,
                               "params": param_count(model), **param_counts(model), "metric": metric,
                               **router, "details": details})

    reference = None if fidelity_inputs is None else routing_of(model, fidelity_inputs)
    record("original")
    for stage in stages:
        model = stage.apply(model, calibration)
        report.model = model
        record(stage.name, getattr(stage, "last_report", None))
    return report
