"""Save and load models as a safetensors file plus a JSON config: nothing is unpickled.

An artifact is a folder holding ``model.safetensors`` (every tensor of the ``state_dict``,
tensors that share storage written once) and ``config.json``: the class name and
constructor arguments of the model and of every ``moe_lab`` submodule (so a compressed
model, whose experts were replaced, pruned or quantized, is rebuilt as it was), which
``state_dict`` names are aliases of others (re-tied on load), and the sha256 of the weights
file. Its size on disk is what :func:`moe_lab.measure.model_bytes` reports.

:func:`load` treats an artifact as untrusted input. It reads ``config.json`` and the
safetensors header first, builds the model on the ``meta`` device (no memory, no network),
checks every tensor's name, shape and dtype and the file's byte count against that model, then
verifies the sha256 and only then reads the weights, on the CPU. Float tensors come back in
the dtype they were saved in (bitwise); integer and bool tensors must have exactly the dtype
of the slot they fill. Every damaged artifact raises a ``ValueError`` naming the file and the
field; a missing folder or file raises ``FileNotFoundError``.

Versions: 2 (this one) records ``weights_sha256``. Version 1 artifacts (no checksum) still
load, with a warning that their weights are unverified; saving again upgrades them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import uuid
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.modules.module as module_hooks
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import moe_lab.models  # noqa: F401  (registers the case-study models)
from moe_lab.data.paths import sha256
from moe_lab.layers.registry import LAYERS

FORMAT = "moe_lab-artifact"
VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
HF_PREFIX = "transformers:"

MAX_CONFIG_BYTES = 16 << 20  # config.json: class names and constructor arguments, never weights
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_NON_PERSISTENT_BYTES = 1 << 30  # buffers a constructor computes (rotary tables, masks)
REGISTRATION_SLACK = 10_000  # modules / tensors a constructor may create beyond the file's tensors

_TOP_FIELDS = {"format", "version", "class", "config", "aliases", "modules", "weights_sha256"}
_GROUP_FIELDS = {"class", "config", "at"}
_DEVICE_FIELDS = {"device", "device_map", "map_location"}
_FLOAT_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _damaged(path: Path, field: str, problem: str) -> ValueError:
    """The one error for a damaged artifact: the file, the field, what is wrong with it."""
    return ValueError(f"{path}: {field}: {problem}")


# --- transformers, imported quietly and built offline -------------------------------------

def import_transformers():
    """``transformers`` with its model classes loaded, without the torch / torchao log lines
    printed on first import (``register_constant`` deprecation notes a learner cannot act on).
    Only the loggers touched here are changed, and only while importing; warnings filters are
    restored by ``catch_warnings``. Raises ``ImportError`` if transformers is not installed."""
    noisy = [logging.getLogger(name) for name in ("torch.utils._pytree", "torchao")]
    levels = [logger.level for logger in noisy]
    try:
        for logger in noisy:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import transformers
            import transformers.modeling_utils  # noqa: F401  (the import that pulls in torchao)
    finally:
        for logger, level in zip(noisy, levels):
            logger.setLevel(level)
    return transformers


_URL = re.compile(r"[A-Za-z][\w+.-]*://")
# Config fields through which transformers fetches code or weights from elsewhere.
_REMOTE_FIELDS = ("auto_map", "trust_remote_code", "custom_pipelines", "use_pretrained_backbone",
                  "use_timm_backbone")


def _without_labels(value):
    """``value`` without ``_name_or_path`` entries: a label of where a config came from, which
    construction never reads (and a hub id in it fetches nothing)."""
    if isinstance(value, dict):
        return {k: _without_labels(v) for k, v in value.items() if k != "_name_or_path"}
    if isinstance(value, list):
        return [_without_labels(v) for v in value]
    return value


def _offline_problem(value, where: str) -> str | None:
    """Why a transformers config would reach another repository or the network, or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            key, field = str(key), f"{where}.{key}"
            if key in _REMOTE_FIELDS and item not in (None, False, {}, [], ""):
                return f"{field}={item!r} would fetch code or weights from elsewhere"
            if key in _DEVICE_FIELDS:
                return f"{field} is not allowed: load() builds on the CPU (move the model with .to())"
            names_a_source = "backbone" in key or key.endswith(("name_or_path", "_repo", "repo_id"))
            if names_a_source and isinstance(item, str) and item:
                return f"{field}={item!r} refers to another repository; only self-contained configs load"
            problem = _offline_problem(item, field)
            if problem:
                return problem
    elif isinstance(value, list):
        for i, item in enumerate(value):
            problem = _offline_problem(item, f"{where}[{i}]")
            if problem:
                return problem
    elif isinstance(value, str) and (_URL.search(value)):
        return f"{where}={value!r} is a URL; only self-contained configs load"
    return None


