// W4A16 linear for the CPU backend (cpu_int4_kernels.cpp): GGUF Q4_0 / Q4_1 weights as stored, bf16 activations.
// w[n, k] = d[n, g] * q[n, k] + m[n, g] with q in 0..15 and one (d, m) per group of K / groups input channels
// (Q4_0: m = -8 d). The nibbles are made bf16 in registers (exactly) and summed in fp32 per group, then
// y = sum over groups of d * (x . q) + m * (sum of x over the group) (+ bias). The plain-torch twin is
// npu_infer/models/layers/int4_linear.py.
#pragma once
#include <ATen/ATen.h>

namespace npu_infer_int4 {

// x [M, K] bf16 contiguous; packed [panels, K / 2, 64] uint8 (int4_linear.pack_int4: step s of panel p holds 64 rows x
// 2 k as 128 nibbles in the bf16 panel order); scales and mins fp32 [panels, groups, 64]; K / groups even.
at::Tensor linear_w4a16(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                        const at::Tensor& mins, int64_t n, const c10::optional<at::Tensor>& bias, bool fp32_out);

}  // namespace npu_infer_int4
