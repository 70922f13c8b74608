// int8 linears (see cpu_int8_kernels.h). Each has a plain-torch twin in npu_infer/models/layers/int8_linear.py
// that the tests compare against: W8A8 bit for bit (exact integer sums, then the same fp32 scale math), W8A16 to
// fp32 summation order.
#include "cpu_int8_kernels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_simd.h"

namespace npu_infer_int8 {
namespace {

using namespace npu_infer_simd;

// ---------------------------------------------------------------------------------------------------
// Per-token quantization: one pass for the absmax, one to scale, round and narrow.
template <typename T>
void quantize_impl(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  const int64_t rows = x.size(0), k = x.size(1), kp = q.size(1), xs = x.stride(0);
  const T* xp = x.data_ptr<T>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    for (int64_t i = begin; i < end; ++i) {
      const T* src = xp + i * xs;
      __m512 mx = _mm512_setzero_ps();
      for (int64_t c = 0; c < k; c += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(load16_masked(src + c, tail_mask(k - c))));
      float s = _mm512_reduce_max_ps(mx) / 127.0f;
      if (s == 0.0f) s = 1.0f;
      sp[i] = s;
      const __m512 vs = _mm512_set1_ps(s);
      int8_t* dst = qp + i * kp;
      for (int64_t c = 0; c < k; c += 16) {
        const __mmask16 m = tail_mask(k - c);
        // cvtps_epi32 rounds to nearest even (MXCSR default), as torch.round does.
        __m512i r = _mm512_cvtps_epi32(_mm512_div_ps(load16_masked(src + c, m), vs));
        r = _mm512_min_epi32(_mm512_max_epi32(r, lo), hi);
        _mm512_mask_cvtepi32_storeu_epi8(dst + c, m, r);
      }
      if (kp > k) std::memset(dst + k, 0, kp - k);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// W8A8: acc[m * 64 + r] = sum_k xu[m, k] * W[r, k] over one panel [steps, 64, 4] for M rows, where xu = xq + 128
// as uint8 (vpdpbusd multiplies u8 by s8; w_comp = 128 * sum_k W[r, k] takes the shift back out, exactly).
// Up to 6 rows a pass: 24 accumulators + 4 weight registers + a broadcast fit the 32 zmm, and each weight load
// serves 6 rows.
constexpr int kW8A8RowsPerPass = 6;

// `prefetch`: the first pass over a panel streams it from memory; later passes find it in the cache.
template <int M, bool prefetch = true>
inline void panel_dot_u8s8(const int8_t* panel, const uint8_t* xu, int64_t x_stride, int64_t steps, int32_t* acc_out) {
#ifdef __AVX512VNNI__
  __m512i acc[M][4];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_si512();
  const int8_t* w = panel;
  const int32_t* x4 = reinterpret_cast<const int32_t*>(xu);
  const int64_t row4 = x_stride / 4;
  for (int64_t k = 0; k < steps; ++k, w += 256) {
    if constexpr (prefetch) {
      const char* ahead = reinterpret_cast<const char*>(w) + 256 * 128;
      for (int line = 0; line < 4; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T1);
    }
    __m512i wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = _mm512_loadu_si512(w + j * 64);
    for (int m = 0; m < M; ++m) {
      const __m512i xb = _mm512_set1_epi32(x4[m * row4 + k]);
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], xb, wv[j]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < 4; ++j) _mm512_storeu_si512(acc_out + m * 64 + j * 16, acc[m][j]);
#else
  TORCH_CHECK(false, "linear_w8a8: this CPU lacks AVX512-VNNI");
#endif
}

template <typename Out>
void linear_w8a8_impl(const at::Tensor& out, const at::Tensor& xq, const at::Tensor& x_scale, const at::Tensor& packed,
                      const at::Tensor& w_scale, const at::Tensor& w_comp, int64_t n, const c10::optional<at::Tensor>& bias) {
  const int64_t rows = xq.size(0), steps = packed.size(1), panels = packed.size(0), xs = xq.size(1);
  // The +128 shift once per call (M x K bytes), not once per panel in the inner loop.
  std::vector<uint8_t> shifted(rows * xs);
  const int8_t* xp = xq.data_ptr<int8_t>();
  for (int64_t i = 0; i < rows * xs; ++i) shifted[i] = static_cast<uint8_t>(xp[i]) ^ 0x80u;
  const uint8_t* xu = shifted.data();
  const float* sxp = x_scale.data_ptr<float>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* swp = w_scale.data_ptr<float>();
  const int32_t* cp = w_comp.data_ptr<int32_t>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  Out* op = out.data_ptr<Out>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t acc[kW8A8RowsPerPass * 64];
    for (int64_t p = begin; p < end; ++p) {
      const int8_t* panel = wp + p * steps * 256;
      const int64_t valid = std::min<int64_t>(64, n - p * 64);
      for (int64_t m0 = 0; m0 < rows; m0 += kW8A8RowsPerPass) {
        const int64_t mr = std::min<int64_t>(kW8A8RowsPerPass, rows - m0);
        const uint8_t* xr = xu + m0 * xs;
        switch (mr) {
          case 1: panel_dot_u8s8<1>(panel, xr, xs, steps, acc); break;
          case 2: panel_dot_u8s8<2>(panel, xr, xs, steps, acc); break;
          case 3: panel_dot_u8s8<3>(panel, xr, xs, steps, acc); break;
          case 4: panel_dot_u8s8<4>(panel, xr, xs, steps, acc); break;
          case 5: panel_dot_u8s8<5>(panel, xr, xs, steps, acc); break;
          default:
            if (m0 == 0) panel_dot_u8s8<6>(panel, xr, xs, steps, acc);
            else panel_dot_u8s8<6, false>(panel, xr, xs, steps, acc);
            break;
        }
        for (int64_t m = 0; m < mr; ++m) {
          Out* dst = op + (m0 + m) * n + p * 64;
          const __m512 sx = _mm512_set1_ps(sxp[m0 + m]);
          for (int64_t j = 0; j < valid; j += 16) {
            const __mmask16 mask = tail_mask(valid - j);
            const __m512i exact = _mm512_sub_epi32(_mm512_load_si512(acc + m * 64 + j), _mm512_loadu_si512(cp + p * 64 + j));
            const __m512 s = _mm512_mul_ps(sx, _mm512_loadu_ps(swp + p * 64 + j));
            __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(exact), s);
            if (bp) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, bp + p * 64 + j));
            store16_masked(dst + j, y, mask);
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// W8A16: 32 int8 weights (16 rows x a k pair) made bf16; exact, as every int8 is a bf16.
inline __m512bh int8x32_to_bf16(const int8_t* p) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// As panel_dot<bf16, M>, the weights converted in registers: the whole cost at M = 1 is reading int8.
template <int M>
inline void panel_dot_w8a16(const int8_t* panel, const bf16* x, int64_t x_stride, int64_t steps, float* acc_out) {
  __m512 acc[M][4];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  const int8_t* w = panel;
  const int32_t* xp = reinterpret_cast<const int32_t*>(x);
  for (int64_t k = 0; k < steps; ++k, w += 128) {
    const char* ahead = reinterpret_cast<const char*>(w) + 128 * 128;
    _mm_prefetch(ahead, _MM_HINT_T1);
    _mm_prefetch(ahead + 64, _MM_HINT_T1);
    __m512bh wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = int8x32_to_bf16(w + j * 32);
    for (int m = 0; m < M; ++m) {
      const __m512bh xb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(xp[m * x_stride + k]));
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], wv[j], xb);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(acc_out + m * 64 + j * 16, acc[m][j]);
}

// Group-wise scales [panels, groups, 64]: each group's partial sums in fp32 registers, then acc += partial *
// scale[g] (the scale applied once per group, not per product). W is the panel as stored (int8, converted in
// registers) or as made bf16 once in a scratch buffer (more rows than one pass).
inline __m512bh load_bf16x32(const int8_t* p) { return int8x32_to_bf16(p); }
inline __m512bh load_bf16x32(const bf16* p) { return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p)); }

template <int M, typename W>
inline void panel_dot_w8a16_grouped(const W* panel, const bf16* x, int64_t x_stride, int64_t steps,
                                    int64_t group_steps, const float* scales, float* acc_out) {
  for (int i = 0; i < M * 64; i += 16) _mm512_storeu_ps(acc_out + i, _mm512_setzero_ps());
  const W* w = panel;
  const int32_t* xp = reinterpret_cast<const int32_t*>(x);
  for (int64_t k0 = 0; k0 < steps; k0 += group_steps, scales += 64) {
    __m512 part[M][4];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < 4; ++j) part[m][j] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k0 + group_steps; ++k, w += 128) {
      const char* ahead = reinterpret_cast<const char*>(w) + 128 * 128 * sizeof(W);
      for (size_t line = 0; line < 2 * sizeof(W); ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T1);
      __m512bh wv[4];
      for (int j = 0; j < 4; ++j) wv[j] = load_bf16x32(w + j * 32);
      for (int m = 0; m < M; ++m) {
        const __m512bh xb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(xp[m * x_stride + k]));
        for (int j = 0; j < 4; ++j) part[m][j] = _mm512_dpbf16_ps(part[m][j], wv[j], xb);
      }
    }
    for (int j = 0; j < 4; ++j) {
      const __m512 s = _mm512_loadu_ps(scales + j * 16);
      for (int m = 0; m < M; ++m) {
        float* total = acc_out + m * 64 + j * 16;
        _mm512_storeu_ps(total, _mm512_fmadd_ps(part[m][j], s, _mm512_loadu_ps(total)));
      }
    }
    // At M = 4 the running totals stay in acc_out (L1): the compiler would keep them in registers, and 16 partial
    // sums + 16 totals + 4 weights do not fit in 32 zmm, so it reloaded the weights for every row instead (64 rows
    // of a 3072 x 576 weight took 1.8x the per-channel time, one thread). Up to 3 rows they all fit.
    if constexpr (M == 4) asm volatile("" ::: "memory");
  }
}

