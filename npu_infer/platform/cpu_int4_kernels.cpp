// W4A16 linear (see cpu_int4_kernels.h), laid out like W8A16's group-wise kernel (cpu_int8_kernels.cpp): 64-row
// panels, up to kMaxRowsPerPass rows a pass, each group's partial sums in fp32 registers, then scaled once.
#include "cpu_int4_kernels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "cpu_simd.h"

namespace npu_infer_int4 {
namespace {

using namespace npu_infer_simd;

// bf16 of 0..15 (exact), a vpermw table: one nibble index -> its bf16 bits.
alignas(64) constexpr uint16_t kNibbleBf16[32] = {
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0x4100, 0x4110, 0x4120,
    0x4130, 0x4140, 0x4150, 0x4160, 0x4170, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0,
    0x40C0, 0x40E0, 0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};

// One step of a panel (64 bytes: 128 nibbles, 64 rows x a k pair) as four bf16 vectors of 16 rows x 2 k each: byte i
// of half h holds value h * 64 + i in its low nibble and h * 64 + 32 + i in its high one.
inline void nibbles_to_bf16(const uint8_t* step, const __m512i table, __m512bh out[4]) {
  const __m512i low = _mm512_set1_epi16(0x0F);
  for (int h = 0; h < 2; ++h) {
    const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(step + 32 * h)));
    out[2 * h] = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(_mm512_and_si512(bytes, low), table));
    out[2 * h + 1] = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table));
  }
}

// acc_out[m * 64 + r] = sum over groups of d * (x[m] . q[r] over the group) + m_g * xsum[m, g] for M rows of x against
// one panel: from the nibbles (one pass) or from the panel made bf16 once in `scratch` (more rows than one pass).
template <int M>
void panel_dot_w4a16(const uint8_t* panel, const bf16* scratch, const bf16* x, int64_t x_stride, int64_t steps,
                     int64_t group_steps, const float* scales, const float* mins, const float* xsum, int64_t groups,
                     float* acc_out) {
  const __m512i table = _mm512_load_si512(kNibbleBf16);
  for (int i = 0; i < M * 64; i += 16) _mm512_storeu_ps(acc_out + i, _mm512_setzero_ps());
  const int32_t* xp = reinterpret_cast<const int32_t*>(x);
  for (int64_t g = 0, k0 = 0; k0 < steps; ++g, k0 += group_steps) {
    __m512 part[M][4];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < 4; ++j) part[m][j] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k0 + group_steps; ++k) {
      __m512bh wv[4];
      if (scratch) {
        for (int j = 0; j < 4; ++j) wv[j] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(scratch + k * 128 + j * 32));
      } else {
        _mm_prefetch(reinterpret_cast<const char*>(panel + (k + 64) * 64), _MM_HINT_T1);  // 4 KB ahead
        nibbles_to_bf16(panel + k * 64, table, wv);
      }
      for (int m = 0; m < M; ++m) {
        const __m512bh xb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(xp[m * x_stride + k]));
        for (int j = 0; j < 4; ++j) part[m][j] = _mm512_dpbf16_ps(part[m][j], wv[j], xb);
      }
    }
    for (int j = 0; j < 4; ++j) {
      const __m512 d = _mm512_loadu_ps(scales + g * 64 + j * 16);
      const __m512 mn = _mm512_loadu_ps(mins + g * 64 + j * 16);
      for (int m = 0; m < M; ++m) {
        float* total = acc_out + m * 64 + j * 16;
        const __m512 t = _mm512_fmadd_ps(part[m][j], d, _mm512_loadu_ps(total));
        _mm512_storeu_ps(total, _mm512_fmadd_ps(_mm512_set1_ps(xsum[m * groups + g]), mn, t));
      }
    }
    if constexpr (M == 4) asm volatile("" ::: "memory");  // as W8A16's: keep the totals in L1, the weights in zmm
  }
}

