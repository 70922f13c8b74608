// The AVX-512 kernels of cpu_kernels.cpp, as the decode stack (cpu_decode_stack.cpp) and the Python module
// (cpu_module.cpp) call them. Tensors on the CPU, bf16 or fp32; every kernel checks its arguments and names the
// one that is wrong.
#pragma once
#include <ATen/ATen.h>

namespace npu_infer_kernels {

// RMSNorm of x [rows, hidden], optionally after `residual += x` (written back to residual); weight [hidden].
at::Tensor rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                    double eps);

// SiLU(gate) * up of x [rows, 2 * I] (gate first) -> [rows, I].
at::Tensor silu_and_mul(const at::Tensor& x);

// Neox rotary in place on the first `rot_heads` heads of each row of qkv [T, >= rot_heads * D], at positions [T]
// int64, with cos_sin [max_pos, D] fp32 (cos half, then sin half).
void rotary_(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos_sin, int64_t rot_heads,
             int64_t head_dim);

// k, v [T, KVH * D] into the head-major paged cache [2, KVH, blocks, block_size, D] at slots [T] int64
// (block * block_size + offset). A slot outside the cache raises IndexError before anything is written.
void cache_write(const at::Tensor& k, const at::Tensor& v, const at::Tensor& cache, const at::Tensor& slots);

// One-token attention per sequence straight from the paged cache: q [B, H, D], block_tables [B, max_blocks]
// int32, seq_lens [B] int32. A block id outside the cache raises IndexError before anything is read.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale);

// Causal attention for any mix of decodes and prefills, straight from the paged cache (the step's k/v written
// first): q [T, H, D] holds each sequence's query rows end to end (query_start_loc [S + 1] int32), block_tables
// [S, max_blocks] int32, seq_lens [S] int32 (cached + new). Row i of a sequence's q_len rows sees its first
// seq_len - q_len + i + 1 tokens. A block id outside the cache raises IndexError before anything is read.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& block_tables,
                           const at::Tensor& query_start_loc, const at::Tensor& seq_lens, double scale);

// An [N, K] bf16 or fp32 weight in 64-row panels for linear_packed.
at::Tensor pack_linear(const at::Tensor& weight);

// x [M, K] @ W^T (+ bias [N]) from pack_linear's panels; fp32_out keeps the fp32 accumulator.
at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                         const c10::optional<at::Tensor>& bias, bool fp32_out);

// Structured outputs: logits [R, V] fp32 or bf16 (in place) gets -inf at each token whose bit is 0 in
// bitmask [B, W] int32 (xgrammar's packed layout), row b of the mask going to logits row rows[b] ([B] int64);
// tokens past the mask's 32 * W bits are banned too.
void ban_by_bitmask_(const at::Tensor& logits, const at::Tensor& bitmask, const at::Tensor& rows);
// (index of each row's first maximum [rows] int64, whether the row holds a NaN [rows] bool)
std::tuple<at::Tensor, at::Tensor> argmax_rows(const at::Tensor& logits);

}  // namespace npu_infer_kernels