template <int M>
inline void panel_dot_w8a16_any(const int8_t* panel, const bf16* scratch, const bf16* x, int64_t steps,
                                int64_t group_steps, const float* scales, float* acc) {
  if (scales == nullptr) {  // per channel: the scale applied in the epilogue
    if (scratch) panel_dot<bf16, M>(scratch, x, steps, steps, acc);
    else panel_dot_w8a16<M>(panel, x, steps, steps, acc);
  } else if (scratch) {
    panel_dot_w8a16_grouped<M>(scratch, x, steps, steps, group_steps, scales, acc);
  } else {
    panel_dot_w8a16_grouped<M>(panel, x, steps, steps, group_steps, scales, acc);
  }
}

// w_scale: [>= panels * 64] per channel, or [panels, groups, 64] per group of K / groups input channels.
template <typename Out>
void linear_w8a16_impl(const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scale,
                       int64_t n, const c10::optional<at::Tensor>& bias) {
  const int64_t rows = x.size(0), steps = packed.size(1), panels = packed.size(0);
  const bool grouped = w_scale.dim() == 3;
  const int64_t groups = grouped ? w_scale.size(1) : 1, group_steps = steps / groups;
  const bf16* xp = x.data_ptr<bf16>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* swp = w_scale.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  Out* op = out.data_ptr<Out>();
  // More rows than one pass: the panel is made bf16 once (same values, same sums) and every pass reads that.
  const bool convert_once = rows > kMaxRowsPerPass;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    float acc[kMaxRowsPerPass * 64];
    std::vector<bf16> scratch(convert_once ? steps * 128 : 0);
    const bf16* sc = convert_once ? scratch.data() : nullptr;
    for (int64_t p = begin; p < end; ++p) {
      const int8_t* panel = wp + p * steps * 128;
      const float* gs = grouped ? swp + p * groups * 64 : nullptr;
      if (convert_once)
        for (int64_t i = 0; i < steps * 128; i += 32)
          _mm512_storeu_si512(scratch.data() + i, reinterpret_cast<__m512i>(int8x32_to_bf16(panel + i)));
      const int64_t valid = std::min<int64_t>(64, n - p * 64);
      for (int64_t m0 = 0; m0 < rows; m0 += kMaxRowsPerPass) {
        const int64_t mr = std::min<int64_t>(kMaxRowsPerPass, rows - m0);
        const bf16* xr = xp + m0 * steps * 2;
        switch (mr) {
          case 1: panel_dot_w8a16_any<1>(panel, sc, xr, steps, group_steps, gs, acc); break;
          case 2: panel_dot_w8a16_any<2>(panel, sc, xr, steps, group_steps, gs, acc); break;
          case 3: panel_dot_w8a16_any<3>(panel, sc, xr, steps, group_steps, gs, acc); break;
          default: panel_dot_w8a16_any<4>(panel, sc, xr, steps, group_steps, gs, acc); break;
        }
        for (int64_t m = 0; m < mr; ++m) {
          Out* dst = op + (m0 + m) * n + p * 64;
          for (int64_t j = 0; j < valid; j += 16) {
            const __mmask16 mask = tail_mask(valid - j);
            __m512 y = _mm512_loadu_ps(acc + m * 64 + j);
            if (!grouped) y = _mm512_mul_ps(y, _mm512_loadu_ps(swp + p * 64 + j));
            if (bp) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, bp + p * 64 + j));
            store16_masked(dst + j, y, mask);
          }
        }
      }
    }
  });
}

