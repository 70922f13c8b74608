"""The stand-in ``torch.npu`` namespace (also reachable as ``torch_npu.npu``).

Devices are CPU: there is no NPU here.  The memory numbers are whatever the
test set with :func:`set_memory`; nothing is measured.

The functions have the signatures of torch_npu 2.14.0's ``torch_npu/npu/*.py``
(recorded in ``declarations.json["namespace"]``, checked by
``test_declarations.py``).  ``config`` follows ``_npuConfig``: setting
``allow_internal_format`` sets a runtime option and stores nothing, so reading
it raises AttributeError as in torch_npu.  Stricter than the real one: setting
any other attribute of ``config`` raises (torch_npu silently ignores it, which
would hide a typo).  The runtime options set are kept in ``state["options"]``.
"""

from __future__ import annotations

import importlib.machinery
import types

import torch

from . import _strict

GiB = 1 << 30

_DEFAULTS = {
    "device_count": 1,
    "current_device": 0,
    "free": 60 * GiB,
    "total": 64 * GiB,
    "peak": 0,
    "allocated": 0,
    "device_name": "Ascend910B1 (stand-in)",
}

state: dict = {}
calls: dict[str, int] = {}


def reset() -> None:
    state.clear()
    state.update(_DEFAULTS)
    state["options"] = {}  # runtime options set through set_compile_mode / config (torch_npu._C._npu_setOption)
    calls.clear()


def _count(name: str) -> None:
    calls[name] = calls.get(name, 0) + 1


def set_memory(*, free: int | None = None, total: int | None = None, peak: int | None = None,
               allocated: int | None = None) -> None:
    """Set what mem_get_info / max_memory_allocated / memory_allocated report (bytes).  With the strict device on,
    allocations are measured: only total and free (what others hold outside the allocator) can be set."""
    memory = _measured()
    if memory is not None:
        if peak is not None or allocated is not None:
            raise ValueError("the strict stand-in measures allocated and peak memory; set only free and total")
        memory.total = memory.total if total is None else total
        if free is not None:
            memory.other = memory.total - free - memory.reserved
        return
    for key, val in (("free", free), ("total", total), ("peak", peak), ("allocated", allocated)):
        if val is not None:
            if not isinstance(val, int) or val < 0:
                raise ValueError(f"{key} must be a non-negative int, got {val!r}")
            state[key] = val
    if state["free"] > state["total"]:
        raise ValueError(f"free ({state['free']}) cannot exceed total ({state['total']})")


def set_device_count(n: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"device count must be a non-negative int, got {n!r}")
    state["device_count"] = n
    if state["current_device"] >= max(n, 1):
        state["current_device"] = 0


def _index(device) -> int | None:
    """Device index from an int, 'npu[:N]' or a torch.device; None = current device."""
    if device is None:
        return None
    if isinstance(device, bool):
        raise TypeError(f"invalid device {device!r}")
    if isinstance(device, int):
        idx = device
    elif isinstance(device, str):
        kind, _, num = device.partition(":")
        if kind != "npu":
            raise RuntimeError(f"Expected an npu device, got {device!r}")
        idx = int(num) if num else None
    elif isinstance(device, torch.device):
        # The stand-in's device seam hands out CPU devices unless the strict device is on, so a cpu device
        # means "the stand-in device" and carries no index of its own.
        if device.type not in ("cpu", "npu"):
            raise RuntimeError(f"Expected an npu device, got {device}")
        idx = device.index if device.type == "npu" else None
    else:
        raise TypeError(f"invalid device {device!r}")
    if idx is not None and not 0 <= idx < state["device_count"]:
        raise RuntimeError(f"Invalid device ordinal {idx}: {state['device_count']} device(s) available")
    return idx


def is_available() -> bool:
    return state["device_count"] > 0


def device_count() -> int:
    return state["device_count"]


def set_device(device) -> None:
    _count("set_device")
    idx = _index(device)
    if idx is not None:
        state["current_device"] = idx


def current_device() -> int:
    return state["current_device"]


def synchronize(device=None) -> None:
    _index(device)
    _count("synchronize")


def _measured():
    """The strict device's memory model (_strict.Memory), when one is on: then the numbers are measured."""
    return _strict.ACTIVE.memory if _strict.ACTIVE is not None else None


def empty_cache() -> None:
    _count("empty_cache")
    if _measured():
        _measured().empty_cache()


def mem_get_info(device=None) -> tuple[int, int]:
    _index(device)
    return _measured().mem_get_info() if _measured() else (state["free"], state["total"])


def max_memory_allocated(device=None) -> int:
    _index(device)
    return _measured().peak if _measured() else state["peak"]


def memory_allocated(device=None) -> int:
    _index(device)
    return _measured().allocated if _measured() else state["allocated"]


def reset_peak_memory_stats(device=None) -> None:
    _index(device)
    _count("reset_peak_memory_stats")
    if _measured():
        _measured().reset_peak()
    state["peak"] = state["allocated"]


def _device_index(device_name) -> int:
    idx = _index(device_name)
    return state["current_device"] if idx is None else idx


def get_device_name(device_name=None) -> str:
    _device_index(device_name)
    return state["device_name"]


def get_device_properties(device_name=None) -> types.SimpleNamespace:
    """The fields of torch_npu's _NPUDeviceProperties that npu_infer reads."""
    _device_index(device_name)
    return types.SimpleNamespace(name=state["device_name"], total_memory=state["total"])


def set_compile_mode(jit_compile=False) -> None:
    _count("set_compile_mode")
    if not isinstance(jit_compile, bool):
        raise TypeError(f"jit_compile must be a bool, got {jit_compile!r}")
    state["options"]["jitCompile"] = "enable" if jit_compile else "disable"


class _NpuConfig:
    """torch.npu.config: attribute writes become runtime options; nothing is stored or readable."""

    _OPTIONS = {"allow_internal_format": "ALLOW_INTERNAL_FORMAT"}

    def __setattr__(self, name, value) -> None:
        if name not in self._OPTIONS:
            raise AttributeError(f"stand-in torch.npu.config has no option {name!r} (torch_npu would silently "
                                 f"ignore it); known: {sorted(self._OPTIONS)}")
        _count(f"config.{name}")
        state["options"][self._OPTIONS[name]] = "enable" if value else "disable"


FUNCTIONS = (is_available, device_count, set_device, current_device, synchronize, empty_cache, mem_get_info,
             memory_allocated, max_memory_allocated, reset_peak_memory_stats, set_compile_mode, get_device_name,
             get_device_properties)


def make_module() -> types.ModuleType:
    mod = types.ModuleType("torch_npu.npu", "Stand-in torch.npu namespace (CPU; configurable memory numbers).")
    mod.__spec__ = importlib.machinery.ModuleSpec("torch_npu.npu", None, origin=__file__)
    for fn in FUNCTIONS:
        setattr(mod, fn.__name__, fn)
    mod.config = _NpuConfig()
    # What torch.manual_seed looks for on the "npu" backend module once privateuse1 is named "npu" (strict
    # device): without them it warns on every seed.  Seeding changes nothing here (device draws use the host's).
    mod.manual_seed_all = lambda seed: None
    mod._is_in_bad_fork = lambda: False
    return mod


reset()
