// A Llama / Qwen2 decoder stack for pure decode steps, run layer after layer in C++ (cpu_decode_stack.cpp): the
// orchestration of the kernels of cpu_kernels.h, cpu_int8_kernels.h and cpu_int4_kernels.h, in the order the Python
// layers call them (so the same bits out), minus ~100 us of Python and dispatch per layer. Built by
// cpu_decode_stack.py.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

namespace npu_infer_kernels {

// One linear of the decode stack, as the Python layer's platform_matmul holds it: a weight pack_linear packed
// (scheme ""), or an int8 one ("w8a8", "w8a16") with its fp32 scales (w8a16: per channel, or per group of input
// channels as [panels, groups, 64]) and, for w8a8, its compensation sums (cpu_int8_kernels.h); or a GGUF Q4 one
// ("w4a16") with its per-group scales and mins (cpu_int4_kernels.h). The bias is the one that layer's call passes:
// of x's dtype for "", fp32 for the quantized schemes.
struct StackLinear {
  StackLinear(std::string scheme, at::Tensor packed, int64_t n, c10::optional<at::Tensor> bias,
              c10::optional<at::Tensor> scale, c10::optional<at::Tensor> comp, c10::optional<at::Tensor> mins);
  at::Tensor operator()(const at::Tensor& x) const;

  std::string scheme;
  at::Tensor packed;
  int64_t n;
  c10::optional<at::Tensor> bias, scale, comp, mins;
};

// One decoder layer's weights: its two RMSNorm weights and its four linears.
struct LayerWeights {
  at::Tensor input_norm, post_norm;
  StackLinear qkv, o_proj, gate_up, down;
};

class DecodeStack {
 public:
  // cos_sin [max_pos, head_dim] fp32: the rotary table; scale: the attention's softmax scale.
  DecodeStack(std::vector<LayerWeights> layers, int64_t heads, int64_t kv_heads, int64_t head_dim, double eps,
              double scale, at::Tensor cos_sin);

  // hidden [M, hidden] (the embeddings; becomes the first residual), one new token per sequence; caches: one
  // per layer. The ids in slots and block_tables are checked against the caches (IndexError) before use.
  std::tuple<at::Tensor, at::Tensor> forward(at::Tensor hidden, const at::Tensor& positions,
                                             const std::vector<at::Tensor>& caches, const at::Tensor& slots,
                                             const at::Tensor& block_tables, const at::Tensor& seq_lens) const;

 private:
  std::vector<LayerWeights> layers_;
  int64_t heads_, kv_heads_, head_dim_;
  double eps_, scale_;
  at::Tensor cos_sin_;
};

}  // namespace npu_infer_kernels
