// AVX-512 kernels for the CPU backend's decode path: the few ops where plain torch pays for dispatch,
// extra passes over memory or a gather copy. Declared in cpu_kernels.h, bound to Python in cpu_module.cpp and
// built on first use by npu_infer/platform/cpu_kernels.py (needs AVX-512 F/BW/VL and AVX512_BF16); every op has a
// plain-torch twin that the tests compare against.
//
// Tensors: bf16 or fp32, row-major. Accumulation is fp32 everywhere; bf16 results are rounded once
// (round to nearest even), except where a comment says the torch twin rounds an intermediate too.
#include "cpu_kernels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"

namespace npu_infer_kernels {

using namespace npu_infer_simd;

namespace {

// Argument checks: each message names the kernel, the argument and what it must be, then what it got.
void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  check_cpu(op, name, t);
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat, op, ": ", name,
              " must be bfloat16 or float32, got ", t.scalar_type());
}

void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                      const at::Tensor& like) {
  check_cpu(op, name, t);
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have ", like_name, "'s dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
}

// A 2-D [rows, columns] tensor whose columns are adjacent in memory (any row stride).
void check_rows(const char* op, const char* name, const at::Tensor& t, const char* shape) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, op, ": ", name, " must be 2-D ", shape,
              " with unit column stride, got sizes ", t.sizes(), " strides ", t.strides());
}

// `numel` contiguous ids (int64) or lengths (int32), one per token or sequence.
void check_index_tensor(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                        int64_t numel) {
  check_cpu(op, name, t);
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype == at::kLong ? "int64" : "int32",
              ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.numel() == numel, op, ": ", name, " must be contiguous [", numel,
              "], got sizes ", t.sizes(), " strides ", t.strides());
}

// The head-major paged KV cache [2, KVH, blocks, block_size, D], contiguous.
void check_cache(const char* op, const at::Tensor& cache) {
  check_float(op, "cache", cache);
  TORCH_CHECK(cache.dim() == 5 && cache.size(0) == 2 && cache.is_contiguous(), op,
              ": cache must be contiguous [2, kv_heads, blocks, block_size, head_dim], got sizes ", cache.sizes(),
              " strides ", cache.strides());
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// RMSNorm, optionally after `residual += x` (written back to residual). As transformers' LlamaRMSNorm:
// normalise in fp32, round to the input dtype, then scale by the weight in that dtype.
template <typename T>
void rms_norm_impl(const at::Tensor& out, const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                   const at::Tensor& weight, double eps) {
  const int64_t rows = x.size(0), hidden = x.size(1);
  const T* xp = x.data_ptr<T>();
  T* rp = residual ? residual->data_ptr<T>() : nullptr;
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t xs = x.stride(0), rs = residual ? residual->stride(0) : 0;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* src = xp + i * xs;
      T* res = rp ? rp + i * rs : nullptr;
      __m512 ss = _mm512_setzero_ps();
      for (int64_t c = 0; c < hidden; c += 16) {
        __mmask16 m = tail_mask(hidden - c);
        __m512 v = load16_masked(src + c, m);
        if (res) {
          v = round_like<T>(_mm512_add_ps(v, load16_masked(res + c, m)));
          store16_masked(res + c, v, m);
        }
        ss = _mm512_fmadd_ps(v, v, ss);
      }
      const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / hidden + static_cast<float>(eps));
      const __m512 scale = _mm512_set1_ps(inv);
      const T* normed = res ? res : src;
      T* dst = op + i * hidden;
      for (int64_t c = 0; c < hidden; c += 16) {
        __mmask16 m = tail_mask(hidden - c);
        __m512 y = round_like<T>(_mm512_mul_ps(load16_masked(normed + c, m), scale));
        store16_masked(dst + c, _mm512_mul_ps(y, load16_masked(wp + c, m)), m);
      }
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                    double eps) {
  check_float("rms_norm", "x", x);
  check_rows("rms_norm", "x", x, "[rows, hidden]");
  check_same_dtype("rms_norm", "weight", weight, "x", x);
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "rms_norm: weight must be contiguous [",
              x.size(1), "] (x's hidden size), got sizes ", weight.sizes(), " strides ", weight.strides());
  if (residual) {
    check_same_dtype("rms_norm", "residual", *residual, "x", x);
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->stride(1) == 1, "rms_norm: residual must be x's shape ",
                x.sizes(), " with unit column stride, got sizes ", residual->sizes(), " strides ", residual->strides());
  }
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (is_bf16(x)) rms_norm_impl<bf16>(out, x, residual, weight, eps);
  else rms_norm_impl<float>(out, x, residual, weight, eps);
  return out;
}