void check_packed(const at::Tensor& packed, int64_t group, int64_t n, const char* op) {
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 4 && packed.size(2) == 64 &&
              packed.size(3) == group && packed.is_contiguous() && packed.size(0) * 64 >= n, op,
              ": packed must be what pack_int8 returned (group ", group, ") for n = ", n, " rows, got ",
              packed.scalar_type(), " sizes ", packed.sizes());
}

void check_int8_weight(const at::Tensor& packed, const at::Tensor& w_scale, int64_t group, int64_t n, const char* op) {
  check_packed(packed, group, n, op);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.dim() == 1 &&
              w_scale.numel() >= packed.size(0) * 64,
              op, ": w_scale must be contiguous fp32 [>= ", packed.size(0) * 64, "] (whole panels), got ",
              w_scale.scalar_type(), " sizes ", w_scale.sizes());
}

// Per channel as check_int8_weight, or group-wise [panels, groups, 64] with groups dividing the K pairs (even G).
void check_w8a16_scale(const at::Tensor& packed, const at::Tensor& w_scale, int64_t n) {
  if (w_scale.dim() != 3) return check_int8_weight(packed, w_scale, 2, n, "linear_w8a16");
  check_packed(packed, 2, n, "linear_w8a16");
  const int64_t steps = packed.size(1);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.size(0) == packed.size(0) &&
              w_scale.size(2) == 64 && w_scale.size(1) > 0 && steps % w_scale.size(1) == 0,
              "linear_w8a16: group-wise w_scale must be contiguous fp32 [", packed.size(0),
              ", groups, 64] with groups dividing K / 2 = ", steps, " (an even group size), got ",
              w_scale.scalar_type(), " sizes ", w_scale.sizes());
}

