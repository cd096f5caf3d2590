"""Save and load models as a safetensors file plus a JSON config: nothing is unpickled.

An artifact is a folder holding ``model.safetensors`` (every tensor of the ``state_dict``,
tensors that share storage written once) and ``config.json``: the class name and
constructor arguments of the model and of every ``moe_lab`` submodule (so a compressed
model, whose experts were replaced, pruned or quantized, is rebuilt as it was), and which
``state_dict`` names are aliases of others (re-tied on load). Its size on disk is what
:func:`moe_lab.measure.model_bytes` reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import moe_lab.models  # noqa: F401  (registers the case-study models)
from moe_lab.layers.registry import LAYERS

FORMAT = "moe_lab-artifact"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _loadable_classes() -> dict[str, type[nn.Module]]:
    """Every class registered with :func:`~moe_lab.layers.registry.register_layer`, plus ``nn.Linear``."""
    return {**LAYERS, "Linear": nn.Linear}


def _spec(module: nn.Module) -> dict | None:
    """``{"class", "config"}`` for a module load() can rebuild, else None."""
    if type(module) is nn.Linear:
        return {"class": "Linear", "config": {"in_features": module.in_features,
                                              "out_features": module.out_features,
                                              "bias": module.bias is not None}}
    config = getattr(module, "config", None)
    if isinstance(config, dict) and LAYERS.get(type(module).__name__) is type(module):
        return {"class": type(module).__name__, "config": config}
    return None


HF_PREFIX = "transformers:"


def _root_spec(model: nn.Module) -> dict | None:
    """The spec of a whole model: a moe_lab class, or a Hugging Face model and its config."""
    spec = _spec(model)
    config = getattr(model, "config", None)
    if spec is None and hasattr(config, "to_dict") and hasattr(config, "model_type"):
        spec = {"class": HF_PREFIX + type(model).__name__, "config": config.to_dict()}
    return spec


def _build_hf(spec: dict) -> nn.Module:
    import transformers

    name = spec["class"][len(HF_PREFIX):]
    cls = getattr(transformers, name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise ValueError(f"cannot rebuild class {spec['class']!r}: not a transformers model")
    config = dict(spec["config"])
    return cls(transformers.AutoConfig.for_model(config.pop("model_type"), **config))


def _build(spec: dict, where: str) -> nn.Module:
    classes = _loadable_classes()
    name = spec.get("class") if isinstance(spec, dict) else spec
    if isinstance(name, str) and name.startswith(HF_PREFIX) and isinstance(spec.get("config"), dict):
        return _build_hf(spec)
    if name not in classes or not isinstance(spec.get("config"), dict):
        raise ValueError(f"cannot rebuild class {name!r} at {where or 'the root'}: "
                         f"load() knows {sorted(classes)}")
    try:
        return classes[spec["class"]](**spec["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"config of {spec['class']} at {where or 'the root'} does not build a model "
                         f"({error})") from None


def _changed_modules(model: nn.Module) -> dict[str, dict]:
    """Specs of the submodules that differ from what the model's own constructor builds."""
    root = _root_spec(model)
    if root is None:
        return {}
    with torch.device("meta"):  # only the structure is compared: no memory, no random init
        fresh = dict(_build(root, "").named_modules())
    changed = {}
    for name, module in model.named_modules():
        spec = _spec(module)
        if name and spec is not None and (name not in fresh or _spec(fresh[name]) != spec):
            changed[name] = spec
    return changed


def _grouped(modules: dict[str, dict]) -> list[dict]:
    """``[{class, config, at: [names]}]``: each distinct spec written once (keeps config.json small)."""
    groups: list[dict] = []
    for name, spec in modules.items():
        for group in groups:
            if group["class"] == spec["class"] and group["config"] == spec["config"]:
                group["at"].append(name)
                break
        else:
            groups.append({**spec, "at": [name]})
    return groups


def _ungrouped(groups) -> dict[str, dict]:
    if not isinstance(groups, list):
        raise ValueError("config.json: 'modules' must be a list of {class, config, at}")
    return {name: {"class": g.get("class"), "config": g.get("config")}
            for g in groups for name in g.get("at", [])}


def _set(root: nn.Module, dotted: str, value) -> None:
    parent, _, leaf = dotted.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    if isinstance(value, nn.Parameter) or leaf in owner._parameters:
        owner._parameters[leaf] = value
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        setattr(owner, leaf, value)


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state_dict into unique tensors and ``{alias: original}`` for shared ones."""
    unique, aliases, seen = {}, {}, {}
    for name, tensor in state.items():
        host = tensor.detach().to("cpu", copy=True)  # one copy, in host memory (none on an accelerator)
        if type(host) is not torch.Tensor:
            raise TypeError(f"cannot save {name!r}: it is a {type(tensor).__name__} tensor subclass "
                            f"(torchao and similar runtime formats are for speed, not moe_lab artifacts); "
                            f"save the model before converting it, or use moe_lab.compress.quantize_experts")
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        unique[name] = host.contiguous()
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
    root = _root_spec(model) or {"class": type(model).__name__, "config": None}
    config = {"format": FORMAT, "version": VERSION, "class": root["class"], "config": root["config"],
              "aliases": aliases, "modules": _grouped(_changed_modules(model))}
    (folder / CONFIG).write_text(json.dumps(config, sort_keys=True, separators=(",", ":")))
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
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except FileNotFoundError:
        raise FileNotFoundError(f"no {WEIGHTS} in {folder}") from None
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{folder / WEIGHTS} is damaged or truncated ({error})") from None
    model = _build({"class": config.get("class"), "config": config.get("config")}, "")
    # Rebuild submodules that differ from what the constructor made (replaced, pruned, quantized).
    modules = _ungrouped(config.get("modules", []))
    for name, spec in sorted(modules.items(), key=lambda item: item[0].count(".")):
        try:
            current = model.get_submodule(name)
        except AttributeError:
            current = None
        if current is None or _spec(current) != spec:
            _set(model, name, _build(spec, name))
    aliases = config.get("aliases", {})
    for alias, original in aliases.items():
        if original not in tensors:
            raise ValueError(f"alias {alias!r} points at missing tensor {original!r}")
        tensors[alias] = tensors[original]
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ValueError(f"weights in {folder / WEIGHTS} do not match the config: {error}") from None
    state = model.state_dict(keep_vars=True)
    for alias, original in aliases.items():  # re-tie what was shared when saved
        _set(model, alias, state[original])
    return model.eval()
