"""The one import of torch_npu (lazy: CPU and CUDA users do not have it), failing with one sentence saying what to
install. A leaf: NpuPlatform and the NPU kernel modules all import it, and it imports none of them."""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

from npu_infer.optional_deps import MissingDependencyError, install_command
from npu_infer.platform.interface import DeviceUnavailableError

INSTALL_HINT = ("install the CANN toolkit, source its set_env.sh, and `" + install_command("torch_npu") + "` with the "
                "torch-npu release made for your torch (torch-npu X.Y.Z needs torch==X.Y.Z; this torch is {torch})")


class TorchNpuMissingError(MissingDependencyError, DeviceUnavailableError):
    """torch_npu is not installed: a missing optional dependency, and the reason --device npu cannot be used."""


def import_torch_npu() -> ModuleType:
    """Import torch_npu, or fail with one sentence saying what to install."""
    try:
        return importlib.import_module("torch_npu")
    except Exception as exc:  # ImportError, or CANN's shared libraries missing (OSError/RuntimeError)
        hint = INSTALL_HINT.format(torch=torch.__version__.split("+")[0])
        missing = isinstance(exc, ImportError) and (exc.name or "").split(".")[0] == "torch_npu"
        error = TorchNpuMissingError if missing else DeviceUnavailableError
        raise error(f"--device npu needs torch_npu and CANN ({type(exc).__name__}: {exc}); {hint}") from None
