"""bf16 linear layers on the CPU: our AVX512-BF16 kernel for decode-sized batches, oneDNN's GEMM for long prefills."""
from __future__ import annotations

from types import ModuleType

import torch

# Up to this many rows the dot-product kernel of cpu_kernels.cpp runs; above it, oneDNN's GEMM. Measured on 2 cores
# (a whole SmolLM2 pass of linears): 9.4 vs 15.8 ms at 1 row, 46 vs 50 ms at 64 (memory-bound at first, then at the
# bf16 peak, ~390 GFLOPS); about even at 256 rows; oneDNN ahead from 1024 (prefill chunks).
GEMV_MAX_ROWS = 256


class CpuPackedLinear:
    """x @ W.T + bias for one bf16 weight, packed once for each kernel that may run it.

    `logits=True` (the LM head): always our kernel, with fp32 output. bf16 logits would be rounded to steps of
    1/8 around 20, enough to turn near-ties into exact ties that greedy decoding then breaks by token id."""

    def __init__(self, weight: torch.Tensor, kernels: ModuleType | None, logits: bool = False):
        self.out_features = weight.shape[0]
        self.kernels = kernels
        self.logits = logits and kernels is not None
        self.gemv = kernels.pack_linear(weight) if kernels is not None else None
        self.onednn = None if self.logits else torch.ops.mkldnn._reorder_linear_weight(weight)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.gemv is not None and x.dim() == 2 and (self.logits or x.shape[0] <= GEMV_MAX_ROWS):
            return self.kernels.linear_packed(x.contiguous(), self.gemv, self.out_features, bias, self.logits)
        return torch.ops.mkldnn._linear_pointwise(x, self.onednn, bias, "none", [], "")
