"""int8 / int4 experts as a compressed-tensors checkpoint, the quantized format transformers reads.

transformers 5 keeps a model's routed experts as fused float tensors, so a quantized expert has
no place in the model itself. What it does read is a `compressed-tensors
<https://github.com/neuralmagic/compressed-tensors>`_ checkpoint in the family's *original*
layout (one ``gate`` / ``up`` / ``down`` linear per expert, as Mixtral, OLMoE, Qwen and
DeepSeek-V3 checkpoints are published) with ``quantization_config.dequantize = true``: it
unpacks the integers and scales while loading and builds the usual fused float experts, on CPU
too. The checkpoint holds moe_lab's int8 / int4 values and scales exactly, at their size on
disk, and reloads to the very weights moe_lab computes with; in memory the reloaded model is
float. Loading needs the ``compressed-tensors`` package; writing does not.

Families published with fused experts (GPT-OSS, Llama 4, Granite-MoE) have no per-expert
linear to hold the integers, and are refused.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moe_lab.hf.convert import hf_state
from moe_lab.layers.compact.quantized import QuantizedLinear, unpack_int4


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' ``pack-quantized`` layout: int8 ``values`` ``(rows, cols)`` in
    ``[-2**(bits-1), 2**(bits-1))``, shifted to unsigned and packed ``32 // bits`` to an int32
    (element ``i`` of a row at bit ``i * bits``): ``(rows, ceil(cols * bits / 32))``."""
    per_word = 32 // bits
    rows, cols = values.shape
    unsigned = (values.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    unsigned = torch.nn.functional.pad(unsigned, (0, -cols % per_word))
    shifts = torch.arange(per_word, dtype=torch.int64, device=values.device) * bits
    words = (unsigned.reshape(rows, -1, per_word) << shifts).sum(dim=-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


class _Rows:
    """Hands out ``(out, 1)`` int64 markers in place of weights, the ``n``-th row handed out
    holding ``n``: after transformers rearranges the tensors into its original checkpoint
    layout, every row still says which linear and row it came from (one number per row: no
    float copy of the experts is ever made)."""

    def __init__(self):
        self.owners = []

    def __call__(self, module: nn.Module, where: str) -> torch.Tensor:
        first = len(self.owners)
        self.owners += [(module, r) for r in range(module.out_features)]
        return torch.arange(first, len(self.owners)).unsqueeze(1)

    def decode(self, key: str, value: torch.Tensor, model_name: str) -> tuple[nn.Module, int, int]:
        """The linear and row range ``[start, stop)`` a rearranged marker tensor holds."""
        if value.dim() == 2 and value.shape[1] == 1:
            owners = [self.owners[i] for i in value[:, 0].tolist()]
            module, start = owners[0]
            if (all(m is module for m, _ in owners)
                    and [r for _, r in owners] == list(range(start, start + len(owners)))):
                return module, start, start + len(owners)
        raise ValueError(f"{model_name} checkpoints store these experts fused ({key}), not as one linear "
                         f"per expert: compressed-tensors has no place for moe_lab's int8/int4 experts; save "
                         f"with moe_lab.save instead")


def quantized_checkpoint(fresh: nn.Module, blocks: list, state: dict[str, torch.Tensor], dtype: torch.dtype
                         ) -> tuple[dict[str, torch.Tensor], dict]:
    """The compressed-tensors checkpoint of a model whose converted ``blocks`` (``(name, layer,
    family)``) hold :class:`QuantizedLinear` weights: ``(tensors in the original layout,
    quantization_config)``. ``fresh`` is the transformers model of that architecture (its
    structure only: it may live on the meta device), ``state`` the model's other tensors,
    ``dtype`` its dtype.

    The integers are moe_lab's; the scales are written in the model's dtype, as
    compressed-tensors checkpoints hold them (transformers dequantizes experts in the scales'
    dtype): exact in float32, rounded from float16 in bfloat16 (a relative 2**-9 at most).
    """
    from transformers.core_model_loading import revert_weight_conversion

    schemes = {(m.bits, m.group_size) for _, layer, _ in blocks for m in layer.modules()
               if isinstance(m, QuantizedLinear)}
    if len(schemes) != 1:
        raise ValueError(f"the experts use several quantization schemes (bits, group size) "
                         f"{sorted(schemes, key=str)}: a compressed-tensors checkpoint written here holds "
                         f"one")
    (bits, group_size), = schemes
    rows = _Rows()
    marked = {f"{name}.{key}": value for name, layer, family in blocks
              for key, value in hf_state(layer, family, weight=rows).items()}
    original = revert_weight_conversion(fresh, dict(state))
    for key, value in revert_weight_conversion(fresh, marked).items():
        if value.is_floating_point():  # a real tensor (a bias): as it is
            original[key] = value
            continue
        module, start, stop = rows.decode(key, value, type(fresh).__name__)
        if not isinstance(module, QuantizedLinear):  # a float linear (the router)
            original[key] = module.weight[start:stop]
            continue
        values = unpack_int4(module.qweight, module.in_features) if module.bits == 4 else module.qweight
        prefix = key.removesuffix("weight")
        original[f"{prefix}weight_packed"] = pack_int32(values[start:stop], bits)
        original[f"{prefix}weight_scale"] = module.scales[start:stop].to(dtype)
        original[f"{prefix}weight_shape"] = torch.tensor([stop - start, module.in_features])
    weights = dict(num_bits=bits, type="int", symmetric=True, strategy="group" if group_size else "channel",
                   group_size=group_size, dynamic=False, actorder=None, observer="minmax")
    group = dict(targets=["re:.*experts.*", "re:.*shared_expert.*"], weights=weights,
                 input_activations=None, output_activations=None, format="pack-quantized")
    config = dict(quant_method="compressed-tensors", format="pack-quantized",
                  quantization_status="compressed", dequantize=True, ignore=[], kv_cache_scheme=None,
                  config_groups={"group_0": group})
    return original, config