void check_bias(const c10::optional<at::Tensor>& bias, int64_t n, const char* op) {
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() >= n), op,
              ": bias must be contiguous fp32 [", n, "], got ", bias->scalar_type(), " sizes ", bias->sizes());
}

}  // namespace

at::Tensor pack_int8(const at::Tensor& weight, int64_t group) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && (group == 2 || group == 4),
              "pack_int8: weight must be int8 [N, K] and group 2 or 4, got ", weight.scalar_type(), " sizes ",
              weight.sizes(), ", group ", group);
  const int64_t n = weight.size(0), k = weight.size(1), kp = (k + group - 1) / group * group, panels = (n + 63) / 64;
  at::Tensor padded = at::zeros({panels * 64, kp}, weight.options());
  padded.narrow(0, 0, n).narrow(1, 0, k).copy_(weight);
  return padded.view({panels, 64, kp / group, group}).permute({0, 2, 1, 3}).contiguous();
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, int64_t k_padded) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && k_padded >= x.size(1), "quantize_per_token: x must be 2-D [M, K <= ",
              k_padded, "] with unit column stride, got sizes ", x.sizes(), " strides ", x.strides());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "quantize_per_token: x must be bfloat16 or float32, got ", x.scalar_type());
  at::Tensor q = at::empty({x.size(0), k_padded}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  if (is_bf16(x)) quantize_impl<bf16>(x, q, scale);
  else quantize_impl<float>(x, q, scale);
  return {q, scale};
}