// ---------------------------------------------------------------------------------------------------
// SiLU(gate) * up on [rows, 2 * I] (gate first). Rounds silu to the dtype before the product, as torch does.
template <typename T>
void silu_and_mul_impl(const at::Tensor& out, const at::Tensor& x) {
  const int64_t rows = x.size(0), inter = x.size(1) / 2;
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* gate = xp + i * x.stride(0);
      const T* up = gate + inter;
      for (int64_t c = 0; c < inter; c += 16) {
        __mmask16 m = tail_mask(inter - c);
        __m512 g = load16_masked(gate + c, m);
        __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        store16_masked(op + i * inter + c, _mm512_mul_ps(round_like<T>(s), load16_masked(up + c, m)), m);
      }
    }
  });
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  check_float("silu_and_mul", "x", x);
  check_rows("silu_and_mul", "x", x, "[rows, 2 * intermediate]");
  TORCH_CHECK(x.size(1) % 2 == 0, "silu_and_mul: x must have an even number of columns (gate, then up), got ",
              x.size(1));
  at::Tensor out = at::empty({x.size(0), x.size(1) / 2}, x.options());
  if (is_bf16(x)) silu_and_mul_impl<bf16>(out, x);
  else silu_and_mul_impl<float>(out, x);
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Neox rotary in place on the first `rot_heads` heads of each row of qkv [T, heads * D] (q then k),
// with cos_sin [max_pos, D] fp32 (cos half, then sin half). Computed in fp32, rounded once.
template <typename T>
void rotary_impl(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos_sin, int64_t rot_heads,
                 int64_t head_dim) {
  const int64_t tokens = qkv.size(0), half = head_dim / 2;
  T* base = qkv.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* table = cos_sin.data_ptr<float>();
  const int64_t max_pos = cos_sin.size(0);
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "rotary_: positions[", t, "] = ", pos[t],
                " is outside the table of ", max_pos, " positions (cos_sin)");
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* cosp = table + pos[t] * head_dim;
      const float* sinp = cosp + half;
      T* row = base + t * qkv.stride(0);
      for (int64_t h = 0; h < rot_heads; ++h) {
        T* x1 = row + h * head_dim;
        T* x2 = x1 + half;
        for (int64_t c = 0; c < half; c += 16) {
          __mmask16 m = tail_mask(half - c);
          __m512 a = load16_masked(x1 + c, m), b = load16_masked(x2 + c, m);
          __m512 cs = load16_masked(cosp + c, m), sn = load16_masked(sinp + c, m);
          store16_masked(x1 + c, _mm512_fmsub_ps(a, cs, _mm512_mul_ps(b, sn)), m);
          store16_masked(x2 + c, _mm512_fmadd_ps(b, cs, _mm512_mul_ps(a, sn)), m);
        }
      }
    }
  });
}

void rotary_(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos_sin, int64_t rot_heads,
             int64_t head_dim) {
  check_float("rotary_", "qkv", qkv);
  check_rows("rotary_", "qkv", qkv, "[tokens, >= rot_heads * head_dim]");
  TORCH_CHECK(rot_heads >= 0 && head_dim > 0 && head_dim % 2 == 0, "rotary_: head_dim must be even and positive, "
              "rot_heads not negative, got head_dim ", head_dim, ", rot_heads ", rot_heads);
  TORCH_CHECK(qkv.size(1) >= rot_heads * head_dim, "rotary_: qkv must have at least rot_heads * head_dim = ",
              rot_heads * head_dim, " columns, got ", qkv.size(1));
  check_index_tensor("rotary_", "positions", positions, at::kLong, qkv.size(0));
  check_cpu("rotary_", "cos_sin", cos_sin);
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.dim() == 2 && cos_sin.is_contiguous() &&
              cos_sin.size(1) == head_dim, "rotary_: cos_sin must be contiguous float32 [max_positions, ", head_dim,
              "], got ", cos_sin.scalar_type(), " sizes ", cos_sin.sizes());
  if (is_bf16(qkv)) rotary_impl<bf16>(qkv, positions, cos_sin, rot_heads, head_dim);
  else rotary_impl<float>(qkv, positions, cos_sin, rot_heads, head_dim);
}

// ---------------------------------------------------------------------------------------------------
// Paged KV cache, head-major: cache [2, KVH, blocks, block_size, D]. Writes k/v rows [T, KVH * D] (row
// stride free) at slot_mapping (block * block_size + offset), every slot checked by cache_write first.
template <typename T>
void cache_write_impl(const at::Tensor& k, const at::Tensor& v, const at::Tensor& cache, const at::Tensor& slots) {
  const int64_t tokens = k.size(0), kv_heads = cache.size(1), head_dim = cache.size(4);
  const int64_t head_stride = cache.stride(1), v_offset = cache.stride(0);
  const int64_t* sp = slots.data_ptr<int64_t>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* cp = cache.data_ptr<T>();
  const size_t bytes = head_dim * sizeof(T);
  // Both threads from 64 tokens: each row is two scattered writes that miss the cache (1.5-2x at batch 64).
  at::parallel_for(0, tokens, 32, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t h = 0; h < kv_heads; ++h) {
        T* dst = cp + h * head_stride + sp[t] * head_dim;
        std::memcpy(dst, kp + t * k.stride(0) + h * head_dim, bytes);
        std::memcpy(dst + v_offset, vp + t * v.stride(0) + h * head_dim, bytes);
      }
    }
  });
}

void cache_write(const at::Tensor& k, const at::Tensor& v, const at::Tensor& cache, const at::Tensor& slots) {
  check_cache("cache_write", cache);
  const int64_t width = cache.size(1) * cache.size(4), num_slots = cache.size(2) * cache.size(3);
  auto check_rows_of = [&](const char* name, const at::Tensor& t) {
    check_same_dtype("cache_write", name, t, "cache", cache);
    check_rows("cache_write", name, t, "[tokens, kv_heads * head_dim]");
    TORCH_CHECK(t.size(1) == width, "cache_write: ", name, " must have kv_heads * head_dim = ", width,
                " columns (the cache's), got ", t.size(1));
  };
  check_rows_of("k", k);
  check_rows_of("v", v);
  TORCH_CHECK(v.size(0) == k.size(0), "cache_write: v must have k's ", k.size(0), " rows, got ", v.size(0));
  check_index_tensor("cache_write", "slots", slots, at::kLong, k.size(0));
  // Like the torch twin's index_copy_, an id outside the cache is an IndexError; here before any write.
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < slots.numel(); ++t)
    TORCH_CHECK_INDEX(sp[t] >= 0 && sp[t] < num_slots, "cache_write: slots[", t, "] = ", sp[t],
                      " is outside the cache's ", num_slots, " slots (", cache.size(2), " blocks of ", cache.size(3),
                      ")");
  if (is_bf16(cache)) cache_write_impl<bf16>(k, v, cache, slots);
  else cache_write_impl<float>(k, v, cache, slots);
}

