"""Linear layers on the CPU: our AVX-512 kernel (bf16 or fp32) for decode-sized batches; oneDNN's bf16 GEMM or
MKL's fp32 GEMM for long prefills."""
from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

# Up to this many rows the kernel of cpu_kernels.cpp runs; above it, the library GEMM. Measured on 2 cores (a whole
# SmolLM2 pass of linears). bf16: 9.4 vs oneDNN's 15.8 ms at 1 row, 46 vs 50 ms at 64 (memory-bound at first, then
# at the bf16 peak, ~390 GFLOPS); about even at 256 rows; oneDNN ahead from 1024 (prefill chunks). fp32: 17.9 vs
# MKL's 51.1 ms at 1 row, 110 vs 150 at 64, 428 vs 481 at 256.
GEMV_MAX_ROWS = 256


class CpuPackedLinear:
    """x @ W.T + bias for one bf16 or fp32 weight, packed once for each kernel that may run it.

    `logits=True` (the LM head): always our kernel, with fp32 output. bf16 logits would be rounded to steps of
    1/8 around 20, enough to turn near-ties into exact ties that greedy decoding then breaks by token id."""

    def __init__(self, weight: torch.Tensor, kernels: ModuleType | None, logits: bool = False):
        self.weight = weight  # the library GEMM's operand above GEMV_MAX_ROWS (fp32)
        self.out_features = weight.shape[0]
        self.kernels = kernels
        self.logits = logits and kernels is not None
        self.gemv = kernels.pack_linear(weight) if kernels is not None else None
        bf16 = weight.dtype == torch.bfloat16
        self.onednn = torch.ops.mkldnn._reorder_linear_weight(weight) if bf16 and not self.logits else None

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.gemv is not None and x.dim() == 2 and (self.logits or x.shape[0] <= GEMV_MAX_ROWS):
            return self.kernels.linear_packed(x.contiguous(), self.gemv, self.out_features, bias, self.logits)
        if self.onednn is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.onednn, bias, "none", [], "")
        return F.linear(x, self.weight, bias)