at::Tensor linear_w8a8_quantized(const at::Tensor& xq, const at::Tensor& x_scale, const at::Tensor& packed,
                                 const at::Tensor& w_scale, const at::Tensor& w_comp, int64_t n,
                                 const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  check_int8_weight(packed, w_scale, 4, n, "linear_w8a8");
  check_bias(bias, n, "linear_w8a8");
  TORCH_CHECK(xq.scalar_type() == at::kChar && xq.dim() == 2 && xq.is_contiguous() && xq.size(1) == packed.size(1) * 4,
              "linear_w8a8: xq must be contiguous int8 [M, ", packed.size(1) * 4, "] (K padded to 4), got ",
              xq.scalar_type(), " sizes ", xq.sizes());
  TORCH_CHECK(x_scale.scalar_type() == at::kFloat && x_scale.is_contiguous() && x_scale.numel() == xq.size(0),
              "linear_w8a8: x_scale must be contiguous fp32 [", xq.size(0), "], got ", x_scale.scalar_type(),
              " sizes ", x_scale.sizes());
  TORCH_CHECK(w_comp.scalar_type() == at::kInt && w_comp.is_contiguous() && w_comp.numel() >= packed.size(0) * 64,
              "linear_w8a8: w_comp must be contiguous int32 [>= ", packed.size(0) * 64, "] (whole panels), got ",
              w_comp.scalar_type(), " sizes ", w_comp.sizes());
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16, "linear_w8a8: out_dtype must be bfloat16 or float32, got ",
              out_dtype);
  at::Tensor out = at::empty({xq.size(0), n}, xq.options().dtype(out_dtype));
  if (out_dtype == at::kFloat) linear_w8a8_impl<float>(out, xq, x_scale, packed, w_scale, w_comp, n, bias);
  else linear_w8a8_impl<bf16>(out, xq, x_scale, packed, w_scale, w_comp, n, bias);
  return out;
}

at::Tensor linear_w8a8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scale,
                       const at::Tensor& w_comp, int64_t n, const c10::optional<at::Tensor>& bias, bool fp32_out) {
  TORCH_CHECK(packed.dim() == 4, "linear_w8a8: packed must be what pack_int8 returned, got sizes ", packed.sizes());
  TORCH_CHECK(x.dim() == 2 && x.size(1) <= packed.size(1) * 4, "linear_w8a8: x must be 2-D [M, K <= ",
              packed.size(1) * 4, "] (the weight's K), got sizes ", x.sizes());
  auto [xq, x_scale] = quantize_per_token(x, packed.size(1) * 4);
  return linear_w8a8_quantized(xq, x_scale, packed, w_scale, w_comp, n, bias,
                               fp32_out ? at::kFloat : x.scalar_type());
}

at::Tensor linear_w8a16(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scale, int64_t n,
                        const c10::optional<at::Tensor>& bias, bool fp32_out) {
  check_w8a16_scale(packed, w_scale, n);
  check_bias(bias, n, "linear_w8a16");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16 && x.size(1) == packed.size(1) * 2,
              "linear_w8a16: x must be contiguous bfloat16 [M, ", packed.size(1) * 2, "] (the weight's K, even), got ",
              x.scalar_type(), " sizes ", x.sizes());
  at::Tensor out = at::empty({x.size(0), n}, x.options().dtype(fp32_out ? at::kFloat : at::kBFloat16));
  if (fp32_out) linear_w8a16_impl<float>(out, x, packed, w_scale, n, bias);
  else linear_w8a16_impl<bf16>(out, x, packed, w_scale, n, bias);
  return out;
}

}  // namespace npu_infer_int8