// Sums of four vectors' lanes at once: [sum(a), sum(b), sum(c), sum(d)] (a third of four separate reductions).
inline __m256 upper256(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  auto half = [](__m512 v) { return _mm256_add_ps(_mm512_castps512_ps256(v), upper256(v)); };
  const __m256 ab = _mm256_hadd_ps(half(a), half(b));  // [a01 a23 b01 b23 | a45 a67 b45 b67]
  const __m256 cd = _mm256_hadd_ps(half(c), half(d));
  const __m256 abcd = _mm256_hadd_ps(ab, cd);           // [a b c d | a b c d], each a half of the sums
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// Lane-wise partial sums of q . k over one head (D = NC * 16): bf16 pairs go through vdpbf16ps unconverted.
template <typename T, int NC>
inline __m512 dot_lanes(const T* q, const T* k) {
  if constexpr (std::is_same_v<T, bf16> && NC % 2 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int c = 0; c < NC / 2; ++c)
      acc = _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(_mm512_loadu_si512(k + c * 32)),
                             reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + c * 32)));
    return acc;
  } else {
    __m512 acc = _mm512_mul_ps(load16(q), load16(k));
    for (int c = 1; c < NC; ++c) acc = _mm512_fmadd_ps(load16(q + c * 16), load16(k + c * 16), acc);
    return acc;
  }
}

// ---------------------------------------------------------------------------------------------------
// Attention straight from the paged cache, for decode and prefill alike (the step's k/v are written first). q
// [T, H, D] (row stride free) holds each sequence's query rows end to end (query_start_loc [S + 1]), block_tables
// [S, max_blocks] int32, seq_lens [S] int32 (cached + new tokens). A sequence's query row i of q_len sees its first
// seq_len - q_len + i + 1 tokens (causal). No gather copy, no mask tensor.
//
// A work item is one (sequence, KV head) and up to kAttnRows of the sequence's query rows: its rows x group query
// vectors read the same cached tokens, each up to its own length. Scores in fp32 four tokens at a time, walked block
// by block (no division per token); softmax in fp32; then each V row is loaded once and weighted for up to
// kValueQueries<NC> query vectors at a time.
//
// Each item reads its K blocks, then its V blocks: short scattered runs the hardware prefetcher barely ramps up on
// (decode ran at half the machine's read bandwidth). So the kernel prefetches into L2 itself: while scoring K
// block b, K block b + ahead and V block b; while weighing V, the first K blocks of the thread's next item. Decode,
// 64 sequences: 1.1-1.2x with blocks in order, 1.5-1.75x shuffled (benchmarks/attention_kernel.py). Huge pages
// for the cache help too: CpuPlatform.
constexpr int64_t kAttnRows = 8;
constexpr int64_t kPrefetchBytes = 16 * 1024;  // how far ahead of the reads the K prefetch runs
template <int NC> constexpr int kValueQueries = NC <= 4 ? 4 : NC <= 8 ? 2 : 1;  // accumulators: <= 16 zmm

// The cached tokens of one (sequence, KV head): block `blk` of K or V, and how many of its tokens are below `len`.
template <typename T>
struct PagedHead {
  const T* k;
  const T* v;
  const int32_t* table;
  int64_t block_size, block_elems;
  const T* block(const T* base, int64_t blk) const { return base + static_cast<int64_t>(table[blk]) * block_elems; }
  void prefetch(const T* base, int64_t blk) const {  // one block into L2
    const char* p = reinterpret_cast<const char*>(block(base, blk));
    const int64_t bytes = block_elems * static_cast<int64_t>(sizeof(T));
    for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T1);
  }
  int64_t tokens_in(int64_t blk, int64_t len) const { return std::min(block_size, len - blk * block_size); }
  int64_t blocks_for(int64_t len) const { return (len + block_size - 1) / block_size; }
};

// out_q = sum_t p_q[t] v[t] / sum_q for hc <= HC query vectors; p beyond a vector's own length is exp(-inf) = 0.
// on_block(blk) runs before V block blk is read (the caller's prefetches).
template <typename T, int NC, int HC, typename OnBlock>
void weigh_values(const PagedHead<T>& head, const float* probs, int64_t padded, const float* inv, int64_t len,
                  T* const* outs, const OnBlock& on_block) {
  constexpr int64_t D = NC * 16;
  __m512 acc[HC][NC];
  for (int g = 0; g < HC; ++g)
    for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_setzero_ps();
  const int64_t num_blocks = head.blocks_for(len);
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    on_block(blk);
    const T* vb = head.block(head.v, blk);
    const float* p = probs + blk * head.block_size;
    for (int64_t j = 0, n = head.tokens_in(blk, len); j < n; ++j) {
      __m512 v[NC];
      for (int c = 0; c < NC; ++c) v[c] = load16(vb + j * D + c * 16);
      for (int g = 0; g < HC; ++g) {
        const __m512 pg = _mm512_set1_ps(p[g * padded + j]);
        for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_fmadd_ps(pg, v[c], acc[g][c]);
      }
    }
  }
  for (int g = 0; g < HC; ++g)
    for (int c = 0; c < NC; ++c) store16(outs[g] + c * 16, _mm512_mul_ps(acc[g][c], _mm512_set1_ps(inv[g])));
}

