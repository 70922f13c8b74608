"""CudaPlatform: torch.cuda memory queries, nccl, SDPA attention over the paged cache."""
from __future__ import annotations


import torch

from npu_infer import envs
from npu_infer.platform.interface import DeviceUnavailableError, Platform


class CudaPlatform(Platform):
    device_type = "cuda"
    dist_backend = "nccl"

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    def check_usable(self) -> None:
        if not torch.cuda.is_available():
            raise DeviceUnavailableError("--device cuda needs a CUDA GPU and a CUDA build of torch; none was found")

    def device(self, local_rank: int = 0) -> torch.device:
        count = torch.cuda.device_count()
        if local_rank >= count:
            visible = envs.CUDA_VISIBLE_DEVICES
            note = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
            raise DeviceUnavailableError(f"this rank needs cuda:{local_rank} but {count} GPU(s) are visible{note}; "
                                         "lower -tp/-pp or make more GPUs visible")
        return torch.device("cuda", local_rank)

    def default_dtype(self) -> torch.dtype:
        # GPUs before sm80 (V100, T4) have no bf16 arithmetic: torch emulates it, slowly.
        return torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16

    def set_device(self, device: torch.device) -> None:
        torch.cuda.set_device(device)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def mem_get_info(self) -> tuple[int, int]:
        return torch.cuda.mem_get_info()

    def memory_in_use(self) -> int:
        return torch.cuda.memory_allocated()

    def peak_memory(self) -> int:
        return torch.cuda.max_memory_allocated()

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats()
