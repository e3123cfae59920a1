// CPU kernel of gelu (torch-free; the API is in common/kernels.h).
//
// GELU(x) = x * Phi(x) = 0.5 x erfc(-x / sqrt(2)), the exact (erf) form of
// GPT-NeoX's "gelu". Evaluated in float32 from z = |x| / sqrt(2), one of two
// formulas per element:
//   z < 0.5   0.5 x + 0.5 |x| erf(z), erf(z) = z P(z^2) with Cephes erff's
//             degree-6 polynomial (relative error ~1e-9 before rounding);
//   z >= 0.5  erfc(z) = t exp(Q(t) - z^2), t = 1 / (1 + z / 2) (Numerical
//             Recipes' erfcc: fractional error < 1.2e-7 for every z), then
//             x - 0.5 x erfc(z) for x > 0 and 0.5 x erfc(z) for x < 0.
// The second form never computes 1 + erf(z) for negative x, where float32
// cancels, and it takes exp's argument q - x^2 / 2 (up to ~87 in size) with
// x^2 split exactly and the rounding of the difference carried as a
// correction: measured against float64 on [-13, 10] (tests/test_gelu.py),
// within 7 ulp everywhere and 1.5 ulp for x >= 0, where torch's float32
// GELU (0.5 x (1 + erf(x / sqrt 2))) is off by ~2,000 ulp at x = -3 and
// keeps no correct digit below x = -5. From x ~ -13.13 down, where |GELU| <
// ~1.4e-38 (the last normal floats, then denormals), the result is flushed
// to (-)0 (kExpMin). Specials as torch's scalar and float64 GELU: +inf ->
// +inf, -inf -> NaN, NaN -> NaN, and the sign of a zero result is x's (-0 ->
// -0). (torch 2.14's vectorized float32 / bf16 CPU GELU returns NaN for +inf.)
//
// Why an op of our own rather than F.gelu: at decode sizes (3,072 or 8,192
// values per token) torch's CPU GELU (oneDNN's eltwise primitive) took 14 and
// 15 us per call in a loop and 37-73 us inside a decode step (torch
// profiler), against 6.3 and 12.5 us in a loop and 8-11 us in the step here,
// all dispatch included (2-vCPU AVX-512 Xeon). The cost is ~3 cycles per
// value (both formulas, a division and the exact exp argument for every
// lane), so from ~20,000 values on oneDNN's cheaper approximation is faster
// (98,304 values, 2 threads: 90 us against 39): a prefill pays that, ~0.6 ms
// for pythia-160m at 32 tokens.
//
// Every ISA computes the same operations in the same order (explicit FMAs,
// a correctly rounded division, exp_cephes and its vector twins, which round
// alike), so AVX-512, AVX2 and scalar write the same bits, NaNs included (a
// NaN comes out as itself, quieted; float16 stores write every NaN as
// from_f32 does).
// gcc 12's AVX-512 headers trip -Wmaybe-uninitialized inside their own
// undefined-vector placeholders (as in gemm_4bit.cpp): a known false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/elements.h"
#include "common/kernels.h"
#include "common/simd_x86.h"