// The bf16 form of weigh_values: two tokens per vdpbf16ps, their V rows interleaved (v_t[d], v_t+1[d]) and their
// probabilities rounded to a bf16 pair, as torch's CPU flash attention rounds them for its P @ V. Half the
// multiply-adds and no V conversion. unpacklo/hi_epi16 interleave within 128-bit lanes, so the accumulator pair of
// a 32-dim slice holds dims {0-3, 8-11, 16-19, 24-27} and {4-7, ...}: put back in order at the store.
template <int NC, int HC, typename OnBlock>
void weigh_values_pairs(const PagedHead<bf16>& head, const uint16_t* probs, int64_t padded, const float* inv,
                        int64_t len, bf16* const* outs, const OnBlock& on_block) {
  constexpr int64_t D = NC * 16;
  constexpr int NZ = NC / 2;  // 32-dim slices of a V row
  __m512 acc[HC][NC];
  for (int g = 0; g < HC; ++g)
    for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_setzero_ps();
  const int64_t num_blocks = head.blocks_for(len);
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    on_block(blk);
    const bf16* vb = head.block(head.v, blk);
    const uint16_t* p = probs + blk * head.block_size;
    for (int64_t j = 0, n = head.tokens_in(blk, len); j < n; j += 2) {
      const bool pair = j + 1 < n;  // the last token of an odd count pairs with zeros
      __m512i lo[NZ], hi[NZ];
      for (int z = 0; z < NZ; ++z) {
        const __m512i a = _mm512_loadu_si512(vb + j * D + z * 32);
        const __m512i b = pair ? _mm512_loadu_si512(vb + (j + 1) * D + z * 32) : _mm512_setzero_si512();
        lo[z] = _mm512_unpacklo_epi16(a, b);
        hi[z] = _mm512_unpackhi_epi16(a, b);
      }
      for (int g = 0; g < HC; ++g) {
        uint32_t pp;
        std::memcpy(&pp, p + g * padded + j, sizeof(pp));
        if (!pair) pp &= 0xFFFFu;
        const __m512bh pg = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pp)));
        for (int z = 0; z < NZ; ++z) {
          acc[g][2 * z] = _mm512_dpbf16_ps(acc[g][2 * z], reinterpret_cast<__m512bh>(lo[z]), pg);
          acc[g][2 * z + 1] = _mm512_dpbf16_ps(acc[g][2 * z + 1], reinterpret_cast<__m512bh>(hi[z]), pg);
        }
      }
    }
  }
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int g = 0; g < HC; ++g) {
    const __m512 s = _mm512_set1_ps(inv[g]);
    for (int z = 0; z < NZ; ++z) {
      store16(outs[g] + z * 32, _mm512_mul_ps(_mm512_permutex2var_ps(acc[g][2 * z], first, acc[g][2 * z + 1]), s));
      store16(outs[g] + z * 32 + 16,
              _mm512_mul_ps(_mm512_permutex2var_ps(acc[g][2 * z], second, acc[g][2 * z + 1]), s));
    }
  }
}

// hc <= HC query vectors' outputs: the pair kernel for bf16 with whole 32-dim slices, weigh_values otherwise.
template <typename T, int NC, int HC, typename OnBlock>
void weigh_chunk(const PagedHead<T>& head, const float* probs, const uint16_t* probs16, int64_t padded,
                 const float* inv, int64_t len, T* const* outs, const OnBlock& on_block) {
  if constexpr (std::is_same_v<T, bf16> && NC % 2 == 0)
    weigh_values_pairs<NC, HC>(head, probs16, padded, inv, len, outs, on_block);
  else
    weigh_values<T, NC, HC>(head, probs, padded, inv, len, outs, on_block);
}

