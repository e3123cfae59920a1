// AVX2 building blocks shared by the CPU kernels (torch-free, x86-64 only):
// each kernel file keeps its own target attributes; these are the pieces that
// would otherwise be copied into each of them.
#pragma once
#if defined(__x86_64__)
#include <immintrin.h>

namespace pythia_native {
namespace cpu {

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
