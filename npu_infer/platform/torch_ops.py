"""Plain-torch versions of the fused ops (RMSNorm, rotary, SwiGLU), used where a platform has nothing better."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class TorchOps:
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Normalise in fp32, scale in the input dtype, as transformers' LlamaRMSNorm does.
        return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        residual = x + residual
        return self.rms_norm(residual, weight, eps), residual

    def rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
               head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [T, head_dim/2] each
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

        def rotate(x: torch.Tensor) -> torch.Tensor:
            x = x.view(x.shape[0], -1, head_dim)
            x1, x2 = x.float().chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
            return out.to(q.dtype).flatten(1)

        return rotate(q), rotate(k)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