// One work item: nq query vectors qs (lengths lens) against one (sequence, KV head), results to outs. `next`
// (the thread's next item, length next_len, or null) has its first `ahead` K blocks prefetched meanwhile.
template <typename T, int NC>
void attend(const PagedHead<T>& head, const T* const* qs, const int64_t* lens, T* const* outs, int nq, float scale,
            std::vector<float>& scores, int64_t ahead, const PagedHead<T>* next, int64_t next_len) {
  constexpr int64_t D = NC * 16;
  const int64_t len = *std::max_element(lens, lens + nq), padded = (len + 15) / 16 * 16;
  constexpr bool kPairs = std::is_same_v<T, bf16> && NC % 2 == 0;
  // fp32 scores, then (pairs) their bf16 copy, one spare element: a last odd token reads its pair's upper half.
  scores.resize(nq * padded + (kPairs ? (nq * padded) / 2 + 1 : 0));
  uint16_t* probs16 = kPairs ? reinterpret_cast<uint16_t*>(scores.data() + nq * padded) : nullptr;
  const int64_t num_blocks = head.blocks_for(len);
  for (int64_t blk = 0, t0 = 0; blk < num_blocks; ++blk, t0 += head.block_size) {
    const T* kb = head.block(head.k, blk);
    if (blk + ahead < num_blocks) head.prefetch(head.k, blk + ahead);
    head.prefetch(head.v, blk);
    for (int q = 0; q < nq; ++q) {
      const T* qv = qs[q];
      float* s = scores.data() + q * padded + t0;
      const int64_t n = std::min(head.tokens_in(blk, len), lens[q] - t0);
      int64_t j = 0;
      for (; j + 4 <= n; j += 4) {
        const __m128 four = reduce4(dot_lanes<T, NC>(qv, kb + j * D), dot_lanes<T, NC>(qv, kb + (j + 1) * D),
                                    dot_lanes<T, NC>(qv, kb + (j + 2) * D), dot_lanes<T, NC>(qv, kb + (j + 3) * D));
        _mm_storeu_ps(s + j, _mm_mul_ps(four, _mm_set1_ps(scale)));
      }
      for (; j < n; ++j) s[j] = _mm512_reduce_add_ps(dot_lanes<T, NC>(qv, kb + j * D)) * scale;
    }
  }
  float inv[kAttnRows * 64];  // nq <= kAttnRows * group; group <= 64 is checked by the caller
  for (int q = 0; q < nq; ++q) {
    float* s = scores.data() + q * padded;
    std::fill(s + lens[q], s + padded, -INFINITY);  // past its own length (and the padding): weight 0
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < padded; t += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + t));
    const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < padded; t += 16) {
      __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), vmax));  // exp(-inf) -> 0
      _mm512_storeu_ps(s + t, e);
      sum = _mm512_add_ps(sum, e);
    }
    inv[q] = 1.0f / _mm512_reduce_add_ps(sum);
    if constexpr (kPairs)
      for (int64_t t = 0; t < padded; t += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs16 + q * padded + t),
                            reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(s + t))));
  }
  // The next item's first K blocks, one per V block weighed (the first chunk's pass), the rest after it.
  const int64_t next_blocks = next ? std::min(ahead, next->blocks_for(next_len)) : 0;
  int64_t prefetched = 0;
  constexpr int HC = kValueQueries<NC>;
  for (int q0 = 0; q0 < nq; q0 += HC) {
    const int hc = std::min(HC, nq - q0);
    const int64_t chunk_len = *std::max_element(lens + q0, lens + q0 + hc);
    const float* probs = scores.data() + q0 * padded;
    const auto on_block = [&](int64_t blk) {
      if (q0 == 0 && blk < next_blocks) next->prefetch(next->k, prefetched++);
    };
    const uint16_t* p16 = probs16 ? probs16 + q0 * padded : nullptr;
    switch (hc) {
      case 1: weigh_chunk<T, NC, 1>(head, probs, p16, padded, inv + q0, chunk_len, outs + q0, on_block); break;
      case 2:
        weigh_chunk<T, NC, std::min(2, HC)>(head, probs, p16, padded, inv + q0, chunk_len, outs + q0, on_block);
        break;
      case 3:
        weigh_chunk<T, NC, std::min(3, HC)>(head, probs, p16, padded, inv + q0, chunk_len, outs + q0, on_block);
        break;
      default: weigh_chunk<T, NC, HC>(head, probs, p16, padded, inv + q0, chunk_len, outs + q0, on_block); break;
    }
  }
  for (; prefetched < next_blocks; ++prefetched) next->prefetch(next->k, prefetched);
}

// query_start: [S + 1] row offsets, or null for one query row per sequence (decode).
template <typename T, int NC>
void paged_attention_impl(const at::Tensor& out, const at::Tensor& q, const at::Tensor& cache,
                          const at::Tensor& block_tables, const int32_t* query_start, const at::Tensor& seq_lens,
                          double scale) {
  constexpr int64_t D = NC * 16;
  const int64_t seqs = seq_lens.size(0), heads = q.size(1), kv_heads = cache.size(1), block_size = cache.size(3);
  const int64_t group = heads / kv_heads;
  const T* qp = q.data_ptr<T>();
  const T* cp = cache.data_ptr<T>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
  const int64_t bt_stride = block_tables.stride(0), q_stride = q.stride(0);
  struct Item { int64_t seq, head, row0, rows, first_row, q_len; };  // rows [row0, row0 + rows) of q_len from first_row
  std::vector<Item> items;
  int64_t work = 0;  // query vectors x tokens, roughly
  for (int64_t s = 0; s < seqs; ++s) {
    const int64_t r0 = query_start ? query_start[s] : s, q_len = query_start ? query_start[s + 1] - r0 : 1;
    for (int64_t r = 0; r < q_len; r += kAttnRows)
      for (int64_t h = 0; h < kv_heads; ++h) items.push_back({s, h, r0 + r, std::min(kAttnRows, q_len - r), r0, q_len});
    work += q_len * heads * lens[s];
  }
  // Little work (batch 1, short contexts): no point waking a second thread for microseconds.
  const int64_t threads = work < 4096 * group ? 1 : at::get_num_threads();
  const int64_t ahead = std::max<int64_t>(1, kPrefetchBytes / (block_size * D * static_cast<int64_t>(sizeof(T))));
  const auto head_of = [&](const Item& it) {
    const T* kbase = cp + it.head * cache.stride(1);
    return PagedHead<T>{kbase, kbase + cache.stride(0), bt + it.seq * bt_stride, block_size, block_size * D};
  };
  // The tokens an item's last query row sees (its rows' causal lengths grow by one a row).
  const auto tokens_of = [&](const Item& it) { return lens[it.seq] - it.q_len + (it.row0 + it.rows - it.first_row); };
  // Thread t takes items t, t + threads, ...: balanced when costs grow along a long prompt's rows.
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    const T* qs[kAttnRows * 64];
    T* outs[kAttnRows * 64];
    int64_t qlens[kAttnRows * 64];
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i = t; i < static_cast<int64_t>(items.size()); i += threads) {
        const Item& it = items[i];
        const int64_t len = lens[it.seq];
        const PagedHead<T> head = head_of(it);
        int nq = 0;
        for (int64_t r = it.row0; r < it.row0 + it.rows; ++r)
          for (int64_t g = 0; g < group; ++g, ++nq) {
            const int64_t h = it.head * group + g;
            qs[nq] = qp + r * q_stride + h * D;
            outs[nq] = op + (r * heads + h) * D;
            qlens[nq] = len - it.q_len + (r - it.first_row) + 1;
          }
        const bool has_next = i + threads < static_cast<int64_t>(items.size());
        const PagedHead<T> next = has_next ? head_of(items[i + threads]) : head;
        attend<T, NC>(head, qs, qlens, outs, nq, static_cast<float>(scale), scores, ahead, has_next ? &next : nullptr,
                      has_next ? tokens_of(items[i + threads]) : 0);
      }
    }
  });
}

