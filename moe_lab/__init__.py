"""moe_lab: the tested helpers behind the course "Compressing Mixture-of-Experts Models in Python".

Layers: :class:`SoftMoE` (dense, slide 1), :class:`TopKMoE` (sparse, slides 6 and 8),
:class:`SharedTrunkMoE` (slide 7), :class:`LowRankLinear` (slide 9), :class:`SwiGLUMoE`
(the Mixtral / Qwen-MoE block). Models: :class:`ImageClassifierMoE`, :class:`LanguageModelMoE`.
Submodules: ``routing``, ``compress``, ``measure``, ``evaluate`` (callable:
``evaluate(model, data)``, plus ``evaluate.report``), ``data``, ``training``, ``profiles``,
``artifact``, ``hf``, ``recipes``, ``study``, ``reference`` (the deck's slow layers, for
comparison), ``slot_moe``, ``viz``, ``diagnostics``, ``exercises``.
Importing the package sets no global state (no seeds, threads or warnings filters).
"""

from moe_lab.artifact import load, save
from moe_lab.low_rank import LowRankLinear
from moe_lab.measure import active_params_per_token, flops_per_token, latency, model_bytes, param_count
from moe_lab.models import ImageClassifierMoE, LanguageModelMoE
from moe_lab.profiles import get_profile
from moe_lab.soft_moe import SharedTrunkMoE, SoftMoE
from moe_lab.swiglu_moe import SwiGLUMoE
from moe_lab.topk_moe import TopKMoE, collect_aux_loss
from moe_lab.training import seed_everything, train

from moe_lab import evaluate  # isort: skip  (a callable module: evaluate(model, data) and evaluate.report)

__version__ = "0.1.0"

__all__ = ["ImageClassifierMoE", "LanguageModelMoE", "LowRankLinear", "SharedTrunkMoE", "SoftMoE",
           "SwiGLUMoE",
           "TopKMoE", "active_params_per_token", "collect_aux_loss", "evaluate", "flops_per_token",
           "get_profile", "latency", "load", "model_bytes", "param_count", "save", "seed_everything",
           "train"]