namespace pythia_native {
namespace cpu {
namespace {

constexpr float kRsqrt2 = 0.70710678118654752f;
// erf(z) = z * P(z^2) for |z| < 1 (Cephes erff), highest degree first.
constexpr float kErfP[7] = {7.853861353153693e-5f,  -8.010193625184903e-4f, 5.188327685732524e-3f,
                            -2.685381193529856e-2f, 1.128358514861418e-1f,  -3.761262582423300e-1f,
                            1.128379165726710e+0f};
// erfc(z) = t * exp(-z^2 + Q(t)), t = 1 / (1 + z / 2) (Numerical Recipes'
// erfcc), highest degree first.
constexpr float kErfcQ[10] = {0.17087277f,  -0.82215223f, 1.48851587f,  -1.13520398f,
                              0.27886807f,  -0.18628806f, 0.09678418f,  0.37409196f,
                              1.00002368f,  -1.26551223f};
// Below this, exp's argument is out of its range (exp_cephes clamps): erfc is
// taken as 0, and GELU(x) flushed to (-)0 from x <= ~-13.13 (|GELU| <
// ~1.4e-38: the last normal floats and the subnormals below them).
constexpr float kExpMin = kExpFloor;
// The formula switch: below it the erf series, whose 1 + erf(z) has not yet
// cancelled much for negative x (1 - erf(0.5) = 0.48).
constexpr float kSeriesMaxZ = 0.5f;

inline float gelu_scalar(float x) {
  if (x != x) return x + x;  // NaN: itself, quieted (as the vector lanes)
  const float z = std::fabs(x) * kRsqrt2;
  // z < 0.5: the erf series.
  const float zz = z * z;
  float p = kErfP[0];
  for (int i = 1; i < 7; ++i) p = std::fma(p, zz, kErfP[i]);
  const float hx = x * 0.5f;
  // x's sign: exact for every nonzero value (hx (1 - erf z) for x < 0), and
  // it keeps -0 for a -0 or a negative x so small that hx rounds to -0, where
  // the FMA gives 0 + -0 = +0 (torch's GELU keeps the sign).
  const float series = std::copysign(std::fma(std::fabs(hx), z * p, hx), x);
  // z >= 0.5: erfc.
  const float t = 1.0f / std::fma(0.5f, z, 1.0f);
  float q = kErfcQ[0];
  for (int i = 1; i < 10; ++i) q = std::fma(q, t, kErfcQ[i]);
  // exp's argument q - z^2 = q - x^2 / 2, whose size reaches ~87: x^2 split
  // exactly (xx + lo) and the rounding of q - xx / 2 recovered (TwoSum), so
  // that arg + arg_lo is exact to ~1e-12 and the tail keeps its digits.
  const float xx = x * x;
  const float lo = std::fma(x, x, -xx);
  const float half_xx = -0.5f * xx;  // exact
  const float arg = q + half_xx;
  const float bb = arg - q;
  const float arg_lo = std::fma(-0.5f, lo, (q - (arg - bb)) + (half_xx - bb));
  const bool under = arg < kExpMin;
  const float ex = exp_cephes(arg);
  const float e = under ? 0.0f : (t * std::fma(ex, arg_lo, ex)) * 0.5f;
  const float h = rounded(x * e);  // 0.5 x erfc(z), rounded before x - h (no FMA)
  const float tail = x > 0.0f ? (under ? x : x - h) : h;
  return z < kSeriesMaxZ ? series : tail;
}

template <typename T>
void gelu_scalar_range(const T* x, T* y, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) y[i] = from_f32<T>(gelu_scalar(to_f32(x[i])));
}

// ---------------------------------------------------------------- AVX-512 ---

#define PN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

// gelu_scalar on 16 lanes: both formulas, then a blend.
PN_AVX512 inline __m512 gelu16(__m512 x) {
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 z = _mm512_mul_ps(ax, _mm512_set1_ps(kRsqrt2));
  const __m512 zz = _mm512_mul_ps(z, z);
  __m512 p = _mm512_set1_ps(kErfP[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, zz, _mm512_set1_ps(kErfP[i]));
  const __m512 hx = _mm512_mul_ps(x, _mm512_set1_ps(0.5f));
  const __m512 sign = _mm512_set1_ps(-0.0f);
  const __m512 series = _mm512_or_ps(  // copysign (gelu_scalar)
      _mm512_abs_ps(_mm512_fmadd_ps(_mm512_abs_ps(hx), _mm512_mul_ps(z, p), hx)),
      _mm512_and_ps(sign, x));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.5f), z, one));
  __m512 q = _mm512_set1_ps(kErfcQ[0]);
  for (int i = 1; i < 10; ++i) q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(kErfcQ[i]));
  const __m512 xx = _mm512_mul_ps(x, x);
  const __m512 lo = _mm512_fmsub_ps(x, x, xx);
  const __m512 half_xx = _mm512_mul_ps(xx, _mm512_set1_ps(-0.5f));
  const __m512 arg = _mm512_add_ps(q, half_xx);
  const __m512 bb = _mm512_sub_ps(arg, q);
  const __m512 arg_lo = _mm512_fmadd_ps(
      _mm512_set1_ps(-0.5f), lo,
      _mm512_add_ps(_mm512_sub_ps(q, _mm512_sub_ps(arg, bb)), _mm512_sub_ps(half_xx, bb)));
  const __mmask16 under = _mm512_cmp_ps_mask(arg, _mm512_set1_ps(kExpMin), _CMP_LT_OQ);
  const __m512 ex = exp16(arg);
  const __m512 e = _mm512_maskz_mov_ps(
      static_cast<__mmask16>(~under),
      _mm512_mul_ps(_mm512_mul_ps(t, _mm512_fmadd_ps(ex, arg_lo, ex)), _mm512_set1_ps(0.5f)));
  const __m512 h = rounded(_mm512_mul_ps(x, e));
  const __mmask16 pos = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ);
  const __m512 tail =
      _mm512_mask_blend_ps(pos, h, _mm512_mask_blend_ps(under, _mm512_sub_ps(x, h), x));
  const __mmask16 near = _mm512_cmp_ps_mask(z, _mm512_set1_ps(kSeriesMaxZ), _CMP_LT_OQ);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_mask_blend_ps(nan, _mm512_mask_blend_ps(near, tail, series), _mm512_add_ps(x, x));
}

