"""Sweeps: many compressed copies of one trained model, each scored.

* :func:`sweep`: metric against one setting (sparsity, rank, bits...), a fresh copy per point;
* :func:`run_sweep` / :func:`sweep_table`: recipe strings through
  :func:`~moe_lab.compress.compress`, every stage scored, one row per recipe;
* :class:`FeatureCache`: scores compressed image classifiers fast (the conv features of the test
  images are computed once; only the MoE head changes);
* :func:`to_topk`: a trained dense mixture run as a top-``k`` routed one, without retraining.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from numbers import Real
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab.compress.pipeline import FineTune, compress
from moe_lab.compress.recipes import parse_recipe
from moe_lab.layers.dense import DenseMoE
from moe_lab.layers.topk import TopKMoE


def sweep(make_model: Callable[[], nn.Module], settings: Iterable[Any],
          apply: Callable[[nn.Module, Any], nn.Module | None],
          evaluate: Callable[[nn.Module], Real | dict[str, Any]]) -> list[dict[str, Any]]:
    """Measure ``evaluate(apply(make_model(), s))`` for every setting ``s``.

    Args:
        make_model: returns a fresh model each call (e.g. ``lambda: copy.deepcopy(trained)``),
            so that one setting never sees another's changes.
        settings: the values to try (sparsities, numbers of experts kept...), in plot order.
        apply: ``apply(model, setting)`` compresses ``model``; it returns the compressed model
            or ``None`` if it changed ``model`` in place.
        evaluate: ``evaluate(model)`` returns a number or a dict of numbers.

    Returns:
        One record per setting: ``{"setting": s, **metrics}`` for a dict result, else
        ``{"setting": s, "metric": value}``.
    """
    for name, fn in [("make_model", make_model), ("apply", apply), ("evaluate", evaluate)]:
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    settings = list(settings)
    if not settings:
        raise ValueError("settings must hold at least one value")
    records = []
    for setting in settings:
        model = make_model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"make_model must return an nn.Module, got {type(model).__name__}")
        compressed = apply(model, setting)
        result = evaluate(model if compressed is None else compressed)
        if isinstance(result, dict):
            records.append({"setting": setting, **result})
        elif isinstance(result, Real):
            records.append({"setting": setting, "metric": float(result)})
        else:
            raise TypeError(f"evaluate must return a number or a dict, got {type(result).__name__}")
    return records


def run_sweep(model: nn.Module, recipes: list[str], calibration: torch.Tensor, score,
              finetune_data=None, **finetune_options) -> dict:
    """Compress ``model`` with every recipe string; returns ``{recipe: CompressionReport}``.

    Each report's records hold every stage's bytes, ratios and ``score(model)``. A recipe's
    ``finetune=N`` becomes a :class:`~moe_lab.compress.FineTune` of ``N`` epochs on
    ``finetune_data`` (with ``finetune_options``: ``lr``, ``batch_size``...).
    """
    if not recipes:
        raise ValueError("recipes must name at least one recipe string")
    parsed = [(recipe, *parse_recipe(recipe)) for recipe in recipes]  # fail before any work
    results = {}
    for recipe, stages, epochs in parsed:
        if epochs:
            if finetune_data is None:
                raise ValueError(f"recipe {recipe!r} fine-tunes: pass finetune_data")
            stages = stages + [FineTune(finetune_data, epochs=epochs, **finetune_options)]
        results[recipe] = compress(model, stages, calibration, evaluate=score)
    return results


def sweep_table(results: dict):
    """One row per recipe (its final stage): ``bytes``, ``ratio``, ``moe_ratio``, ``accuracy``,
    plus ``stages`` (how many) and the first record as row ``"original"``; a pandas DataFrame."""
    import pandas as pd

    if not results:
        raise ValueError("results is empty")
    first = next(iter(results.values())).records[0]
    rows = [{"recipe": "original", "bytes": first["bytes"], "ratio": 1.0, "moe_ratio": 1.0,
             "accuracy": first["metric"], "stages": 0}]
    for recipe, result in results.items():
        last = result.records[-1]
        rows.append({"recipe": recipe, "bytes": last["bytes"], "ratio": last["ratio"],
                     "moe_ratio": last["moe_ratio"], "accuracy": last["metric"],
                     "stages": len(result.records) - 1})
    return pd.DataFrame(rows).set_index("recipe")


def _features_state(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.features.state_dict().values()]


class FeatureCache:
    """Accuracy of image classifiers that share one trained feature extractor.

    ``FeatureCache(model, images, targets)`` runs ``model.embed`` once on ``images``
    ``(N, 3, H, W)`` and keeps the ``(N, feature_size)`` features. Calling the cache on a
    (compressed) copy of ``model`` returns its accuracy; :meth:`predictions` returns the
    ``(N,)`` predicted classes. A copy whose ``features`` weights or batch-norm statistics
    differ from the cached ones is run in full, so the answer always equals
    ``moe_lab.evaluate(copy, (images, targets))["accuracy"]``.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 256):
        if not all(hasattr(model, name) for name in ("features", "embed", "moe", "classifier")):
            raise TypeError("model must be an ImageClassifierMoE (features, embed, moe, classifier)")
        if images.dim() != 4 or images.shape[0] != targets.shape[0]:
            raise ValueError(f"images must be (N, 3, H, W) with N == len(targets), got {tuple(images.shape)} "
                             f"and {tuple(targets.shape)}")
        self.images, self.targets, self.batch_size = images, targets, batch_size
        self.state = _features_state(model)
        self.features = self._embed(model)  # (N, feature_size)

    @torch.no_grad()
    def _embed(self, model: nn.Module) -> torch.Tensor:
        model.eval()
        return torch.cat([model.embed(chunk) for chunk in self.images.split(self.batch_size)])

    def _same_features(self, model: nn.Module) -> bool:
        state = list(model.features.state_dict().values())
        return len(state) == len(self.state) and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(state, self.state))

    @torch.no_grad()
    def predictions(self, model: nn.Module) -> torch.Tensor:
        """Predicted class per image ``(N,)`` (the model is put in eval mode)."""
        model.eval()
        feats = self.features if self._same_features(model) else self._embed(model)
        # the head of ImageClassifierMoE.forward (dropout is the identity in eval mode)
        logits = torch.cat([model.classifier(model.dropout(F.relu(model.moe(chunk))))
                            for chunk in feats.split(self.batch_size)])
        return logits.argmax(dim=-1)

    def correct(self, model: nn.Module) -> torch.Tensor:
        """``(N,)`` booleans: which images ``model`` classifies correctly."""
        return self.predictions(model) == self.targets

    def __call__(self, model: nn.Module) -> float:
        return int(self.correct(model).sum()) / self.targets.numel()


