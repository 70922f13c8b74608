"""Attention over the paged KV cache: this layer's cache slice and its impl (the platform backend's) do the work."""
from __future__ import annotations

import torch
from torch import nn

from npu_infer.platform import current_platform
from npu_infer.worker.context import get_context


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.scale, self.num_kv_heads = num_heads, head_dim, scale, num_kv_heads
        # The backend for this head size in the dtype the model is built in (the worker builds it under
        # torch.set_default_dtype); the model runner builds each step's metadata with the same choice.
        self.backend = current_platform().attention_backend(head_dim, torch.get_default_dtype())
        self.impl = self.backend.make_impl(num_heads, head_dim, scale, num_kv_heads)
        self.kv_cache = torch.empty(0)  # bound by the worker once the cache is allocated

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.impl.forward(q, k, v, self.kv_cache, get_context())


def attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]
