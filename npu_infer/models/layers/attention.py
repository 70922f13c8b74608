"""Attention over the paged KV cache: this layer's cache slice and the platform's backend do the work."""
from __future__ import annotations

import torch
from torch import nn

from npu_infer.platform import current_platform
from npu_infer.worker.context import get_context


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.scale, self.num_kv_heads = num_heads, head_dim, scale, num_kv_heads
        self.backend = current_platform().attention_backend()
        self.kv_cache = torch.empty(0)  # bound by the worker once the cache is allocated

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.backend.forward(q, k, v, self.kv_cache, get_context(), self.scale,
                                    self.num_heads, self.num_kv_heads, self.head_dim)
