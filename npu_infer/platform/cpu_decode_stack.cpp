// DecodeStack (see cpu_decode_stack.h): the same kernel calls, in the same order, as the Python layers make
// through CpuOps / CpuAttentionBackend / CpuPackedLinear / CpuInt8Linear.
#include "cpu_decode_stack.h"

#include "cpu_int4_kernels.h"
#include "cpu_int8_kernels.h"
#include "cpu_kernels.h"

namespace npu_infer_kernels {

StackLinear::StackLinear(std::string scheme_, at::Tensor packed_, int64_t n_, c10::optional<at::Tensor> bias_,
                         c10::optional<at::Tensor> scale_, c10::optional<at::Tensor> comp_,
                         c10::optional<at::Tensor> mins_)
    : scheme(std::move(scheme_)), packed(std::move(packed_)), n(n_), bias(std::move(bias_)),
      scale(std::move(scale_)), comp(std::move(comp_)), mins(std::move(mins_)) {
  TORCH_CHECK(scheme.empty() || scheme == "w8a8" || scheme == "w8a16" || scheme == "w4a16",
              "StackLinear: scheme must be \"\", \"w8a8\", \"w8a16\" or \"w4a16\", got \"", scheme, "\"");
  TORCH_CHECK(scheme.empty() || scale, "StackLinear: scheme ", scheme, " needs scale (the fp32 weight scales)");
  TORCH_CHECK(scheme != "w8a8" || comp, "StackLinear: scheme w8a8 needs comp (the int32 compensation sums)");
  TORCH_CHECK(scheme != "w4a16" || mins, "StackLinear: scheme w4a16 needs mins (the fp32 per-group mins)");
}

at::Tensor StackLinear::operator()(const at::Tensor& x) const {
  if (scheme.empty()) return linear_packed(x, packed, n, bias, false);
  if (scheme == "w8a8") return npu_infer_int8::linear_w8a8(x, packed, *scale, *comp, n, bias, false);
  if (scheme == "w4a16") return npu_infer_int4::linear_w4a16(x, packed, *scale, *mins, n, bias, false);
  return npu_infer_int8::linear_w8a16(x, packed, *scale, n, bias, false);
}

DecodeStack::DecodeStack(std::vector<LayerWeights> layers, int64_t heads, int64_t kv_heads, int64_t head_dim,
                         double eps, double scale, at::Tensor cos_sin)
    : layers_(std::move(layers)), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), eps_(eps),
      scale_(scale), cos_sin_(std::move(cos_sin)) {
  TORCH_CHECK(!layers_.empty(), "DecodeStack: layers must hold at least one LayerWeights");
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0, "DecodeStack: heads (", heads,
              ") must be a positive multiple of kv_heads (", kv_heads, "), head_dim (", head_dim, ") positive");
}

std::tuple<at::Tensor, at::Tensor> DecodeStack::forward(at::Tensor hidden, const at::Tensor& positions,
                                                        const std::vector<at::Tensor>& caches,
                                                        const at::Tensor& slots, const at::Tensor& block_tables,
                                                        const at::Tensor& seq_lens) const {
  TORCH_CHECK(caches.size() == layers_.size(), "DecodeStack.forward: caches must hold one KV cache per layer (",
              layers_.size(), "), got ", caches.size());
  TORCH_CHECK(hidden.dim() == 2, "DecodeStack.forward: hidden must be 2-D [sequences, hidden], got sizes ",
              hidden.sizes());
  const int64_t rows = hidden.size(0), q_size = heads_ * head_dim_, kv_size = kv_heads_ * head_dim_;
  at::Tensor residual = hidden;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const LayerWeights& layer = layers_[i];
    at::Tensor h = i == 0 ? rms_norm(hidden, c10::nullopt, layer.input_norm, eps_)
                          : rms_norm(hidden, residual, layer.input_norm, eps_);
    at::Tensor qkv = layer.qkv(h);
    rotary_(qkv, positions, cos_sin_, heads_ + kv_heads_, head_dim_);
    // cache_write and decode_attention check every slot and block id against this layer's cache.
    cache_write(qkv.narrow(1, q_size, kv_size), qkv.narrow(1, q_size + kv_size, kv_size), caches[i], slots);
    at::Tensor q = qkv.as_strided({rows, heads_, head_dim_}, {qkv.stride(0), head_dim_, 1});
    at::Tensor attn = decode_attention(q, caches[i], block_tables, seq_lens, scale_).view({rows, q_size});
    h = rms_norm(layer.o_proj(attn), residual, layer.post_norm, eps_);
    hidden = layer.down(silu_and_mul(layer.gate_up(h)));
  }
  return {hidden, residual};
}

}  // namespace npu_infer_kernels