namespace {
// decode_attention and paged_attention: every shape, index and length checked before a read (query_start: [S + 1]
// int32 row offsets, or undefined for one row per sequence).
at::Tensor checked_paged_attention(const char* op, const at::Tensor& q, const at::Tensor& cache,
                                   const at::Tensor& block_tables, const at::Tensor& query_start,
                                   const at::Tensor& seq_lens, double scale) {
  check_float(op, "q", q);
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), op, ": q must be "
              "[tokens, heads, head_dim] with each row's heads contiguous, got sizes ", q.sizes(), " strides ",
              q.strides());
  check_cache(op, cache);
  check_same_dtype(op, "cache", cache, "q", q);
  const int64_t num_blocks = cache.size(2), block_size = cache.size(3);
  TORCH_CHECK(cache.size(4) == q.size(2), op, ": cache must have q's head_dim ", q.size(2), ", got ", cache.size(4));
  TORCH_CHECK(cache.size(1) > 0 && q.size(1) % cache.size(1) == 0, op, ": q's ", q.size(1),
              " heads must be a multiple of the cache's ", cache.size(1), " KV heads");
  TORCH_CHECK(q.size(1) / cache.size(1) <= 64, op, ": at most 64 query heads per KV head, got ",
              q.size(1) / cache.size(1));
  const int64_t batch = query_start.defined() ? seq_lens.numel() : q.size(0);  // sequences
  check_cpu(op, "block_tables", block_tables);
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.stride(1) == 1 &&
              block_tables.size(0) == batch, op, ": block_tables must be int32 [", batch,
              ", max_blocks] with unit column stride, got ", block_tables.scalar_type(), ", sizes ",
              block_tables.sizes(), " strides ", block_tables.strides());
  check_index_tensor(op, "seq_lens", seq_lens, at::kInt, batch);
  const int32_t* starts = nullptr;
  if (query_start.defined()) {
    check_index_tensor(op, "query_start_loc", query_start, at::kInt, batch + 1);
    starts = query_start.data_ptr<int32_t>();
    TORCH_CHECK(starts[0] == 0 && starts[batch] == q.size(0), op, ": query_start_loc must run from 0 to q's ",
                q.size(0), " rows, got ", starts[0], "..", starts[batch]);
  }
  // Every block a sequence reads must be in the cache: like the torch twin's index_select, an IndexError.
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int64_t max_len = block_tables.size(1) * block_size;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lens[b] > 0 && lens[b] <= max_len, op, ": seq_lens[", b, "] = ", lens[b], " must be in 1..", max_len,
                " (block_tables has ", block_tables.size(1), " blocks of ", block_size, " tokens per sequence)");
    if (starts) {
      const int64_t q_len = starts[b + 1] - starts[b];
      TORCH_CHECK(q_len >= 1 && q_len <= lens[b], op, ": sequence ", b, " has ", q_len,
                  " query rows (query_start_loc); it must have 1..seq_lens[", b, "] = ", lens[b]);
    }
    for (int64_t blk = 0; blk * block_size < lens[b]; ++blk) {
      const int32_t id = bt[b * block_tables.stride(0) + blk];
      TORCH_CHECK_INDEX(id >= 0 && id < num_blocks, op, ": block_tables[", b, ", ", blk, "] = ", id,
                        " is outside the cache's ", num_blocks, " blocks");
    }
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  const int64_t d = q.size(2);
  const bool bf16_q = is_bf16(q);
#define NPU_INFER_ATTEND(NC)                                                                              \
  if (d == NC * 16) {                                                                                     \
    if (bf16_q) paged_attention_impl<bf16, NC>(out, q, cache, block_tables, starts, seq_lens, scale);    \
    else paged_attention_impl<float, NC>(out, q, cache, block_tables, starts, seq_lens, scale);           \
    return out;                                                                                           \
  }
  NPU_INFER_ATTEND(1) NPU_INFER_ATTEND(2) NPU_INFER_ATTEND(4) NPU_INFER_ATTEND(6) NPU_INFER_ATTEND(8) NPU_INFER_ATTEND(16)
#undef NPU_INFER_ATTEND
  TORCH_CHECK(false, op, ": head_dim ", d, " is not one of 16, 32, 64, 96, 128, 256");
}
}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale) {
  return checked_paged_attention("decode_attention", q, cache, block_tables, at::Tensor(), seq_lens, scale);
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& block_tables,
                           const at::Tensor& query_start_loc, const at::Tensor& seq_lens, double scale) {
  return checked_paged_attention("paged_attention", q, cache, block_tables, query_start_loc, seq_lens, scale);
}

