"""A stand-in accelerator for CPU-only test machines: the ``fake`` device.

Tensors on it are :class:`FakeDeviceTensor` objects: they report ``device == fake:0`` and hold
a real CPU tensor (``.raw``), so every op computes real numbers, but, as on CUDA:

* an op that mixes them with a CPU tensor raises ``RuntimeError("Expected all tensors to be
  on the same device ...")``. Allowed, as on CUDA: copies between devices (``copy_``,
  ``.to``), CPU index tensors in advanced indexing (``x[cpu_index]``), and 0-dim CPU tensors
  in pointwise ops (``x * torch.tensor(2.0)``). A 0-dim CPU tensor elsewhere (``searchsorted``,
  ``stack``, ``index_add_``...) raises, as CUDA does;
* ``.numpy()`` raises (call ``.cpu()`` first); ``.item()``, ``.tolist()`` and ``int(...)`` work
  (they synchronise on CUDA);
* ``torch.zeros(..., device=x.device)``, ``torch.tensor(data, device=...)``,
  ``module.to(device)``, ``with torch.device(device):`` and ``copy.deepcopy`` give fake
  tensors; a factory call without ``device=`` gives a CPU tensor, which the first op mixing it
  with the model's tensors reports.

So a test that moves a model and its inputs to :func:`fake_device` and runs a tool catches a
tensor the tool creates on the default device and then uses with the model's tensors, a
``.numpy()`` without ``.cpu()``, and a result returned on the wrong device. It does not catch a
tensor created on the CPU and never combined with a device tensor (check the device of what
a tool returns), nor CUDA-only numerics or performance.

How it works: PyTorch's "PrivateUse1" backend slot is renamed ``fake`` and given a Python
device guard (``torch.utils.backend_registration``, an experimental PyTorch API; the tests
that need it are skipped when it is missing). Ops on fake tensors reach
:meth:`FakeDeviceTensor.__torch_dispatch__`, which checks devices, runs the op on the CPU
tensors and wraps the results; tensor creation on the device (``empty``, ``empty_strided``,
``_copy_from``) is registered for the backend. The backend reports itself unavailable
(``torch.accelerator.is_available()`` stays false), so other tests in the same process are
not steered towards it.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_map

NAME = "fake"
_aten = torch.ops.aten
# Ops that CUDA allows to mix devices: copies, and CPU indices in advanced indexing.
_MIXING_ALLOWED = {_aten.copy_.default, _aten._to_copy.default, _aten._copy_from.default,
                   _aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default,
                   _aten._index_put_impl_.default}
_registered: list = []  # the library, hooks and guard, kept alive once registered


class FakeDeviceTensor(torch.Tensor):
    """A tensor on the ``fake`` device holding a real CPU tensor ``raw`` (see the module doc)."""

    raw: torch.Tensor

    @staticmethod
    def __new__(cls, raw: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, raw.shape, strides=raw.stride(), storage_offset=raw.storage_offset(), dtype=raw.dtype,
            layout=raw.layout, device=torch.device(NAME, 0), requires_grad=raw.requires_grad)

    def __init__(self, raw: torch.Tensor):
        self.raw = raw

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:
        return f"FakeDeviceTensor({self.raw!r})"

    def tolist(self):
        return self.raw.tolist()

    def untyped_storage(self):
        return self.raw.untyped_storage()  # its data_ptr identifies aliases, as on a real device

    def numpy(self, *args, **kwargs):
        raise TypeError(f"can't convert {self.device} device type tensor to numpy. "
                        f"Use Tensor.cpu() to copy the tensor to host memory first.")

    __array__ = numpy

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _is_fake_device(device) -> bool:
    return device is not None and torch.device(device).type == NAME


def _check_devices(func, tensors: list[torch.Tensor]) -> None:
    if func in _MIXING_ALLOWED:
        return
    pointwise = torch.Tag.pointwise in func.tags
    for t in tensors:
        if isinstance(t, FakeDeviceTensor) or (pointwise and t.dim() == 0 and t.device.type == "cpu"):
            continue
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two "
                           f"devices, {NAME}:0 and {t.device}! (in {func})")


def _run(func, args, kwargs):
    """Run ``func`` on the CPU tensors behind the fake ones; wrap what it returns when the
    result lives on the fake device (an input was fake, or ``device=`` names it)."""
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    fakes = [t for t in tensors if isinstance(t, FakeDeviceTensor)]
    if fakes:
        _check_devices(func, tensors)
    device = kwargs.get("device")
    on_fake = _is_fake_device(device) if device is not None else bool(fakes)
    owners = {id(t.raw): t for t in fakes}

    def unwrap(x):
        if isinstance(x, FakeDeviceTensor):
            return x.raw
        if isinstance(x, torch.device) and x.type == NAME:
            return torch.device("cpu")
        return x

    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
    if not on_fake:
        return out

    def wrap(x):
        if not isinstance(x, torch.Tensor):
            return x
        # an in-place op returns its input: hand back the same fake tensor, not a second wrapper
        return owners[id(x)] if id(x) in owners else FakeDeviceTensor(x)

    return tree_map(wrap, out)


def _empty(size, *, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return FakeDeviceTensor(torch.empty(size, dtype=dtype, layout=layout,
                                        memory_format=memory_format or torch.contiguous_format))


def _empty_strided(size, stride, *, dtype=None, layout=None, device=None, pin_memory=None):
    return FakeDeviceTensor(torch.empty_strided(size, stride, dtype=dtype, layout=layout))


def _copy_from(source, destination, non_blocking=False):
    destination.raw.copy_(source.raw if isinstance(source, FakeDeviceTensor) else source)
    return destination


class _Module:
    """What ``torch.fake`` must offer; the device reports itself unavailable."""

    def is_initialized(self) -> bool:
        return True

    def is_available(self) -> bool:
        return False

    def current_device(self) -> int:
        return 0

    def device_count(self) -> int:
        return 1

    def _is_in_bad_fork(self) -> bool:
        return False

    def manual_seed_all(self, seed: int) -> None:
        pass


def fake_device() -> torch.device:
    """The ``fake:0`` device, registering the backend on first use (once per process).

    Raises ``RuntimeError`` if this PyTorch cannot host it (the PrivateUse1 slot is taken by
    another backend, or the Python backend API is missing).
    """
    if not _registered:
        name = torch._C._get_privateuse1_backend_name()
        acc = getattr(torch._C, "_acc", None)
        if name not in ("privateuseone", NAME) or acc is None or not hasattr(acc, "DeviceGuard"):
            raise RuntimeError(f"cannot register the fake device: PrivateUse1 is {name!r}, "
                               f"Python backend API present: {acc is not None}")

        class Hooks(acc.PrivateUse1Hooks):
            def is_available(self) -> bool:
                return False

            def has_primary_context(self, device_index) -> bool:
                return True

            def is_built(self) -> bool:
                return True

        class Guard(acc.DeviceGuard):
            def type_(self):
                return torch._C._autograd.DeviceType.PrivateUse1

        hooks, guard = Hooks(), Guard()
        if name != NAME:
            torch.utils.rename_privateuse1_backend(NAME)
            torch._register_device_module(NAME, _Module())
            acc.register_python_privateuseone_hook(hooks)
            acc.register_python_privateuseone_device_guard(guard)
        library = torch.library.Library("aten", "IMPL")
        library.impl("empty.memory_format", _empty, "PrivateUse1")
        library.impl("empty_strided", _empty_strided, "PrivateUse1")
        library.impl("_copy_from", _copy_from, "PrivateUse1")
        _registered.extend([library, hooks, guard])
    return torch.device(NAME, 0)
