"""moe_lab: the tested helpers behind the course "Compressing Mixture-of-Experts Models in Python".

Layout (imports only point down this list):

* :mod:`moe_lab.layers`: the mixture layers behind one interface (:class:`~moe_lab.layers.MixtureLayer`:
  router, experts, ``route(x)``, expert load), routing rules, dispatch, and the compact linears
  (low-rank, quantized, sparse, base + delta);
* :mod:`moe_lab.models`: the case-study models; :mod:`moe_lab.data`, :mod:`moe_lab.training`;
* :mod:`moe_lab.measure` (bytes of the saved artifact, parameters, work, latency),
  :mod:`moe_lab.artifact` (``save`` / ``load``);
* :mod:`moe_lab.compress`: the techniques, the stage registry and recipe strings;
* :mod:`moe_lab.stats`, :mod:`moe_lab.diagnostics`, :mod:`moe_lab.evaluation` (``report``),
  :mod:`moe_lab.sweeps`, :mod:`moe_lab.viz`; :mod:`moe_lab.hf` (Hugging Face bridge),
  :mod:`moe_lab.study` (``python -m moe_lab study``), :mod:`moe_lab.exercises`.

``moe_lab.evaluate(model, data)`` scores one model; ``moe_lab.evaluation.report`` compares many.
Importing the package sets no global state (no seeds, threads or warnings filters).
"""

import moe_lab.hf  # noqa: F401  (registers the Hugging Face block for moe_lab.load)
import moe_lab.layers as _layers
from moe_lab.artifact import load, save
from moe_lab.layers import (
    DenseMoE,
    LowRankLinear,
    MixtureLayer,
    SharedTrunkMoE,
    SlotSoftMoE,
    SwiGLUMoE,
    TopKMoE,
    collect_aux_loss,
)
from moe_lab.measure import active_params_per_token, flops_per_token, latency, model_bytes, param_count
from moe_lab.models import ImageClassifierMoE, LanguageModelMoE
from moe_lab.profiles import get_profile
from moe_lab.training import evaluate, seed_everything, train

__version__ = "0.2.0"

__all__ = ["DenseMoE", "ImageClassifierMoE", "LanguageModelMoE", "LowRankLinear", "MixtureLayer",
           "SharedTrunkMoE", "SlotSoftMoE", "SwiGLUMoE", "TopKMoE", "active_params_per_token",
           "collect_aux_loss", "evaluate", "flops_per_token", "get_profile", "latency", "load", "model_bytes",
           "param_count", "save", "seed_everything", "train"]


def __getattr__(name: str):
    if name == "SoftMoE":  # the deprecated name, with its warning, from moe_lab.layers
        return _layers.__getattr__(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
