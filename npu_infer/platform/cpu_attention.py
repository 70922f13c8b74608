"""Paged attention on the CPU with the AVX-512 kernels: the cache write, then one paged_attention call per layer for
the whole step (decodes, fresh prefills, chunked prefills and prefix-cache hits alike), reading the paged cache in
place (no gather copy, no mask tensor). profile_run, which has no cache, stays on the plain-torch SDPA path.

CpuPlatform.attention_backend() chooses this backend only for the head sizes and dtypes the kernels take, and the
plain-torch TorchAttentionBackend otherwise."""
from __future__ import annotations

from types import ModuleType

import torch

from npu_infer.platform.torch_attention import TorchAttentionBackend, TorchAttentionImpl, TorchAttentionMetadata
from npu_infer.worker.context import AttentionMetadata

KERNEL_HEAD_DIMS = (16, 32, 64, 96, 128, 256)  # the head sizes paged_attention is compiled for


class CpuAttentionBackend(TorchAttentionBackend):
    def __init__(self, kernels: ModuleType):
        self.kernels = kernels

    def build_metadata(self, common: AttentionMetadata) -> TorchAttentionMetadata:
        # The decode kernel reads the block tables and lengths as they are: nothing to gather with.
        return TorchAttentionMetadata(**vars(common), decode_blocks=None, decode_mask=None)

    def make_impl(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int) -> CpuAttentionImpl:
        return CpuAttentionImpl(self.kernels, num_heads, head_dim, scale, num_kv_heads)


class CpuAttentionImpl(TorchAttentionImpl):
    def __init__(self, kernels: ModuleType, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        if head_dim not in KERNEL_HEAD_DIMS:
            raise ValueError(f"head_dim {head_dim} has no CPU decode kernel (built for {KERNEL_HEAD_DIMS}); "
                             "use TorchAttentionBackend for it")
        super().__init__(num_heads, head_dim, scale, num_kv_heads)
        self.kernels = kernels

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: TorchAttentionMetadata) -> torch.Tensor:
        if kv_cache.numel() == 0:  # profile_run
            return super().forward(q, k, v, kv_cache, meta)
        num_tokens = q.shape[0]
        self._write_cache(k, v, kv_cache, meta)
        out = self.kernels.paged_attention(q.view(num_tokens, self.num_heads, self.head_dim), kv_cache,
                                           meta.block_tables, meta.query_start_loc, meta.seq_lens, self.scale)
        return out.view(num_tokens, self.num_heads * self.head_dim)

    def _write_cache(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                     meta: TorchAttentionMetadata) -> None:
        self.kernels.cache_write(k.flatten(1), v.flatten(1), kv_cache, meta.slot_mapping)