template <typename Out>
void linear_w4a16_impl(const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& mins, int64_t n, const c10::optional<at::Tensor>& bias) {
  const int64_t rows = x.size(0), k = x.size(1), steps = packed.size(1), panels = packed.size(0);
  const int64_t groups = scales.size(1), group_steps = steps / groups, group = k / groups;
  const bf16* xp = x.data_ptr<bf16>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* mp = mins.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  Out* op = out.data_ptr<Out>();
  // Each row's sum of x over each group, in fp32: the m term of every output.
  std::vector<float> xsum(rows * groups);
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        __m512 s = _mm512_setzero_ps();
        for (int64_t c = 0; c < group; c += 16)
          s = _mm512_add_ps(s, load16_masked(xp + r * k + g * group + c, tail_mask(group - c)));
        xsum[r * groups + g] = _mm512_reduce_add_ps(s);
      }
  });
  const bool convert_once = rows > kMaxRowsPerPass;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    const __m512i table = _mm512_load_si512(kNibbleBf16);
    float acc[kMaxRowsPerPass * 64];
    std::vector<bf16> scratch(convert_once ? steps * 128 : 0);
    const bf16* sc = convert_once ? scratch.data() : nullptr;
    for (int64_t p = begin; p < end; ++p) {
      const uint8_t* panel = wp + p * steps * 64;
      const float* ps = sp + p * groups * 64;
      const float* pm = mp + p * groups * 64;
      if (convert_once)
        for (int64_t s = 0; s < steps; ++s) {
          __m512bh wv[4];
          nibbles_to_bf16(panel + s * 64, table, wv);
          for (int j = 0; j < 4; ++j)
            _mm512_storeu_si512(scratch.data() + s * 128 + j * 32, reinterpret_cast<__m512i>(wv[j]));
        }
      const int64_t valid = std::min<int64_t>(64, n - p * 64);
      for (int64_t m0 = 0; m0 < rows; m0 += kMaxRowsPerPass) {
        const int64_t mr = std::min<int64_t>(kMaxRowsPerPass, rows - m0);
        const bf16* xr = xp + m0 * k;
        const float* xs = xsum.data() + m0 * groups;
        switch (mr) {
          case 1: panel_dot_w4a16<1>(panel, sc, xr, steps, steps, group_steps, ps, pm, xs, groups, acc); break;
          case 2: panel_dot_w4a16<2>(panel, sc, xr, steps, steps, group_steps, ps, pm, xs, groups, acc); break;
          case 3: panel_dot_w4a16<3>(panel, sc, xr, steps, steps, group_steps, ps, pm, xs, groups, acc); break;
          default: panel_dot_w4a16<4>(panel, sc, xr, steps, steps, group_steps, ps, pm, xs, groups, acc); break;
        }
        for (int64_t m = 0; m < mr; ++m) {
          Out* dst = op + (m0 + m) * n + p * 64;
          for (int64_t j = 0; j < valid; j += 16) {
            const __mmask16 mask = tail_mask(valid - j);
            __m512 y = _mm512_loadu_ps(acc + m * 64 + j);
            if (bp) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, bp + p * 64 + j));
            store16_masked(dst + j, y, mask);
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor linear_w4a16(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                        const at::Tensor& mins, int64_t n, const c10::optional<at::Tensor>& bias, bool fp32_out) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.dim() == 3 &&
              packed.size(2) == 64 && packed.is_contiguous() && n > 0 && packed.size(0) * 64 >= n,
              "linear_w4a16: packed must be what pack_int4 returned for n = ", n, " rows (uint8 [panels, K / 2, 64]), "
              "got ", packed.scalar_type(), " sizes ", packed.sizes());
  const int64_t k = packed.size(1) * 2;
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous() &&
              x.size(1) == k, "linear_w4a16: x must be contiguous bfloat16 [M, ", k, "] (the weight's K), got ",
              x.scalar_type(), " sizes ", x.sizes());
  for (const at::Tensor* t : {&scales, &mins})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 &&
                t->size(0) == packed.size(0) && t->size(2) == 64 && t->size(1) > 0 && k % (2 * t->size(1)) == 0,
                "linear_w4a16: scales and mins must be contiguous fp32 [", packed.size(0),
                ", groups, 64] with K / groups even, got ", t->scalar_type(), " sizes ", t->sizes());
  TORCH_CHECK(mins.sizes() == scales.sizes(), "linear_w4a16: mins ", mins.sizes(), " must match scales ",
              scales.sizes());
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() >= n),
              "linear_w4a16: bias must be contiguous fp32 [>= ", n, "]");
  at::Tensor out = at::empty({x.size(0), n}, x.options().dtype(fp32_out ? at::kFloat : at::kBFloat16));
  if (x.size(0) == 0) return out;
  if (fp32_out) linear_w4a16_impl<float>(out, x, packed, scales, mins, n, bias);
  else linear_w4a16_impl<bf16>(out, x, packed, scales, mins, n, bias);
  return out;
}

}  // namespace npu_infer_int4
