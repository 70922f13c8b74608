"""Platform selection: `--device auto|npu|cuda|cpu` -> one Platform instance for the process."""
from __future__ import annotations

from npu_infer.platform.cpu import CpuPlatform
from npu_infer.platform.cuda import CudaPlatform
from npu_infer.platform.interface import DeviceUnavailableError, Platform
from npu_infer.platform.npu import NpuPlatform

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


def set_current_platform(platform: Platform) -> None:
    global _current
    _current = platform


def current_platform() -> Platform:
    """The platform chosen for this process (CPU until an engine or worker sets one)."""
    global _current
    if _current is None:
        _current = CpuPlatform()
    return _current


__all__ = ["Platform", "DeviceUnavailableError", "CpuPlatform", "CudaPlatform", "NpuPlatform", "get_platform", "current_platform",
           "set_current_platform"]
