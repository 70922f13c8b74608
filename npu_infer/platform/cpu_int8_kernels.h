// int8 linears for the CPU backend (cpu_int8_kernels.cpp): W8A8 (int8 activations quantized per token, int8
// weights per output channel, int32 accumulation with AVX512-VNNI) and W8A16 (int8 weights turned into bf16 in
// registers, exactly, then the bf16 dot product; scales per output channel or per group of input channels).
// Weights packed in 64-row panels like pack_linear's.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace npu_infer_int8 {

// [N, K] int8 -> [ceil(N / 64), ceil(K / group), 64, group], zero-padded; group 4 (w8a8) or 2 (w8a16).
at::Tensor pack_int8(const at::Tensor& weight, int64_t group);

// Per-token symmetric int8 of x [M, K] (bf16 or fp32): scale = amax(|row|) / 127 (1 for an all-zero row),
// q = round_half_even(x / scale) clamped to +-127, zero-padded to k_padded columns. Returns (q, scale [M] fp32).
std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, int64_t k_padded);

// y = (xq . W^T as exact int32) * (x_scale[m] * w_scale[n]) (+ bias), in fp32, rounded once to out_dtype.
// w_comp [>= N] int32 = 128 * (row sums of W): the kernel feeds xq + 128 (unsigned) to vpdpbusd and subtracts it.
at::Tensor linear_w8a8_quantized(const at::Tensor& xq, const at::Tensor& x_scale, const at::Tensor& packed,
                                 const at::Tensor& w_scale, const at::Tensor& w_comp, int64_t n,
                                 const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype);

// quantize_per_token, then linear_w8a8_quantized into x's dtype (fp32 with fp32_out).
at::Tensor linear_w8a8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scale,
                       const at::Tensor& w_comp, int64_t n, const c10::optional<at::Tensor>& bias, bool fp32_out);

// y = (x . W^T in fp32, bf16 x times the int8 weights made bf16) * w_scale[n] (+ bias), rounded once; x bf16.
// Group-wise: w_scale [panels, groups, 64] (panel p's row r, group g at [p, g, r]; K / groups input channels a
// group, an even number), y = sum over groups of (x . W^T over the group, in fp32) * scale (+ bias).
at::Tensor linear_w8a16(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scale, int64_t n,
                        const c10::optional<at::Tensor>& bias, bool fp32_out);

}  // namespace npu_infer_int8
