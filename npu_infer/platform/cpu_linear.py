"""bf16 linear layers on the CPU: oneDNN's blocked weights for prefill, our AVX512-BF16 GEMV for decode."""
from __future__ import annotations

from types import ModuleType

import torch

# Up to this many rows (decode batches) the GEMV of cpu_kernels.cpp runs; above it, oneDNN's GEMM. Measured on
# 2 cores: a whole SmolLM2 pass of linears at 1 row takes 8 ms against oneDNN's 13; at 16 rows oneDNN is ahead.
GEMV_MAX_ROWS = 8


class CpuPackedLinear:
    """x @ W.T + bias for one bf16 weight, packed once for each kernel that may run it."""

    def __init__(self, weight: torch.Tensor, kernels: ModuleType | None):
        self.out_features = weight.shape[0]
        self.kernels = kernels
        self.onednn = torch.ops.mkldnn._reorder_linear_weight(weight)
        self.gemv = kernels.pack_linear(weight) if kernels is not None else None

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.gemv is not None and x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS:
            return self.kernels.linear_packed(x.contiguous(), self.gemv, self.out_features, bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.onednn, bias, "none", [], "")
