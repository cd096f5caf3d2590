"""Save and load models as a safetensors file plus a JSON config: nothing is unpickled.

An artifact is a folder holding ``model.safetensors`` (every tensor of the ``state_dict``,
tensors that share storage written once) and ``config.json`` (the class name, its
constructor arguments and which ``state_dict`` names are aliases of others). Its size on disk
is what :func:`moe_lab.measure.model_bytes` reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "moe_lab-artifact"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _loadable_classes() -> dict[str, type[nn.Module]]:
    from moe_lab.compress.quantize import QuantizedLinear
    from moe_lab.low_rank import LowRankLinear
    from moe_lab.models import ImageClassifierMoE, LanguageModelMoE
    from moe_lab.soft_moe import SharedTrunkMoE, SoftMoE
    from moe_lab.topk_moe import TopKMoE

    classes = [SoftMoE, SharedTrunkMoE, TopKMoE, LowRankLinear, QuantizedLinear, ImageClassifierMoE,
               LanguageModelMoE]
    return {cls.__name__: cls for cls in classes}


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state_dict into unique tensors and ``{alias: original}`` for shared ones."""
    unique, aliases, seen = {}, {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        unique[name] = tensor.detach().contiguous().clone()
    return unique, aliases


def save(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` to the folder ``path`` (created if needed); return the folder.

    Any ``nn.Module`` can be saved; :func:`load` rebuilds the classes of ``moe_lab`` whose
    constructor arguments are kept in ``model.config``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    unique, aliases = _dedupe(model.state_dict())
    save_file(unique, str(folder / WEIGHTS), metadata={"format": FORMAT})
    config = {"format": FORMAT, "version": VERSION, "class": type(model).__name__,
              "config": getattr(model, "config", None), "aliases": aliases}
    (folder / CONFIG).write_text(json.dumps(config, indent=1, sort_keys=True))
    return folder


def load(path: str | Path) -> nn.Module:
    """Rebuild a model saved by :func:`save`. Raises ``ValueError`` on a damaged artifact."""
    folder = Path(path)
    try:
        config = json.loads((folder / CONFIG).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {CONFIG} in {folder}: not a moe_lab artifact") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{folder / CONFIG} is not valid JSON ({error})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG} is not a {FORMAT} config")
    if config.get("version") != VERSION:
        raise ValueError(f"artifact version {config.get('version')!r} is not supported (expected {VERSION})")
    classes = _loadable_classes()
    if config.get("class") not in classes or not isinstance(config.get("config"), dict):
        raise ValueError(f"cannot rebuild class {config.get('class')!r}: load() knows {sorted(classes)}")
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except FileNotFoundError:
        raise FileNotFoundError(f"no {WEIGHTS} in {folder}") from None
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{folder / WEIGHTS} is damaged or truncated ({error})") from None
    aliases = config.get("aliases", {})
    for alias, original in aliases.items():
        if original not in tensors:
            raise ValueError(f"alias {alias!r} points at missing tensor {original!r}")
        tensors[alias] = tensors[original]
    try:
        model = classes[config["class"]](**config["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"config of {config['class']} does not build a model ({error})") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ValueError(f"weights in {folder / WEIGHTS} do not match the config: {error}") from None
    return model.eval()
