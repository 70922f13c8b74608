"""NpuPlatform: Ascend NPUs through torch_npu (imported lazily, only here and in the npu_* kernel modules)."""
from __future__ import annotations

import importlib
import os

import torch

from npu_infer.platform.interface import Platform

INSTALL_HINT = ("install the CANN toolkit and `pip install npu_infer[npu]` (torch-npu matching your torch version, "
                "e.g. torch 2.x.y with torch-npu 2.x.y), then source CANN's set_env.sh")


def import_torch_npu():
    """Import torch_npu, or fail with one sentence saying what to install."""
    try:
        return importlib.import_module("torch_npu")
    except Exception as exc:  # ImportError, or CANN's shared libraries missing (OSError/RuntimeError)
        raise RuntimeError(f"--device npu needs torch_npu and CANN ({exc}); {INSTALL_HINT}") from None


class NpuPlatform(Platform):
    device_type = "npu"
    dist_backend = "hccl"

    @classmethod
    def is_available(cls) -> bool:
        if importlib.util.find_spec("torch_npu") is None:
            return False
        try:
            import_torch_npu()
            return torch.npu.is_available()
        except RuntimeError:
            return False

    def check_usable(self) -> None:
        import_torch_npu()
        if not torch.npu.is_available():
            visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
            raise RuntimeError("--device npu found torch_npu but no NPU"
                               + (f" (ASCEND_RT_VISIBLE_DEVICES={visible})" if visible else "")
                               + "; check the driver with npu-smi info")

    def device(self, local_rank: int = 0) -> torch.device:
        # ASCEND_RT_VISIBLE_DEVICES is applied by the runtime: npu:0 is the first visible card.
        torch_npu = import_torch_npu()
        standin_device = getattr(torch_npu, "standin_device", None)  # tests' stand-in runs on CPU tensors
        return standin_device(local_rank) if standin_device else torch.device(f"npu:{local_rank}")

    def set_device(self, device: torch.device) -> None:
        import_torch_npu()
        torch.npu.set_device(device)

    def synchronize(self) -> None:
        torch.npu.synchronize()

    def empty_cache(self) -> None:
        torch.npu.empty_cache()

    def mem_get_info(self) -> tuple[int, int]:
        import_torch_npu()
        return torch.npu.mem_get_info()

    def memory_in_use(self) -> int:
        return torch.npu.memory_allocated()

    def peak_memory(self) -> int:
        return torch.npu.max_memory_allocated()

    def reset_peak_memory(self) -> None:
        torch.npu.reset_peak_memory_stats()

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        # The fused attention kernels take no float32 query.
        return (torch.bfloat16, torch.float16)

    def attention_backend(self):
        from npu_infer.platform.npu_attention import NpuAttentionBackend
        return NpuAttentionBackend()

    def fused_ops(self):
        from npu_infer.platform.npu_ops import NpuFusedOps
        return NpuFusedOps()
