"""Rotary position embedding (neox style) with a precomputed cos/sin cache; Llama-3 frequency scaling.

A model owns one RotaryEmbedding, the one table of its layers: called once per step, it gives the step's rotary
inputs (a RopeStep), which every layer's ops.rotary(q, k, rope) reads."""
from __future__ import annotations

import math

import torch
from torch import nn

from npu_infer.platform import current_platform
from npu_infer.platform.torch_ops import RopeStep


def _llama3_scale(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict | None = None):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type == "llama3":
            inv_freq = _llama3_scale(inv_freq, scaling)
        elif rope_type not in ("default", None):
            raise ValueError(f"rope scaling {rope_type!r} is not supported; supported: default, llama3")
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)
        self.cos_sin_cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_position, head_dim], float32
        self.ops = current_platform().fused_ops()

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeStep:
        """Once per step: what every layer's rotation of q and k (in `dtype`) at these positions reads."""
        return self.ops.rope_step(positions, self.cos_sin_cache, self.head_dim, dtype)
