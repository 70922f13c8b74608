"""Platform selection: `--device auto|npu|cuda|cpu` -> the one Platform instance of the process, decided once."""
from __future__ import annotations

import logging

from npu_infer.platform.cpu import CpuPlatform
from npu_infer.platform.cuda import CudaPlatform
from npu_infer.platform.interface import DeviceUnavailableError, Platform
from npu_infer.platform.npu import NpuPlatform

logger = logging.getLogger(__name__)
PLATFORMS: dict[str, type[Platform]] = {"npu": NpuPlatform, "cuda": CudaPlatform, "cpu": CpuPlatform}
_current: Platform | None = None


def get_platform(device: str = "auto") -> Platform:
    """The platform for a --device value; auto picks npu > cuda > cpu."""
    if device == "auto":
        device = next(name for name, cls in PLATFORMS.items() if cls.is_available())
    if device not in PLATFORMS:
        raise ValueError(f"unknown device {device!r}; choose auto, npu, cuda or cpu")
    platform = PLATFORMS[device]()
    platform.check_usable()
    return platform


def init_platform(device: str) -> Platform:
    """Decide this process's platform from --device, at the start of the process: the engine's (LLMEngine), each
    worker process (from the config it receives) and the command-line tools that build models."""
    global _current
    _current = get_platform(device)
    logger.debug("platform of this process: %r", _current)
    return _current


def current_platform() -> Platform:
    """The platform init_platform() decided for this process; model layers ask it for their kernels."""
    if _current is None:
        raise RuntimeError("no platform was decided for this process: model layers are built by an engine "
                           "(LLMEngine), or call npu_infer.platform.init_platform(device) first")
    return _current


__all__ = ["Platform", "DeviceUnavailableError", "CpuPlatform", "CudaPlatform", "NpuPlatform", "get_platform",
           "init_platform", "current_platform"]
