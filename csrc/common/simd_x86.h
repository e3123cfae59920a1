// Vector building blocks shared by the CPU kernels (torch-free, x86-64 only):
// each kernel file keeps its own target attributes; these are the pieces that
// would otherwise be copied into each of them. Each carries the narrowest
// target it needs, so it inlines into any kernel compiled for more.
#pragma once
#if defined(__x86_64__)
#include <immintrin.h>

#include <cmath>

#include "common/elements.h"

namespace pythia_native {
namespace cpu {

// ------------------------------------------------------------------ exp ---
// exp(x) as Cephes expf computes it: x = n ln2 + r (n rounded to nearest even,
// ln2 in two parts), exp(r) by a degree-5 polynomial (~1 ulp), times 2^n.
// Inputs are clamped to >= -87.3 first (n >= -126), so a lane below that
// (down to -inf) comes out ~1e-38 > 0, not 0: callers mask such lanes. NaN
// stays NaN (the clamp is vmaxps(-87.3, x), which returns x when x is NaN):
// a softmax over a NaN score must give NaN, as torch's and the CUDA kernel's
// do, not drop that key as a ~0 weight. Inputs above ~88 overflow (no
// caller has them). The vector versions round exactly as the scalar one does
// (the same FMAs, and 2^n is exact), so a kernel using them writes the same
// bits on every ISA.
// The clamp: exp(kExpFloor) ~ 1.2e-38, the smallest normal float32 (n = -126).
constexpr float kExpFloor = -87.3f;

inline float exp_cephes(float x) {
  if (x != x) return x;  // NaN (and no float -> int conversion of it below)
  x = x >= kExpFloor ? x : kExpFloor;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = std::fma(-n, 0.693359375f, x);
  r = std::fma(-n, -2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r + 1.0f);
  return std::ldexp(p, static_cast<int>(n));
}

#define PN_SIMD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))

// As exp_cephes, 16 lanes; 2^n by vscalefps.
PN_SIMD_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(kExpFloor), x);  // NaN lanes stay NaN (second operand)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// 16 elements at p -> 16 floats; lanes outside `mask` read nothing and are 0.
PN_SIMD_AVX512 inline __m512 load16(const float* p, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, p);
}
PN_SIMD_AVX512 inline __m512 load16(const Bf16* p, __mmask16 mask) {
  // bf16 is the top half of a float32: widen to 32 bits and shift up.
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
PN_SIMD_AVX512 inline __m512 load16(const F16* p, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
}

// The lanes of `mask` of v stored at p, rounded to nearest even as from_f32
// rounds, NaNs included: bf16 NaNs are made quiet as from_f32<Bf16> does;
// float16 uses vcvtps2ph (RNE, overflow to inf), which matches from_f32<F16>
// for every non-NaN value, and NaN lanes become from_f32's 0x7e00 | sign
// (vcvtps2ph would keep payload bits).
PN_SIMD_AVX512 inline void store16(float* p, __m512 v, __mmask16 mask) {
  _mm512_mask_storeu_ps(p, mask, v);
}
PN_SIMD_AVX512 inline void store16(Bf16* p, __m512 v, __mmask16 mask) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  const __m512i bits = _mm512_mask_blend_epi32(nan, rounded, quiet);
  _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(bits));
}
PN_SIMD_AVX512 inline void store16(F16* p, __m512 v, __mmask16 mask) {
  const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16),
                                        _mm512_set1_epi32(0x8000));
  const __m256i canon = _mm512_cvtepi32_epi16(_mm512_or_si512(sign, _mm512_set1_epi32(0x7e00)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  _mm256_mask_storeu_epi16(p, mask, _mm256_mask_blend_epi16(nan, h, canon));
}

// v unchanged, through an empty asm: the compiler cannot contract a product
// passed through it and a following add or sub into one FMA. gcc implements
// the intrinsics as vector arithmetic, which -ffp-contract=fast (its default)
// may fuse; a kernel whose scalar twin rounds the product first must do so too.
PN_SIMD_AVX512 inline __m512 rounded(__m512 v) {
  __asm__("" : "+v"(v));
  return v;
}

#undef PN_SIMD_AVX512

#define PN_SIMD_AVX2 __attribute__((target("avx2,fma")))

// As exp16, 8 lanes; 2^n built in the exponent field (n >= -126 after the clamp).
PN_SIMD_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(kExpFloor), x);  // NaN lanes stay NaN (second operand)
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// As rounded(__m512).
PN_SIMD_AVX2 inline __m256 rounded(__m256 v) {
  __asm__("" : "+x"(v));
  return v;
}
// The same for a scalar (kernels inlined into an FMA-enabled caller).
inline float rounded(float v) {
  __asm__("" : "+x"(v));
  return v;
}

#undef PN_SIMD_AVX2

#define PN_SIMD_F16C __attribute__((target("avx2,f16c")))

// 8 elements at p -> 8 floats (float16 needs F16C: callers check
// __builtin_cpu_supports("f16c") before taking a float16 through here).
PN_SIMD_F16C inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
PN_SIMD_F16C inline __m256 load8(const Bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
PN_SIMD_F16C inline __m256 load8(const F16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// As store16, 8 lanes, all stored.
PN_SIMD_F16C inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
PN_SIMD_F16C inline void store8(Bf16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i w = _mm256_blendv_epi8(rounded, quiet, nan);  // 8 x 16 bits in 32-bit lanes
  const __m128i packed =
      _mm_packus_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
PN_SIMD_F16C inline void store8(F16* p, __m256 v) {
  const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(v), 16),
                                        _mm256_set1_epi32(0x8000));
  const __m256i canon32 = _mm256_or_si256(sign, _mm256_set1_epi32(0x7e00));
  const __m128i canon =
      _mm_packus_epi32(_mm256_castsi256_si128(canon32), _mm256_extracti128_si256(canon32, 1));
  const __m256i nan32 = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m128i nan =
      _mm_packs_epi32(_mm256_castsi256_si128(nan32), _mm256_extracti128_si256(nan32, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_blendv_epi8(h, canon, nan));
}

#undef PN_SIMD_F16C

#define PN_AVX2_BASE __attribute__((target("avx2")))

// The sum of the 8 lanes.
PN_AVX2_BASE inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 nibbles -> their code values from a 16-entry table held as two halves:
// vpermps indexes 8 entries (bits 0-2), so both halves are looked up and bit 3,
// moved to the sign bit, picks one for blendv. Bits above 3 of an index must
// be zero or, as in the GEMV's unpack, leave bit 3 as the nibble's own.
PN_AVX2_BASE inline __m256 lookup8(__m256i idx, __m256 tlo, __m256 thi) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, idx), _mm256_permutevar8x32_ps(thi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

#undef PN_AVX2_BASE

}  // namespace cpu
}  // namespace pythia_native
#endif
