"""The strict stand-in as a CUDA GPU: torch.cuda's queries answered by a StrictDevice("cuda") on a CPU-only torch.

Only what CudaPlatform and env_report call is replaced (is_available, device_count, set_device, synchronize,
empty_cache, mem_get_info, memory_allocated, max_memory_allocated, reset_peak_memory_stats, get_device_name,
get_device_capability, is_bf16_supported); the tensors are the strict device's (_strict.py)."""

from __future__ import annotations

import contextlib

import torch

from ._strict import StrictDevice


@contextlib.contextmanager
def strict_cuda(capability: tuple[int, int] = (9, 0)):
    strict = StrictDevice("cuda")
    memory = strict.memory
    fake = {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "set_device": lambda device: None,
        "synchronize": lambda device=None: None,
        "empty_cache": memory.empty_cache,
        "mem_get_info": lambda device=None: memory.mem_get_info(),
        "memory_allocated": lambda device=None: memory.allocated,
        "max_memory_allocated": lambda device=None: memory.peak,
        "reset_peak_memory_stats": lambda device=None: memory.reset_peak(),
        "get_device_name": lambda device=None: "NVIDIA H100 (strict stand-in)",
        "get_device_capability": lambda device=None: capability,
        "is_bf16_supported": lambda including_emulation=True: capability >= (8, 0),
    }
    saved = {name: getattr(torch.cuda, name) for name in fake}
    for name, fn in fake.items():
        setattr(torch.cuda, name, fn)
    strict.enter()
    try:
        yield strict
    finally:
        strict.exit()
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)