template <typename T>
PN_AVX512 void gelu_avx512(const T* x, T* y, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; i += 16) {
    const int64_t left = i1 - i;
    const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xffff)
                                   : static_cast<__mmask16>((1u << left) - 1);
    store16(y + i, gelu16(load16(x + i, m)), m);
  }
}

// ------------------------------------------------------------------- AVX2 ---

#define PN_AVX2 __attribute__((target("avx2,fma,f16c")))

// gelu16 on 8 lanes (blendv selects where the mask's lanes are all ones).
PN_AVX2 inline __m256 gelu8(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 ax = _mm256_andnot_ps(sign, x);
  const __m256 z = _mm256_mul_ps(ax, _mm256_set1_ps(kRsqrt2));
  const __m256 zz = _mm256_mul_ps(z, z);
  __m256 p = _mm256_set1_ps(kErfP[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, zz, _mm256_set1_ps(kErfP[i]));
  const __m256 hx = _mm256_mul_ps(x, _mm256_set1_ps(0.5f));
  const __m256 series = _mm256_or_ps(  // copysign (gelu_scalar)
      _mm256_andnot_ps(sign, _mm256_fmadd_ps(_mm256_andnot_ps(sign, hx), _mm256_mul_ps(z, p), hx)),
      _mm256_and_ps(sign, x));
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.5f), z, one));
  __m256 q = _mm256_set1_ps(kErfcQ[0]);
  for (int i = 1; i < 10; ++i) q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(kErfcQ[i]));
  const __m256 xx = _mm256_mul_ps(x, x);
  const __m256 lo = _mm256_fmsub_ps(x, x, xx);
  const __m256 half_xx = _mm256_mul_ps(xx, _mm256_set1_ps(-0.5f));
  const __m256 arg = _mm256_add_ps(q, half_xx);
  const __m256 bb = _mm256_sub_ps(arg, q);
  const __m256 arg_lo = _mm256_fmadd_ps(
      _mm256_set1_ps(-0.5f), lo,
      _mm256_add_ps(_mm256_sub_ps(q, _mm256_sub_ps(arg, bb)), _mm256_sub_ps(half_xx, bb)));
  const __m256 under = _mm256_cmp_ps(arg, _mm256_set1_ps(kExpMin), _CMP_LT_OQ);
  const __m256 ex = exp8(arg);
  const __m256 scaled = _mm256_mul_ps(t, _mm256_fmadd_ps(ex, arg_lo, ex));
  const __m256 e = _mm256_andnot_ps(under, _mm256_mul_ps(scaled, _mm256_set1_ps(0.5f)));
  const __m256 h = rounded(_mm256_mul_ps(x, e));
  const __m256 pos = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ);
  const __m256 tail = _mm256_blendv_ps(h, _mm256_blendv_ps(_mm256_sub_ps(x, h), x, under), pos);
  const __m256 near = _mm256_cmp_ps(z, _mm256_set1_ps(kSeriesMaxZ), _CMP_LT_OQ);
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  return _mm256_blendv_ps(_mm256_blendv_ps(tail, series, near), _mm256_add_ps(x, x), nan);
}

template <typename T>
PN_AVX2 void gelu_avx2(const T* x, T* y, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) store8(y + i, gelu8(load8(x + i)));
  gelu_scalar_range(x, y, i, i1);  // the same bits as the vector lanes
}

template <typename T>
void gelu_typed(const void* x, void* y, int64_t i0, int64_t i1, Isa isa) {
  const T* xp = static_cast<const T*>(x);
  T* yp = static_cast<T*>(y);
  switch (isa) {
    case Isa::AVX512: gelu_avx512(xp, yp, i0, i1); break;
    case Isa::AVX2:
      if (std::is_same<T, F16>::value && !__builtin_cpu_supports("f16c")) {
        gelu_scalar_range(xp, yp, i0, i1);
      } else {
        gelu_avx2(xp, yp, i0, i1);
      }
      break;
    default: gelu_scalar_range(xp, yp, i0, i1);
  }
}

}  // namespace

void gelu_range(const void* x, void* y, DType dt, int64_t i0, int64_t i1, Isa isa) {
  switch (dt) {
    case DType::F32: gelu_typed<float>(x, y, i0, i1, isa); break;
    case DType::BF16: gelu_typed<Bf16>(x, y, i0, i1, isa); break;
    case DType::F16: gelu_typed<F16>(x, y, i0, i1, isa); break;
  }
}

}  // namespace cpu
}  // namespace pythia_native
