"""CpuPlatform: host memory (cgroup-aware), gloo, plain-torch kernels."""
from __future__ import annotations

from pathlib import Path

import torch

from npu_infer import envs
from npu_infer.models.layers.int4_linear import W4A16
from npu_infer.models.layers.int8_linear import INT8_SCHEMES
from npu_infer.platform import cpu_kernels
from npu_infer.platform.huge_pages import advise_huge_pages
from npu_infer.platform.interface import Platform


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo() -> dict[str, int]:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = int(value.split()[0]) * 1024
    return info


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AVX-512 BF16 or AMX, where bf16 GEMM beats fp32."""
    flags = cpu_kernels.cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


class CpuPlatform(Platform):
    device_type = "cpu"
    dist_backend = "gloo"
    strict_memory_budget = False
    # Host memory, and the KV cache capped (4 GiB by default) well below it; the step would cost minutes of CPU
    # compute at long contexts (SmolLM2, 8192 tokens, 2 cores: 140 s, mostly the masked 2048 x 8192 chunk).
    profile_paged_step = False

    def host_worker_threads(self) -> int:
        # The model's own compute threads own the cores: a second pool fights them (xgrammar's bitmask fill for
        # 16 rows between CPU forwards: 0.66 ms/step on the calling thread, 2.1 ms with two pool threads).
        return 1

    @classmethod
    def is_available(cls) -> bool:
        return True

    def kv_cache_tensor(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        # Huge pages before the first write: the decode attention's scattered block reads miss the TLB less
        # (benchmarks/attention_kernel.py: 64 sequences x 192 tokens, 30 layers, with and without).
        cache = torch.empty(shape, dtype=dtype, device=device)
        advise_huge_pages(cache)
        return cache.zero_()

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cpu")

    def mem_get_info(self) -> tuple[int, int]:
        info = _meminfo()
        total, free = info["MemTotal"], info.get("MemAvailable", info["MemFree"])
        # A container's limit is the real total when it is lower than the host's memory.
        limit = _read_int("/sys/fs/cgroup/memory.max") or _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        if limit and limit < total:
            used = (_read_int("/sys/fs/cgroup/memory.current")
                    or _read_int("/sys/fs/cgroup/memory/memory.usage_in_bytes") or 0)
            total, free = limit, min(free, max(limit - used, 0))
        return free, total

    def memory_in_use(self) -> int:
        return _status_kib("VmRSS")

    def peak_memory(self) -> int:
        return _status_kib("VmHWM")

    def reset_peak_memory(self) -> None:
        # Writing 5 to clear_refs resets the resident-set high-water mark (Linux >= 4.0).
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32

    def prepare_model(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        """Pack linear weights once: bf16 into oneDNN's blocked layout (1.4-1.6x faster GEMMs here) and, with the
        AVX-512 kernels, bf16 or fp32 into the decode kernel's panels (1.6x / 2.9x faster again at batch 1)."""
        if not envs.NPU_INFER_CPU_PACK_WEIGHTS or dtype not in (torch.bfloat16, torch.float32):
            return
        kernels = cpu_kernels.load()
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return
        if dtype == torch.float32 and kernels is None:
            return  # nothing faster than F.linear to pack fp32 for
        from npu_infer.models.layers.embedding import ParallelLMHead
        from npu_infer.platform.cpu_decode_stack import CpuDecodeStack
        from npu_infer.platform.cpu_linear import CpuInt4Linear, CpuInt8Linear, CpuPackedLinear
        for module in model.modules():
            if getattr(module, "quant_scheme", None) == W4A16:  # GGUF Q4 as stored (int4_linear.py)
                module.platform_matmul = CpuInt4Linear(module.weight.detach(), module.weight_scale.detach(),
                                                       module.weight_min.detach(), kernels, dtype)
            elif getattr(module, "quant_scheme", None) in INT8_SCHEMES:  # int8 (int8_linear.py)
                module.platform_matmul = CpuInt8Linear(module.weight.detach(), module.weight_scale.detach(),
                                                       module.quant_scheme, kernels, dtype,
                                                       fp32_out=getattr(module, "fp32_logits", False))
            elif getattr(module, "quant_scheme", None) is not None:
                continue  # static W8A8: its plain-torch twin (no kernel of ours takes a per-tensor offset)
            elif hasattr(module, "platform_matmul") and getattr(module, "weight", None) is not None:
                module.platform_matmul = CpuPackedLinear(module.weight.detach(), kernels,
                                                         logits=isinstance(module, ParallelLMHead))
        stack = getattr(model, "model", None)
        if (kernels is not None and envs.NPU_INFER_CPU_DECODE_STACK
                and hasattr(stack, "platform_decode") and CpuDecodeStack.supports(stack, dtype)):
            stack.platform_decode = CpuDecodeStack(stack, kernels)

    def attention_backend(self, head_dim: int, dtype: torch.dtype):
        from npu_infer.platform.cpu_attention import KERNEL_HEAD_DIMS, CpuAttentionBackend
        from npu_infer.platform.cpu_ops import KERNEL_DTYPES
        kernels = cpu_kernels.load()
        if kernels is None or head_dim not in KERNEL_HEAD_DIMS or dtype not in KERNEL_DTYPES:
            return super().attention_backend(head_dim, dtype)
        return CpuAttentionBackend(kernels)

    def fused_ops(self):
        kernels = cpu_kernels.load()
        if kernels is None:
            return super().fused_ops()
        from npu_infer.platform.cpu_ops import CpuOps
        return CpuOps(kernels)

    def default_kv_cache_cap(self) -> int | None:
        return envs.NPU_INFER_CPU_KV_CACHE_CAP
