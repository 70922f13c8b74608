"""Paged attention on the CPU with the AVX-512 kernels: cache writes and decode attention read the paged cache in
place (no gather copy, no mask, one call per layer); prefill stays on the plain-torch SDPA path.

CpuPlatform.attention_backend() chooses this backend only for the head sizes and dtypes the kernels take, and the
plain-torch TorchAttentionBackend otherwise."""
from __future__ import annotations

from types import ModuleType

import torch

from npu_infer.platform.torch_attention import TorchAttentionBackend, TorchAttentionImpl, TorchAttentionMetadata
from npu_infer.worker.context import AttentionMetadata

KERNEL_HEAD_DIMS = (16, 32, 64, 96, 128, 256)  # the head sizes decode_attention is compiled for


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

    def _write_cache(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                     meta: TorchAttentionMetadata) -> None:
        self.kernels.cache_write(k.flatten(1), v.flatten(1), kv_cache, meta.slot_mapping)

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: TorchAttentionMetadata) -> torch.Tensor:
        nd = q.shape[0]
        return self.kernels.decode_attention(q, kv_cache, meta.block_tables[:nd], meta.seq_lens[:nd], self.scale)