@contextlib.contextmanager
def _offline():
    """Belt and braces while a transformers model is built: the hub libraries' offline switch."""
    saved = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({key: "1" for key in saved})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _hf_class(name: str):
    """The transformers model class ``name`` (its module imported now, outside any ``meta``
    device context), or ``ValueError``."""
    transformers = import_transformers()
    try:
        cls = getattr(transformers, name, None)
    except Exception:  # noqa: BLE001  (a lazy import failing means: not a usable class)
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"class {HF_PREFIX + name!r} is not a transformers model")
    return cls


def _prepare(spec) -> None:
    """Import what building ``spec`` needs before the ``meta`` device is made the default."""
    name = spec.get("class") if isinstance(spec, dict) else None
    config = spec.get("config") if isinstance(spec, dict) else None
    if isinstance(name, str) and name.startswith(HF_PREFIX):
        with contextlib.suppress(Exception):  # errors are reported when the model is built
            _hf_class(name[len(HF_PREFIX):])
            import_transformers().models.auto.configuration_auto.CONFIG_MAPPING[config["model_type"]]


def _build_hf(name: str, config: dict, where: str) -> nn.Module:
    cls = _hf_class(name)
    config = _without_labels(config)
    problem = _offline_problem(config, where)
    if problem:
        raise ValueError(problem)
    model_type = config.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ValueError(f"{where}.model_type must name a transformers model type, got {model_type!r}")
    with _offline():
        return cls(import_transformers().AutoConfig.for_model(model_type, **config))


# --- building models from specs ---------------------------------------------------------

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


def _root_spec(model: nn.Module) -> dict | None:
    """The spec of a whole model: a moe_lab class, or a Hugging Face model and its config."""
    spec = _spec(model)
    config = getattr(model, "config", None)
    if spec is None and hasattr(config, "to_dict") and hasattr(config, "model_type"):
        spec = {"class": HF_PREFIX + type(model).__name__, "config": config.to_dict()}
    return spec


def _device_field(value, where: str) -> str | None:
    """The first field naming a device in a moe_lab config (nested dicts included), or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in _DEVICE_FIELDS:
                return f"{where}.{key}"
            found = _device_field(item, f"{where}.{key}")
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _device_field(item, f"{where}[{i}]")
            if found:
                return found
    return None


def _build(spec: dict, where: str) -> nn.Module:
    """The module ``spec`` describes; ``ValueError`` naming ``where`` (a config.json field) if
    it names no loadable class or its arguments do not build one. Any error the constructor
    raises on these (untrusted) arguments means the same."""
    name, config = spec.get("class"), spec.get("config")
    if not isinstance(name, str):
        raise ValueError(f"{where}.class must be a class name (string), got {type(name).__name__}")
    classes = _loadable_classes()
    if not name.startswith(HF_PREFIX) and name not in classes:
        raise ValueError(f"{where}.class: cannot rebuild class {name!r}: load() knows {sorted(classes)} "
                         f"and {HF_PREFIX}<transformers model>")
    if not isinstance(config, dict):
        raise ValueError(f"{where}.config must be an object of constructor arguments, got "
                         f"{type(config).__name__}")
    if not name.startswith(HF_PREFIX):
        device = _device_field(config, f"{where}.config")
        if device:
            raise ValueError(f"{device} is not allowed: load() builds on the CPU (move the model with .to())")
    try:
        if name.startswith(HF_PREFIX):
            return _build_hf(name[len(HF_PREFIX):], config, f"{where}.config")
        return classes[name](**config)
    except _TooLarge:
        raise
    except ValueError as error:
        raise ValueError(f"{where}.config does not build a {name}: {error}") from None
    except Exception as error:  # noqa: BLE001  (untrusted arguments: any failure means "damaged")
        kind = type(error).__name__
        raise ValueError(f"{where}.config does not build a {name} ({kind}: {error})") from None


class _TooLarge(Exception):
    """Raised from the registration hooks when a config builds far more than the file holds."""


@contextlib.contextmanager
def _registration_limit(limit: int):
    """Stop a constructor that registers more than ``limit`` modules / parameters / buffers
    (``num_experts=10**9`` builds nothing on ``meta`` but would loop for hours)."""
    count = [0]

    def hook(*args):
        count[0] += 1
        if count[0] > limit:
            raise _TooLarge(f"the config builds more than {limit:,} modules and tensors")

    handles = [register(hook) for register in (module_hooks.register_module_module_registration_hook,
                                               module_hooks.register_module_parameter_registration_hook,
                                               module_hooks.register_module_buffer_registration_hook)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _set(root: nn.Module, dotted: str, value) -> None:
    parent, _, leaf = dotted.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    if isinstance(value, nn.Parameter) or leaf in owner._parameters:
        owner._parameters[leaf] = value
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        setattr(owner, leaf, value)


def _assemble(root: dict, modules: dict[str, dict]) -> nn.Module:
    """The model of ``root`` with the submodules of ``modules`` (``{name: spec}``) rebuilt in
    place (replaced, pruned, quantized), built on the current default device."""
    model = _build(root, "config")
    for name, (spec, where) in sorted(modules.items(), key=lambda item: item[0].count(".")):
        try:
            current = model.get_submodule(name)
        except AttributeError:
            current = None
        if current is None or _spec(current) != spec:
            parent = name.rpartition(".")[0]
            try:
                model.get_submodule(parent) if parent else model
            except AttributeError:
                raise ValueError(f"{where}: the model has no submodule {parent!r} to hold {name!r}") from None
            _set(model, name, _build(spec, where))
    return model


def _changed_modules(model: nn.Module) -> dict[str, dict]:
    """Specs of the submodules that differ from what the model's own constructor builds."""
    root = _root_spec(model)
    if root is None:
        return {}
    _prepare(root)
    with torch.device("meta"):  # only the structure is compared: no memory, no random init
        fresh = dict(_build(root, "config").named_modules())
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


