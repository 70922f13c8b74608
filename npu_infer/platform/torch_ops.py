"""Plain-torch versions of the fused ops (RMSNorm, rotary, SwiGLU), used where a platform has nothing better.

Written for few ops per layer: on a CPU, per-op dispatch is a large share of a small-batch decode step."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RopeStep:
    """The rotary inputs of one step's positions: made once per step (the model's RotaryEmbedding calls
    ops.rope_step), read by every layer's ops.rotary."""
    positions: torch.Tensor       # [T] int64
    cos_sin_cache: torch.Tensor   # [max_position, head_dim]: cat(cos, sin), as the ops take it
    head_dim: int
    cos: torch.Tensor | None = None  # [T, 1, head_dim] cat(cos, cos) of the positions: the plain-torch path's
    sin: torch.Tensor | None = None  # [T, 1, head_dim] cat(-sin, sin)


_BITS: dict[torch.device, torch.Tensor] = {}


def _bit_values(device: torch.device) -> torch.Tensor:
    """1 << i for i in 0..31 as int32 (bit 31 is the sign bit)."""
    if device not in _BITS:
        _BITS[device] = torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int32, device=device)
    return _BITS[device]


class TorchOps:
    def argmax_rows(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy sampling: each row's index of its largest logit, the first on ties ([rows] int64)."""
        return logits.argmax(dim=-1)

    def ban_by_bitmask_(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Structured outputs: logits[rows[b], v] = -inf where bit v of bitmask[b] (xgrammar's packed int32 words,
        on the logits' device) is 0, and past the mask's bits (a vocabulary padded beyond the tokenizer's)."""
        vocab = logits.shape[1]
        banned = (bitmask.unsqueeze(-1) & _bit_values(logits.device)).eq(0).flatten(1)
        if banned.shape[1] < vocab:
            banned = F.pad(banned, (0, vocab - banned.shape[1]), value=True)
        banned = banned[:, :vocab]
        if rows == list(range(len(logits))):  # every row, in order (the common case): no gather and scatter
            logits.masked_fill_(banned, float("-inf"))
        else:
            index = torch.tensor(rows, dtype=torch.long).to(logits.device)
            logits[index] = logits[index].masked_fill_(banned, float("-inf"))

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        # Normalise in fp32, scale in the input dtype, as transformers' LlamaRMSNorm does.
        return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        residual = x + residual
        return self.rms_norm(residual, weight, eps), residual

    def rope_step(self, positions: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int,
                  dtype: torch.dtype) -> RopeStep:
        """Once per step: the cos/sin rows of the step's positions, in the activations' dtype."""
        cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [T, head_dim/2] each
        return RopeStep(positions, cos_sin_cache, head_dim,
                        cos=torch.cat((cos, cos), dim=-1).unsqueeze(1).to(dtype),
                        sin=torch.cat((-sin, sin), dim=-1).unsqueeze(1).to(dtype))

    def rotary(self, q: torch.Tensor, k: torch.Tensor, rope: RopeStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Neox-style rotation: x*cos + rotate_half(x)*sin, with rotate_half(x)*sin = roll(x)*[-sin, sin]."""
        if rope.cos is None:  # a kernel's step (CpuOps) on this fallback, off the model's path
            rope = TorchOps.rope_step(self, rope.positions, rope.cos_sin_cache, rope.head_dim, q.dtype)
        cos, sin, head_dim = rope.cos, rope.sin, rope.head_dim
        tokens = q.shape[0]
        q_heads = q.shape[1] // head_dim
        if k.data_ptr() == q.data_ptr() + q.shape[1] * q.element_size() and q.stride() == k.stride():
            # q and k sit side by side in the fused QKV output: rotate both in one pass.
            x = q.as_strided((tokens, q_heads + k.shape[1] // head_dim, head_dim), (q.stride(0), head_dim, 1))
            out = torch.addcmul(x * cos, x.roll(head_dim // 2, dims=-1), sin)
            return out[:, :q_heads].flatten(1), out[:, q_heads:].flatten(1)
        rotated = []
        for x in (q, k):
            x = x.reshape(tokens, -1, head_dim)
            rotated.append(torch.addcmul(x * cos, x.roll(head_dim // 2, dims=-1), sin).flatten(1))
        return rotated[0], rotated[1]

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
