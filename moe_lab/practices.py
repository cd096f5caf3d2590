"""Helpers for notebooks 13 (evaluation) and 14 (trade-offs and best practices).

* :class:`FeatureCache` scores many compressed copies of an :class:`~moe_lab.ImageClassifierMoE`
  quickly: compression only touches the MoE head, so the conv features of the test images are
  computed once (and recomputed only for a copy whose feature extractor changed, e.g. after a
  fine-tune).
* :func:`mcnemar_p`, :func:`two_proportion_p` and :func:`n_for_difference`: is an accuracy
  difference real, or noise of a finite test set?
* :func:`to_topk`: the same trained dense mixture run as a top-``k`` routed one (conditional
  computation without retraining).
* :func:`run_sweep`: a list of recipe strings through :func:`~moe_lab.recipes.parse_recipe` and
  :func:`~moe_lab.compress.compress`, every stage scored.
* :func:`verdict`: ``True`` / ``False`` / ``None`` -> ``"held"`` / ``"did not hold"`` / ``"n/a here"``.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab.compress.pipeline import FineTune, compress
from moe_lab.recipes import parse_recipe
from moe_lab.soft_moe import SoftMoE
from moe_lab.topk_moe import TopKMoE


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


def per_class_accuracy(correct: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Accuracy per class ``(num_classes,)`` from ``(N,)`` correctness flags and labels."""
    hits = torch.bincount(targets[correct.bool()], minlength=num_classes).double()
    totals = torch.bincount(targets, minlength=num_classes).double()
    return hits / totals.clamp(min=1)


def mcnemar_p(correct_a: torch.Tensor, correct_b: torch.Tensor) -> float:
    """Two-sided exact McNemar p-value: do two models, scored on the *same* test images, differ?

    Only the discordant images count (``a`` right and ``b`` wrong, or the reverse); under
    "no difference" each is a fair coin flip, so the p-value is a binomial tail.
    """
    correct_a, correct_b = correct_a.bool().reshape(-1), correct_b.bool().reshape(-1)
    if correct_a.shape != correct_b.shape:
        raise ValueError(f"correct_a and correct_b differ in length "
                         f"({correct_a.numel()} vs {correct_b.numel()})")
    only_a = int((correct_a & ~correct_b).sum())
    only_b = int((~correct_a & correct_b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + confidence / 2)))


def two_proportion_p(acc_a: float, acc_b: float, n: int) -> float:
    """Two-sided p-value of a two-proportion z-test for accuracies measured on ``n`` images each
    (independent test sets; on the same images use :func:`mcnemar_p`, which is sharper)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    pooled = (acc_a + acc_b) / 2
    se = math.sqrt(2 * pooled * (1 - pooled) / n)
    if se == 0:
        return 1.0 if acc_a == acc_b else 0.0
    return math.erfc(abs(acc_a - acc_b) / se / math.sqrt(2))


def n_for_difference(accuracy: float, difference: float, confidence: float = 0.95) -> int:
    """Test-set size at which an accuracy ``difference`` (e.g. 0.005) around ``accuracy`` becomes
    significant in a two-proportion test at ``confidence`` (no power margin)."""
    if not 0 < accuracy < 1 or difference <= 0:
        raise ValueError(f"need 0 < accuracy < 1 and difference > 0, got {accuracy}, {difference}")
    return math.ceil(2 * _z(confidence) ** 2 * accuracy * (1 - accuracy) / difference ** 2)


def to_topk(model: nn.Module, k: int) -> nn.Module:
    """A copy of ``model`` whose :class:`SoftMoE` ``moe`` runs as a :class:`TopKMoE` with the same
    trained experts, router and output: each input uses its ``k`` highest-gated experts, their
    gates renormalised (``softmax_topk``). With ``k == num_experts`` it computes the same function."""
    if not isinstance(getattr(model, "moe", None), SoftMoE):
        raise TypeError("model.moe must be a SoftMoE")
    dense = model.moe
    cfg = dense.config
    if not 1 <= k <= cfg["num_experts"]:
        raise ValueError(f"k must be in [1, {cfg['num_experts']}], got {k}")
    routed = TopKMoE(cfg["num_experts"], cfg["input_size"], cfg["expert_size"], cfg["output_size"], k=k,
                     activation=cfg["activation"], routing="softmax_topk")
    routed.load_state_dict(dense.state_dict())
    out = copy.deepcopy(model)
    out.moe = routed
    if isinstance(getattr(out, "config", None), dict) and "moe" in out.config:
        out.config = {**out.config, "moe": "topk", "k": k}
    return out.eval()


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


def verdict(held: bool | None) -> str:
    """``"held"``, ``"did not hold"`` or ``"n/a here"`` (for ``None``)."""
    if held is None:
        return "n/a here"
    return "held" if bool(held) else "did not hold"