# --- saving --------------------------------------------------------------------------

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


def _new_file(folder: Path, name: str) -> tuple[Path, int]:
    """A fresh, empty temporary file beside ``folder / name`` and the mode the umask gives it
    (``0o644`` with the usual ``022``)."""
    path = folder / f".{name}.{uuid.uuid4().hex}.tmp"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return path, path.stat().st_mode & 0o777


def save(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` to the folder ``path`` (created if needed); return the folder.

    Any ``nn.Module`` can be saved; :func:`load` rebuilds the classes of ``moe_lab`` whose
    constructor arguments are kept in ``model.config`` (and transformers models). Both files
    are written to temporary names and renamed into place, the old ``config.json`` removed
    first: an interrupted save leaves a folder that does not load, never a mixed one. Files
    get the permissions the umask gives (``0644`` typically).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    unique, aliases = _dedupe(model.state_dict())
    root = _root_spec(model) or {"class": type(model).__name__, "config": None}
    modules = _grouped(_changed_modules(model))
    temporary = []
    try:
        weights, mode = _new_file(folder, WEIGHTS)
        temporary.append(weights)
        save_file(unique, str(weights), metadata={"format": FORMAT})
        os.chmod(weights, mode)  # safetensors writes 0600 whatever the umask
        config = {"format": FORMAT, "version": VERSION, "class": root["class"], "config": root["config"],
                  "aliases": aliases, "modules": modules, "weights_sha256": sha256(weights)}
        text, _ = _new_file(folder, CONFIG)
        temporary.append(text)
        text.write_text(json.dumps(config, sort_keys=True, separators=(",", ":")))
        (folder / CONFIG).unlink(missing_ok=True)
        os.replace(weights, folder / WEIGHTS)
        os.replace(text, folder / CONFIG)
    finally:
        for leftover in temporary:
            leftover.unlink(missing_ok=True)
    return folder


# --- loading -------------------------------------------------------------------------

def _read_json(path: Path, limit: int, what: str):
    if not path.is_file():  # a folder, a pipe or a device would block or mislead
        raise _damaged(path, what, "is not a regular file")
    try:
        size = path.stat().st_size
        if size > limit:
            raise _damaged(path, what, f"{size:,} bytes is more than the {limit:,} a config may have")
        raw = path.read_bytes()
    except OSError as error:
        raise _damaged(path, what, f"cannot be read ({error.strerror or error})") from None
    return _parse_json(raw, path, what)


def _parse_json(raw: bytes, path: Path, what: str):
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _damaged(path, what, "is not UTF-8 text") from None
    except RecursionError:
        raise _damaged(path, what, "is nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, or an integer with too many digits
        raise _damaged(path, what, f"is not valid JSON ({error})") from None


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"no {CONFIG} in {folder}: not a moe_lab artifact")
    config = _read_json(path, MAX_CONFIG_BYTES, "the file")
    if not isinstance(config, dict):
        raise _damaged(path, "the file", f"must hold a JSON object, got {type(config).__name__}")
    unknown = sorted(set(config) - _TOP_FIELDS)
    if unknown:
        hint = (" (load() builds on the CPU; move the model with .to() afterwards)"
                if set(unknown) & _DEVICE_FIELDS else "")
        raise _damaged(path, repr(unknown[0]), f"is not a field of a {FORMAT} config{hint}")
    if config.get("format") != FORMAT:
        raise _damaged(path, "'format'", f"must be {FORMAT!r}, got {config.get('format')!r}")
    version = config.get("version")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise _damaged(path, "'version'", f"{version!r} is not supported (expected one of "
                                          f"{SUPPORTED_VERSIONS})")
    digest = config.get("weights_sha256")
    if version >= 2 and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise _damaged(path, "'weights_sha256'", f"must be 64 lowercase hex digits, got {digest!r}")
    aliases = config.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in aliases.items()):
        raise _damaged(path, "'aliases'", "must map tensor names to tensor names (strings)")
    return config


def _modules(config: dict, path: Path) -> dict[str, tuple[dict, str]]:
    """``{submodule name: (spec, config.json field)}`` from the ``modules`` groups."""
    groups = config.get("modules", [])
    if not isinstance(groups, list):
        raise _damaged(path, "'modules'", "must be a list of {class, config, at}")
    modules = {}
    for i, group in enumerate(groups):
        where = f"modules[{i}]"
        if not isinstance(group, dict) or set(group) != _GROUP_FIELDS:
            raise _damaged(path, where, "must be an object with exactly the fields class, config and at")
        names = group["at"]
        if not isinstance(names, list) or not names:
            raise _damaged(path, f"{where}.at", "must be a non-empty list of submodule names")
        for j, name in enumerate(names):
            if not (isinstance(name, str) and re.fullmatch(r"[\w-]+(\.[\w-]+)*", name)):
                raise _damaged(path, f"{where}.at[{j}]", f"must be a dotted submodule name, got {name!r}")
            if name in modules:
                raise _damaged(path, f"{where}.at[{j}]", f"{name!r} is listed twice")
            modules[name] = ({"class": group["class"], "config": group["config"]}, f"{where}")
    return modules


def _read_header(path: Path) -> tuple[dict[str, dict], int]:
    """The tensors a safetensors file declares, ``{name: {dtype, shape, begin, end}}``, and
    where its data starts; every count and offset checked against the file's size."""
    if not path.exists():
        raise FileNotFoundError(f"no {WEIGHTS} in {path.parent}")
    if not path.is_file():
        raise _damaged(path, "the file", "is not a regular file")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise _damaged(path, "header length", f"the file has {size} bytes: damaged or truncated")
        length = int.from_bytes(head, "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise _damaged(path, "header length", f"{length:,} bytes does not fit in a {size:,}-byte file "
                                                  f"(damaged or truncated)")
        header = _parse_json(handle.read(length), path, "header")
    if not isinstance(header, dict):
        raise _damaged(path, "header", "must be a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _damaged(path, "header.__metadata__", "must map names to strings")
    tensors, end = {}, 0
    for name, info in header.items():
        field = f"header[{name!r}]"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _damaged(path, field, "must be an object with exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
            raise _damaged(path, f"{field}.dtype", f"unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and len(shape) <= 16
                and all(type(d) is int and 0 <= d < 2 ** 48 for d in shape)):
            raise _damaged(path, f"{field}.shape", f"must be a list of sizes, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise _damaged(path, f"{field}.data_offsets", f"must be [begin, end], got {offsets!r}")
        nbytes = math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise _damaged(path, f"{field}.data_offsets", f"span {offsets[1] - offsets[0]:,} bytes but a "
                                                          f"{dtype} {shape} tensor has {nbytes:,}")
        tensors[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": tuple(shape),
                         "begin": offsets[0], "end": offsets[1]}
    for name, info in sorted(tensors.items(), key=lambda item: (item[1]["begin"], item[1]["end"])):
        if info["begin"] != end:
            raise _damaged(path, f"header[{name!r}].data_offsets", "tensors overlap or leave a gap")
        end = info["end"]
    if 8 + length + end != size:
        raise _damaged(path, "data", f"the header describes {end:,} bytes of tensors but the file holds "
                                     f"{size - 8 - length:,} (damaged or truncated)")
    return tensors, 8 + length


def _check_against(model: nn.Module, tensors: dict[str, dict], aliases: dict[str, str],
                   weights: Path, config_path: Path) -> None:
    """Every tensor of the file fills a slot of the (meta) model with the same shape and a
    dtype it may hold; every slot is filled; nothing extra."""
    slots = model.state_dict(keep_vars=True)
    for alias, original in aliases.items():
        if alias not in slots:
            raise _damaged(config_path, f"aliases[{alias!r}]", "names no tensor of the model")
        if original not in tensors or alias in tensors:
            raise _damaged(config_path, f"aliases[{alias!r}]",
                           f"must point at a tensor of {WEIGHTS} ({original!r} is not one)")
    for name in tensors:
        if name not in slots:
            raise _damaged(weights, f"tensor {name!r}", "is not a tensor of the model the config builds")
    for name, slot in slots.items():
        info = tensors.get(name) or tensors.get(aliases.get(name, ""))
        if info is None:
            raise _damaged(weights, f"tensor {name!r}", "is missing (the config builds a model that has it)")
        if info["shape"] != tuple(slot.shape):
            raise _damaged(weights, f"tensor {name!r}", f"has shape {list(info['shape'])} but the config "
                                                        f"builds {list(slot.shape)}")
        stored, wanted = info["dtype"], slot.dtype
        if stored != wanted and not (stored in _FLOAT_DTYPES and wanted in _FLOAT_DTYPES):
            raise _damaged(weights, f"tensor {name!r}", f"is {stored} but the model holds {wanted} there "
                                                        f"(integer and bool tensors keep their exact dtype)")
    persistent = {id(t) for t in slots.values()}
    extra = sum(b.numel() * b.element_size() for b in model.buffers() if id(b) not in persistent)
    if extra > MAX_NON_PERSISTENT_BYTES:
        raise _damaged(config_path, "config", f"the model computes {extra:,} bytes of buffers that are "
                                              f"not saved (more than {MAX_NON_PERSISTENT_BYTES:,})")


def _read_tensors(weights: Path, names) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as handle:
            return {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as error:
        raise _damaged(weights, "data", f"damaged or truncated ({error})") from None


def load(path: str | Path) -> nn.Module:
    """Rebuild a model saved by :func:`save`, on the CPU, in eval mode.

    Raises ``FileNotFoundError`` when the folder or a file is missing and ``ValueError``
    naming the file and field on a damaged artifact (see the module docstring for what is
    checked before any memory is allocated).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: not a moe_lab artifact")
    config_path, weights = folder / CONFIG, folder / WEIGHTS
    config = _read_config(folder)
    modules = _modules(config, config_path)
    aliases = config.get("aliases", {})
    tensors, _ = _read_header(weights)
    root = {"class": config.get("class"), "config": config.get("config")}
    limit = REGISTRATION_SLACK + 16 * len(tensors)
    _prepare(root)
    try:
        with _registration_limit(limit), torch.device("meta"):  # structure only: nothing allocated
            model = _assemble(root, modules)
    except _TooLarge as error:
        raise _damaged(config_path, "config", f"{error}, for a file of {len(tensors):,} tensors") from None
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from None
    _check_against(model, tensors, aliases, weights, config_path)
    if config["version"] >= 2:
        if sha256(weights) != config["weights_sha256"]:
            raise _damaged(weights, "sha256", f"does not match weights_sha256 in {CONFIG}: the file is "
                                              f"damaged or was changed after saving")
    else:
        warnings.warn(f"{folder} is a version-1 moe_lab artifact: its weights carry no checksum and are "
                      f"unverified; save it again to add one", UserWarning, stacklevel=2)
    slots = model.state_dict(keep_vars=True)
    computed = {id(b) for b in model.buffers()} - {id(t) for t in slots.values()}
    if str(root["class"]).startswith(HF_PREFIX) or computed:
        # Buffers the constructor computes (rotary frequencies, masks) are not in the file:
        # build again for real, now that the sizes are known to match the file.
        with _registration_limit(limit):
            model = _assemble(root, modules)
    loaded = _read_tensors(weights, tensors)
    for alias, original in aliases.items():
        loaded[alias] = loaded[original]
    model.load_state_dict(loaded, strict=True, assign=True)  # assign: each tensor keeps its saved dtype
    state = model.state_dict(keep_vars=True)
    for alias, original in aliases.items():  # re-tie what was shared when saved
        _set(model, alias, state[original])
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise _damaged(config_path, "config", "builds a model with tensors the file does not hold")
    return model.eval()