// ---------------------------------------------------------------------------------------------------
// Linear for decode-sized batches: y [M, N] = x [M, K] @ W^T + bias, W pre-packed by pack_linear into 64-row
// panels [ceil(N / 64), K / pairs, 64, pairs] (pairs = 2 for bf16, 1 for fp32): each step down a panel reads one
// 256-byte line of weights for 64 output rows. bf16: one AVX512_BF16 dot-product instruction adds
// x[m, 2k..2k+1] . W[n, 2k..2k+1] for 16 rows n at once; fp32: one FMA of a broadcast x[m, k]. No horizontal
// sums, and each thread streams one contiguous stretch of the weights (at small M the GEMV is memory-bound).
at::Tensor pack_linear(const at::Tensor& weight) {
  check_float("pack_linear", "weight", weight);
  const int64_t pairs = is_bf16(weight) ? 2 : 1;
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) % pairs == 0, "pack_linear: weight must be 2-D [N, K] (K even "
              "for bfloat16), got ", weight.scalar_type(), " sizes ", weight.sizes());
  const int64_t n = weight.size(0), k = weight.size(1), panels = (n + 63) / 64;
  at::Tensor padded = at::zeros({panels * 64, k}, weight.options());
  padded.narrow(0, 0, n).copy_(weight);
  // [P, 64, K/pairs, pairs] -> [P, K/pairs, 64, pairs]
  return padded.view({panels, 64, k / pairs, pairs}).permute({0, 2, 1, 3}).contiguous();
}


template <typename W, typename Out>
void linear_packed_impl(const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, int64_t n,
                        const c10::optional<at::Tensor>& bias) {
  const int64_t rows = x.size(0), steps = packed.size(1), panels = packed.size(0);
  const char* xp = static_cast<const char*>(x.data_ptr());
  const size_t x_step_bytes = sizeof(W) * packed.size(3);  // one step of K: a bf16 pair or one float
  const W* wp = packed.data_ptr<W>();
  const W* bp = bias ? bias->data_ptr<W>() : nullptr;
  Out* op = out.data_ptr<Out>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    float acc[kMaxRowsPerPass * 64];
    for (int64_t p = begin; p < end; ++p) {
      const W* panel = wp + p * steps * 64 * packed.size(3);
      const int64_t valid = std::min<int64_t>(64, n - p * 64);
      for (int64_t m0 = 0; m0 < rows; m0 += kMaxRowsPerPass) {  // later passes find the panel in cache
        const int64_t mr = std::min<int64_t>(kMaxRowsPerPass, rows - m0);
        const void* xr = xp + m0 * steps * x_step_bytes;
        switch (mr) {
          case 1: panel_dot<W, 1>(panel, xr, steps, steps, acc); break;
          case 2: panel_dot<W, 2>(panel, xr, steps, steps, acc); break;
          case 3: panel_dot<W, 3>(panel, xr, steps, steps, acc); break;
          default: panel_dot<W, 4>(panel, xr, steps, steps, acc); break;
        }
        for (int64_t m = 0; m < mr; ++m) {
          Out* dst = op + (m0 + m) * n + p * 64;
          for (int64_t j = 0; j < 64; j += 16) {
            if (j >= valid) break;
            __mmask16 mask = tail_mask(valid - j);
            __m512 y = _mm512_loadu_ps(acc + m * 64 + j);
            // Like F.linear: the bias is added to the fp32 accumulator before the one rounding.
            if (bp) y = _mm512_add_ps(y, load16_masked(bp + p * 64 + j, mask));
            store16_masked(dst + j, y, mask);
          }
        }
      }
    }
  });
}

