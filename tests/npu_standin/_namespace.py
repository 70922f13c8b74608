"""The stand-in ``torch.npu`` namespace (also reachable as ``torch_npu.npu``).

Devices are CPU: there is no NPU here.  The memory numbers are whatever the
test set with :func:`set_memory`; nothing is measured.
"""

from __future__ import annotations

import importlib.machinery
import types

import torch

GiB = 1 << 30

_DEFAULTS = {
    "device_count": 1,
    "current_device": 0,
    "free": 60 * GiB,
    "total": 64 * GiB,
    "peak": 0,
    "allocated": 0,
}

state: dict = {}
calls: dict[str, int] = {}


def reset() -> None:
    state.clear()
    state.update(_DEFAULTS)
    calls.clear()


def _count(name: str) -> None:
    calls[name] = calls.get(name, 0) + 1


def set_memory(*, free: int | None = None, total: int | None = None, peak: int | None = None,
               allocated: int | None = None) -> None:
    """Set what mem_get_info / max_memory_allocated / memory_allocated report (bytes)."""
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
        # The stand-in's device seam hands out CPU devices, so a cpu device means
        # "the stand-in device" and carries no index of its own.
        if device.type != "cpu":
            raise RuntimeError(f"Expected an npu device (the stand-in uses cpu), got {device}")
        idx = None
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


def empty_cache() -> None:
    _count("empty_cache")


def mem_get_info(device=None) -> tuple[int, int]:
    _index(device)
    return state["free"], state["total"]


def max_memory_allocated(device=None) -> int:
    _index(device)
    return state["peak"]


def memory_allocated(device=None) -> int:
    _index(device)
    return state["allocated"]


def reset_peak_memory_stats(device=None) -> None:
    _index(device)
    _count("reset_peak_memory_stats")
    state["peak"] = state["allocated"]


def make_module() -> types.ModuleType:
    mod = types.ModuleType("torch_npu.npu", "Stand-in torch.npu namespace (CPU; configurable memory numbers).")
    mod.__spec__ = importlib.machinery.ModuleSpec("torch_npu.npu", None, origin=__file__)
    for fn in (is_available, device_count, set_device, current_device, synchronize, empty_cache,
               mem_get_info, max_memory_allocated, memory_allocated, reset_peak_memory_stats):
        setattr(mod, fn.__name__, fn)
    return mod


reset()