def to_topk(model: nn.Module, k: int) -> nn.Module:
    """A copy of ``model`` whose :class:`DenseMoE` ``moe`` runs as a :class:`TopKMoE` with the same
    trained experts, router and output: each input uses its ``k`` highest-gated experts, their
    gates renormalised (``softmax_topk``). With ``k == num_experts`` it computes the same function.
    A :class:`TopKMoE` ``moe`` (the course's CIFAR-10 model) keeps its own routing rule with ``k``
    experts per input instead (``k == num_experts``: every expert runs, its softmax over all)."""
    if not isinstance(getattr(model, "moe", None), (DenseMoE, TopKMoE)):
        raise TypeError("model.moe must be a DenseMoE or a TopKMoE")
    dense = model.moe
    cfg = dense.config
    if not 1 <= k <= cfg["num_experts"]:
        raise ValueError(f"k must be in [1, {cfg['num_experts']}], got {k}")
    if isinstance(dense, TopKMoE):
        routed = TopKMoE(**{**cfg, "k": k})
    else:
        routed = TopKMoE(cfg["num_experts"], cfg["input_size"], cfg["expert_size"], cfg["output_size"], k=k,
                         activation=cfg["activation"], routing="softmax_topk")
    routed.load_state_dict(dense.state_dict())
    out = copy.deepcopy(model)
    out.moe = routed
    if isinstance(getattr(out, "config", None), dict) and "moe" in out.config:
        out.config = {**out.config, "moe": "topk", "k": k}
    return out.eval()