// fp32_out: keep the fp32 accumulator (logits: bf16 would round them to steps of 1/8 near 20, making ties).
at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                         const c10::optional<at::Tensor>& bias, bool fp32_out) {
  check_float("linear_packed", "packed", packed);
  const bool bf16_weights = is_bf16(packed);
  TORCH_CHECK(packed.dim() == 4 && packed.is_contiguous() && packed.size(2) == 64 &&
              packed.size(3) == (bf16_weights ? 2 : 1) && n >= 0 && packed.size(0) * 64 >= n,
              "linear_packed: packed must be what pack_linear returned for an [n = ", n, ", K] weight, got sizes ",
              packed.sizes());
  check_same_dtype("linear_packed", "x", x, "packed", packed);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) == packed.size(1) * packed.size(3),
              "linear_packed: x must be contiguous [M, ", packed.size(1) * packed.size(3), "] (the weight's K), got "
              "sizes ", x.sizes(), " strides ", x.strides());
  if (bias) {
    check_same_dtype("linear_packed", "bias", *bias, "x", x);
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == n, "linear_packed: bias must be contiguous [", n,
                "], got sizes ", bias->sizes());
  }
  const bool out_fp32 = fp32_out || !bf16_weights;
  at::Tensor out = at::empty({x.size(0), n}, x.options().dtype(out_fp32 ? at::kFloat : at::kBFloat16));
  if (!bf16_weights) linear_packed_impl<float, float>(out, x, packed, n, bias);
  else if (fp32_out) linear_packed_impl<bf16, float>(out, x, packed, n, bias);
  else linear_packed_impl<bf16, bf16>(out, x, packed, n, bias);
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Structured outputs' token bitmask (xgrammar's packed layout: token v is allowed when bit v % 32 of word v / 32
// is set) applied in place: logits[rows[b], v] = -inf for every banned v, and for every v past the mask's
// 32 * words bits (a vocabulary padded beyond the tokenizer's). One pass, 32 tokens per word, whole words of
// allowed tokens skipped: torch's unpack-then-masked_fill took 2.2 ms for 16 x 49152, mostly the unpacking.
template <typename T>
void ban_by_bitmask_impl(const at::Tensor& logits, const at::Tensor& bitmask, const at::Tensor& rows) {
  const int64_t vocab = logits.size(1), words = bitmask.size(1);
  const int64_t covered = std::min(words * 32, vocab);
  const int32_t* mask = bitmask.data_ptr<int32_t>();
  const int64_t* row = rows.data_ptr<int64_t>();
  T* base = logits.data_ptr<T>();
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  at::parallel_for(0, rows.numel(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* out = base + row[b] * logits.stride(0);
      const uint32_t* w = reinterpret_cast<const uint32_t*>(mask + b * bitmask.stride(0));
      for (int64_t v = 0; v < covered; v += 32) {
        const uint32_t banned = ~w[v / 32];
        if (banned == 0) continue;
        const __mmask16 lo = __mmask16(banned & 0xFFFF) & tail_mask(covered - v);
        const __mmask16 hi = __mmask16(banned >> 16) & tail_mask(std::max<int64_t>(covered - v - 16, 0));
        store16_masked(out + v, neg_inf, lo);
        if (hi) store16_masked(out + v + 16, neg_inf, hi);
      }
      for (int64_t v = covered; v < vocab; v += 16) store16_masked(out + v, neg_inf, tail_mask(vocab - v));
    }
  });
}

void ban_by_bitmask_(const at::Tensor& logits, const at::Tensor& bitmask, const at::Tensor& rows) {
  check_float("ban_by_bitmask_", "logits", logits);
  check_rows("ban_by_bitmask_", "logits", logits, "[rows, vocab]");
  check_cpu("ban_by_bitmask_", "bitmask", bitmask);
  TORCH_CHECK(bitmask.scalar_type() == at::kInt && bitmask.dim() == 2 && bitmask.stride(1) == 1,
              "ban_by_bitmask_: bitmask must be int32 [masked rows, words] with unit column stride, got ",
              bitmask.scalar_type(), " sizes ", bitmask.sizes(), " strides ", bitmask.strides());
  check_index_tensor("ban_by_bitmask_", "rows", rows, at::kLong, bitmask.size(0));
  const int64_t* row = rows.data_ptr<int64_t>();
  for (int64_t b = 0; b < rows.numel(); ++b)
    TORCH_CHECK(row[b] >= 0 && row[b] < logits.size(0), "ban_by_bitmask_: rows[", b, "] = ", row[b],
                " is outside the ", logits.size(0), " rows of logits");
  if (is_bf16(logits)) ban_by_bitmask_impl<bf16>(logits, bitmask, rows);
  else ban_by_bitmask_impl<float>(logits, bitmask, rows);
}

// ---------------------------------------------------------------------------------------------------
// Greedy sampling: the index of each row's largest logit, the first one on ties (torch.argmax's answer). One pass
// for the row's maximum, one for its first position; torch's argmax walks the row one element at a time (2.8 ms
// for 64 x 49152 fp32 on 2 cores). A row holding a NaN is flagged in has_nan and left to torch (CpuOps.argmax_rows),
// which calls NaN the maximum.
template <typename T>
void argmax_rows_impl(const at::Tensor& logits, const at::Tensor& out, const at::Tensor& has_nan) {
  const int64_t rows = logits.size(0), vocab = logits.size(1), stride = logits.stride(0);
  const T* base = logits.data_ptr<T>();
  int64_t* op = out.data_ptr<int64_t>();
  bool* nan = has_nan.data_ptr<bool>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = base + r * stride;
      __m512 mx = _mm512_set1_ps(-INFINITY);
      __mmask16 unordered = 0;
      for (int64_t v = 0; v < vocab; v += 16) {
        const __mmask16 m = tail_mask(vocab - v);
        const __m512 x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), m, load16_masked(row + v, m));
        unordered |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        mx = _mm512_max_ps(mx, x);
      }
      nan[r] = unordered != 0;
      const float best = _mm512_reduce_max_ps(mx);
      const __m512 target = _mm512_set1_ps(best);
      int64_t found = 0;
      for (int64_t v = 0; v < vocab; v += 16) {
        const __mmask16 m = tail_mask(vocab - v);
        const __mmask16 hit = _mm512_mask_cmp_ps_mask(m, load16_masked(row + v, m), target, _CMP_EQ_OQ);
        if (hit) {
          found = v + __builtin_ctz(static_cast<unsigned>(hit));
          break;
        }
      }
      op[r] = found;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> argmax_rows(const at::Tensor& logits) {
  check_float("argmax_rows", "logits", logits);
  check_rows("argmax_rows", "logits", logits, "[rows, vocab]");
  TORCH_CHECK(logits.size(1) > 0, "argmax_rows: logits must have at least one column");
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  at::Tensor has_nan = at::empty({logits.size(0)}, logits.options().dtype(at::kBool));
  if (is_bf16(logits)) argmax_rows_impl<bf16>(logits, out, has_nan);
  else argmax_rows_impl<float>(logits, out, has_nan);
  return {out, has_nan};
}

}  // namespace npu_infer_kernels
