"""SwiGLU activation through the platform's fused op."""
from __future__ import annotations

import torch
from torch import nn

from npu_infer.platform import current_platform


class SiluAndMul(nn.Module):
    def __init__(self):
        super().__init__()
        self.ops = current_platform().fused_ops()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.silu_and_mul(x)
