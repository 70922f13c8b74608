"""Linear layers on the CPU: our AVX-512 kernel (bf16 or fp32) for decode-sized batches; oneDNN's bf16 GEMM or
MKL's fp32 GEMM for long prefills. int8 layers (W8A8 / W8A16): cpu_int8_kernels.cpp, oneDNN's int8 GEMM for long
prefills."""
from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from npu_infer.models.layers.int4_linear import pack_int4, panel_layout, w4a16_linear
from npu_infer.models.layers.int8_linear import (dequantize_weight, group_size_of, int8_matmul, quantize_per_token,
                                                 w8a16_linear)
from npu_infer.platform.cpu_kernels import cpu_flags

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

    @property
    def runs_in_stack(self) -> bool:
        return self.gemv is not None and not self.logits

    def stack_linear(self, bias: torch.Tensor | None):
        """This linear as the C++ decode stack calls it."""
        return self.kernels.StackLinear("", self.gemv, self.out_features, bias)


# Above these many rows the library takes over: W8A8 per-token quantization + torch._int_mm (oneDNN's int8 GEMM, the
# same exact int32 sums) with the scales applied by torch ops; W8A16 the weight made bf16 for the call + oneDNN.
# Measured on 2 shared cores (benchmarks/int8_kernels.py, a SmolLM2 layer's 4 linears, three runs): at 1024 rows
# our W8A8 kernel took 30-105 ms against _int_mm's 87-304 (its unfused epilogue makes several passes over the
# [M, N] result) and W8A16's 56-127 against 51-144; at 256 rows the runs disagreed. So the kernels keep every
# chunk up to the default 2048-token prefill step.
W8A8_KERNEL_MAX_ROWS = 2048
W8A16_KERNEL_MAX_ROWS = 2048


class CpuInt8Linear:
    """x @ (q * scale).T + bias for an int8 LinearBase (int8_linear.py), q packed once for cpu_int8_kernels.cpp.

    W8A8 needs AVX512-VNNI and takes bf16 or fp32 x; W8A16 takes bf16 x, its scales per output channel [N] or per
    group of input channels [N, K / G] (G even for the kernel). Elsewhere the plain-torch twin runs."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, scheme: str, kernels: ModuleType | None,
                 dtype: torch.dtype, fp32_out: bool = False):
        self.weight, self.scale, self.scheme, self.kernels = weight, scale, scheme, kernels
        self.fp32_out = fp32_out  # an int8 LM head: fp32 logits, as CpuPackedLinear(logits=True) gives
        self.out_features, self.in_features = weight.shape
        group = group_size_of(weight, scale)
        usable = kernels is not None and (scheme == "w8a16" and dtype == torch.bfloat16 and group % 2 == 0
                                           or scheme == "w8a8" and "avx512_vnni" in cpu_flags())
        self.packed = kernels.pack_int8(weight, 4 if scheme == "w8a8" else 2) if usable else None
        panels = -(-self.out_features // 64)  # the kernels read whole 64-row panels
        groups = 1 if scale.dim() == 1 else scale.shape[1]
        padded = torch.ones(panels * 64, groups)
        padded[:self.out_features] = scale.reshape(self.out_features, groups)
        # Per channel [rows]; per group [panels, groups, 64]: a panel's 64 scales of one group side by side.
        self.scale_padded = (padded[:, 0].contiguous() if scale.dim() == 1
                             else padded.reshape(panels, 64, groups).transpose(1, 2).contiguous())
        self.comp = torch.zeros(panels * 64, dtype=torch.int32)  # 128 * row sums: the +128 shift of the activations
        self.comp[:self.out_features] = weight.sum(dim=1, dtype=torch.int32) * 128

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        fbias = bias.float() if bias is not None else None
        if self.scheme == "w8a8":
            if self.packed is not None and x.dim() == 2 and x.shape[0] <= W8A8_KERNEL_MAX_ROWS:
                return self.kernels.linear_w8a8(x.contiguous(), self.packed, self.scale_padded, self.comp,
                                                self.out_features, fbias, self.fp32_out)
            return self._w8a8_library(x, fbias)
        if (self.packed is not None and x.dim() == 2 and x.dtype == torch.bfloat16
                and x.shape[0] <= W8A16_KERNEL_MAX_ROWS and self.in_features % 2 == 0):
            return self.kernels.linear_w8a16(x.contiguous(), self.packed, self.scale_padded, self.out_features,
                                             fbias, self.fp32_out)
        if x.dtype == torch.bfloat16 and not self.fp32_out:  # many rows: a bf16 copy of the weight, oneDNN's GEMM
            weight = dequantize_weight(self.weight, self.scale).to(torch.bfloat16)
            return F.linear(x, weight, bias.to(x.dtype) if bias is not None else None)
        return w8a16_linear(x, self.weight, self.scale, bias, torch.float32 if self.fp32_out else None)

    def _w8a8_library(self, x: torch.Tensor, fbias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.packed is not None:
            xq, x_scale = self.kernels.quantize_per_token(x2, self.in_features)
        else:
            xq, x_scale = quantize_per_token(x2)
        y = int8_matmul(xq, self.weight).float() * (x_scale[:, None] * self.scale[None, :])
        if fbias is not None:
            y = y + fbias
        return y.to(torch.float32 if self.fp32_out else x.dtype).reshape(*lead, self.out_features)

    @property
    def runs_in_stack(self) -> bool:
        return self.packed is not None

    def stack_linear(self, bias: torch.Tensor | None):
        return self.kernels.StackLinear(self.scheme, self.packed, self.out_features,
                                        bias.float() if bias is not None else None, self.scale_padded, self.comp)


class CpuInt4Linear:
    """x @ (d * q + m).T + bias for a W4A16 LinearBase (int4_linear.py: a GGUF Q4_0 / Q4_1 file's linears as stored),
    q packed once for cpu_int4_kernels.cpp, which takes bf16 x at every row count (more rows than one pass: each
    panel made bf16 once a call). Elsewhere the plain-torch twin runs."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, kernels: ModuleType | None,
                 dtype: torch.dtype):
        self.q, self.scale, self.mins = q, scale, mins
        self.out_features = q.shape[0]
        usable = kernels is not None and dtype == torch.bfloat16 and (q.shape[1] // scale.shape[1]) % 2 == 0
        self.kernels = kernels if usable else None
        self.packed = pack_int4(q) if usable else None
        self.scale_panels = panel_layout(scale)
        self.min_panels = panel_layout(mins)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed is not None and x.dim() == 2 and x.dtype == torch.bfloat16:
            return self.kernels.linear_w4a16(x.contiguous(), self.packed, self.scale_panels, self.min_panels,
                                             self.out_features, bias.float() if bias is not None else None, False)
        return w4a16_linear(x, self.q, self.scale, self.mins, bias)

    @property
    def runs_in_stack(self) -> bool:
        return self.packed is not None

    def stack_linear(self, bias: torch.Tensor | None):
        return self.kernels.StackLinear("w4a16", self.packed, self.out_features,
                                        bias.float() if bias is not None else None, self.scale_panels, None,
                                        self.min_panels)
