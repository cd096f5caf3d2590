"""A converted MoE block inside its Hugging Face model.

:class:`HFMoEBlock` holds the mixture layer (``moe``, a :class:`~moe_lab.layers.swiglu.SwiGLUMoE`
the compression stages work on) and makes it behave, towards the rest of the model, like the
block it replaced: it returns what the family's decoder layer unpacks, and it hands its router
logits to transformers' output recorder, so ``model(ids, labels=ids, output_router_logits=True)``
still computes the load-balancing loss after pruning, merging or quantization.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from moe_lab.hf.families import BY_NAME, RETURNS
from moe_lab.layers.registry import register_layer


@functools.cache
def _collector():
    """transformers' context variable holding the outputs a forward pass records (``None``
    without transformers). Imported on first use: transformers is an optional extra and
    ``import moe_lab`` should not pay for it."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return None
    return _active_collector


def report_router_logits(logits: torch.Tensor) -> None:
    """Append ``logits`` ``(n, E)`` to the router logits transformers is collecting, if a forward
    pass with ``output_router_logits=True`` is running (as its router-class hooks would)."""
    variable = _collector()
    collected = None if variable is None else variable.get()
    if collected is not None and "router_logits" in collected:
        collected["router_logits"].append(logits)


@register_layer
class HFMoEBlock(nn.Module):
    """The mixture layer ``moe`` in place of a Hugging Face MoE block of ``family``.

    ``forward(x)`` with ``x`` ``(batch, time, H)`` returns ``moe(x)``, or for ``returns=
    "hidden_and_scores"`` (GPT-OSS) ``(moe(x), gates (n, k))`` and for ``"hidden_and_logits"``
    (Llama 4) ``(moe(x), router logits (n, E))``, as the original block did.
    """

    def __init__(self, family: str, returns: str = "hidden"):
        super().__init__()
        if family not in BY_NAME:
            raise ValueError(f"family must be one of {sorted(BY_NAME)}, got {family!r}")
        if returns not in RETURNS:
            raise ValueError(f"returns must be one of {RETURNS}, got {returns!r}")
        self.config = dict(family=family, returns=returns)
        self.moe = None  # set by around() (or by moe_lab.load, which rebuilds it separately)

    @classmethod
    def around(cls, moe: nn.Module, family: str) -> HFMoEBlock:
        """``moe`` wrapped for a block of ``family`` (a name of :data:`~moe_lab.hf.families.BY_NAME`)."""
        block = cls(family, BY_NAME[family].returns if family in BY_NAME else "hidden")
        block.moe = moe
        return block

    def forward(self, hidden_states: torch.Tensor):
        out = self.moe(hidden_states)
        logits = self.moe.router_logits
        report_router_logits(logits)
        if self.config["returns"] == "hidden_and_scores":
            return out, self.moe.last_routing.gates
        if self.config["returns"] == "hidden_and_logits":
            return out, logits
        return out
