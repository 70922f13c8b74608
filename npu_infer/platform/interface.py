"""Platform: the one place that answers every device question (memory, devices, backends, kernels)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from npu_infer.config import DTYPES

if TYPE_CHECKING:
    from npu_infer.config import EngineConfig


class DeviceUnavailableError(RuntimeError):
    """The chosen --device cannot be used here (runtime missing, no device, too few devices); one sentence."""


class Platform:
    """Base class; CpuPlatform, CudaPlatform and NpuPlatform fill in what differs."""

    device_type: str = ""
    dist_backend: str = ""
    # When False the KV budget is clipped to free memory instead of refused (host memory is shared by design).
    strict_memory_budget: bool = True
    # profile_run's second step through the paged path at max_model_len (Worker._profile_paged_step): the device
    # transients that grow with the context, which the KV budget must leave room for.
    profile_paged_step: bool = True

    def host_worker_threads(self) -> int:
        """Threads the host may spend on per-step side work (the grammar bitmask) while the model runs: the
        device computes, so the host's cores are free; half of them, at most 8, as vLLM fills its bitmasks."""
        return max(1, min(8, (os.cpu_count() or 2) // 2))

    @classmethod
    def is_available(cls) -> bool:
        raise NotImplementedError

    def check_usable(self) -> None:
        """Raise one clear sentence when the device cannot be used (missing runtime, no device)."""

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device(f"{self.device_type}:{local_rank}")

    def set_device(self, device: torch.device) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def kv_cache_tensor(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """One layer's KV cache, zeroed."""
        return torch.zeros(shape, dtype=dtype, device=device)

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes of the memory the model and KV cache live in."""
        raise NotImplementedError

    def memory_in_use(self) -> int:
        """Bytes this process holds now (the counterpart of peak_memory)."""
        raise NotImplementedError

    def peak_memory(self) -> int:
        """Highest memory_in_use() since the last reset_peak_memory()."""
        raise NotImplementedError

    def reset_peak_memory(self) -> None:
        raise NotImplementedError

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)

    def default_block_size(self) -> int:
        """Tokens per KV block when the user gives no --block-size."""
        return 16

    def supported_block_sizes(self) -> tuple[int, ...] | None:
        """The block sizes this platform's attention kernels accept (None: any power of two)."""
        return None

    def default_kv_cache_cap(self) -> int | None:
        """Upper bound on KV bytes when the user set no --kv-cache-memory (None: the formula alone)."""
        return None

    def check_and_update_config(self, config: EngineConfig) -> None:
        """Fill in what the user left to the platform (device, dtype, block size) and refuse, in one sentence, what
        it cannot run. Called once per process, by EngineConfig.resolve()."""
        config.device = self.device_type  # worker processes decide their platform from it
        supported = self.supported_block_sizes()
        if config.block_size is None:
            config.block_size = self.default_block_size()
        elif supported is not None and config.block_size not in supported:
            sizes = ", ".join(map(str, supported))
            raise ValueError(f"--block-size {config.block_size} is not supported on {self.device_type}: its "
                             f"attention kernels take {sizes}; leave --block-size unset or pass {supported[0]}")
        config.torch_dtype = self.default_dtype() if config.dtype == "auto" else DTYPES[config.dtype]
        if config.torch_dtype not in self.supported_dtypes():
            names = ", ".join(str(d).removeprefix("torch.") for d in self.supported_dtypes())
            raise ValueError(f"dtype {config.torch_dtype} is not supported on {self.device_type}; use one of {names}")

    def prepare_model(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        """After loading: rearrange weights for this platform's kernels (nothing by default)."""

    def attention_backend(self, head_dim: int, dtype: torch.dtype):
        """The attention backend for layers of this head size and dtype (vLLM's get_attn_backend_cls): it gives
        the KV cache's shape (kv_cache_shape), each layer's impl (make_impl), and the step's metadata, which the
        model runner builds once per step (build_metadata)."""
        from npu_infer.platform.torch_attention import TorchAttentionBackend
        return TorchAttentionBackend()

    def fused_ops(self):
        from npu_infer.platform.torch_ops import TorchOps
        return TorchOps()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
