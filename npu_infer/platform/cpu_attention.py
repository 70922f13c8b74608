"""Paged attention on the CPU with the AVX-512 kernels: cache writes and decode attention read the paged cache in
place (no gather copy, no mask, one call per layer); prefill stays on the plain-torch SDPA path."""
from __future__ import annotations

from types import ModuleType

import torch

from npu_infer.platform.cpu_ops import KERNEL_DTYPES
from npu_infer.platform.torch_attention import TorchAttentionBackend
from npu_infer.worker.context import AttentionMetadata

KERNEL_HEAD_DIMS = (16, 32, 64, 96, 128, 256)  # the head sizes decode_attention is compiled for


class CpuAttentionBackend(TorchAttentionBackend):
    def __init__(self, kernels: ModuleType):
        self.kernels = kernels

    def _write_cache(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                     meta: AttentionMetadata) -> None:
        if kv_cache.dtype not in KERNEL_DTYPES or k.dtype != kv_cache.dtype:
            return super()._write_cache(k, v, kv_cache, meta)
        self.kernels.cache_write(k.flatten(1), v.flatten(1), kv_cache, meta.slot_mapping)

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                num_kv_heads: int) -> torch.Tensor:
        if q.shape[-1] not in KERNEL_HEAD_DIMS or kv_cache.dtype not in KERNEL_DTYPES or q.dtype != kv_cache.dtype:
            return super()._decode(q, kv_cache, meta, scale, num_kv_heads)
        nd = q.shape[0]
        return self.kernels.decode_attention(q, kv_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale)
