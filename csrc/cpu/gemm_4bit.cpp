// CPU kernels of gemm_4bit: the small-M GEMV over packed 4-bit rows, and the
// panel dequantization that feeds a BLAS call for large M.
//
// Versions (chosen at run time by cpu::active_isa()):
//   avx512  16 floats per register; one vpermps looks a nibble up in the whole
//           16-entry code table held in one zmm register.
//   avx2    8 floats per register; two vpermps (low/high half of the table)
//           and a blend on bit 3 of the nibble.
//   scalar  the portable fallback and the readable definition of the loops.
//
// Unpacking a 16-byte load (32 elements) gives the high nibbles (elements
// 0, 2, 4, ...) in one register and the low nibbles (1, 3, 5, ...) in another.
// Rather than shuffling the weights back into order, x is permuted once per
// call into the same evens-then-odds order per chunk (permute_k); a dot
// product does not care about the order of its terms.
//
// Napkin math, pythia-160m MLP (K=768, N=3072, M=1): 1.18 MB of packed weights
// + 74 KB of absmax per call. One core streams ~15-20 GB/s from DRAM, so the
// floor is ~70 us from memory; from L2/L3 the bound is vpermps throughput
// (one per cycle on port 5: 2 per 32 elements) -> ~25 us at 3 GHz. Hence: no
// per-element work other than unpack, lookup, scale and FMA, and enough
// independent accumulators (4 per row of x) to hide the 4-cycle FMA latency.
// gcc 12's AVX-512 headers trip -Wuninitialized inside their own
// _mm512_undefined_ps() (a known false positive in _mm512_reduce_add_ps).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "common/kernels.h"

namespace pythia_native {
namespace cpu {

namespace {

// ----------------------------------------------------------------- scalar ---

void gemv_rows_scalar(const float* xp, int64_t M, int64_t K, const uint8_t* packed,
                      const float* absmax, int64_t bs, QuantType qt, const float* bias,
                      int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const float* code = code_table(qt);
  const int64_t row_bytes = K / 2;
  const int64_t blocks_per_row = K / bs;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = packed + n * row_bytes;
    const float* arow = absmax + n * blocks_per_row;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = xp + m * K;
      float acc = 0.0f;
      for (int64_t j = 0; j < row_bytes; ++j) {
        const float scale = arow[(2 * j) / bs];
        const uint8_t byte = wrow[j];
        acc += (code[byte >> 4] * scale) * xr[2 * j];
        acc += (code[byte & 0xF] * scale) * xr[2 * j + 1];
      }
      y[m * ldy + n] = acc + (bias ? bias[n] : 0.0f);
    }
  }
}

void dequantize_rows_scalar(const uint8_t* packed, const float* absmax, int64_t K, int64_t bs,
                            QuantType qt, int64_t n0, int64_t n1, float* out) {
  const float* code = code_table(qt);
  const int64_t row_bytes = K / 2;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = packed + n * row_bytes;
    const float* arow = absmax + n * (K / bs);
    float* o = out + (n - n0) * K;
    for (int64_t j = 0; j < row_bytes; ++j) {
      const float scale = arow[(2 * j) / bs];
      o[2 * j] = code[wrow[j] >> 4] * scale;
      o[2 * j + 1] = code[wrow[j] & 0xF] * scale;
    }
  }
}

// ---------------------------------------------------------------- AVX-512 ---

#define PN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

// 16 bytes at p -> the 32 weights of one chunk: even elements in *we, odd in
// *wo, each code value times `scale`.
PN_AVX512 inline void unpack32_avx512(const uint8_t* p, __m512 table, __m512 scale, __m512* we,
                                      __m512* wo) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i hi = _mm512_srli_epi32(bytes, 4);
  const __m512i lo = _mm512_and_si512(bytes, _mm512_set1_epi32(0xF));
  *we = _mm512_mul_ps(_mm512_permutexvar_ps(hi, table), scale);
  *wo = _mm512_mul_ps(_mm512_permutexvar_ps(lo, table), scale);
}

// One row of W against MT rows of xp. acc[m][0..1] take even chunks,
// acc[m][2..3] odd chunks: four independent FMA chains per row of x.
template <int MT>
PN_AVX512 inline void gemv_row_avx512(const float* xp, int64_t K, const uint8_t* wrow,
                                      const float* arow, int log2bs, __m512 table,
                                      float* sums) {
  __m512 acc[MT][4];
  for (int m = 0; m < MT; ++m)
    for (int s = 0; s < 4; ++s) acc[m][s] = _mm512_setzero_ps();
  const int64_t nchunks = K / 32;
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t k = c * 32;
    const int slot = static_cast<int>(c & 1) * 2;
    __m512 we, wo;
    unpack32_avx512(wrow + k / 2, table, _mm512_set1_ps(arow[k >> log2bs]), &we, &wo);
    for (int m = 0; m < MT; ++m) {
      const float* xk = xp + m * K + k;
      acc[m][slot] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xk), acc[m][slot]);
      acc[m][slot + 1] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xk + 16), acc[m][slot + 1]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    const __m512 t = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                   _mm512_add_ps(acc[m][2], acc[m][3]));
    sums[m] = _mm512_reduce_add_ps(t);
  }
}

template <int MT>
PN_AVX512 void gemv_rows_avx512_mt(const float* xp, int64_t K, const uint8_t* packed,
                                   const float* absmax, int64_t bs, QuantType qt,
                                   const float* bias, int64_t n0, int64_t n1, float* y,
                                   int64_t ldy) {
  const __m512 table = _mm512_loadu_ps(code_table(qt));
  const int log2bs = __builtin_ctzll(static_cast<unsigned long long>(bs));
  float sums[MT];
  for (int64_t n = n0; n < n1; ++n) {
    gemv_row_avx512<MT>(xp, K, packed + n * (K / 2), absmax + n * (K / bs), log2bs, table, sums);
    const float b = bias ? bias[n] : 0.0f;
    for (int m = 0; m < MT; ++m) y[m * ldy + n] = sums[m] + b;
  }
}

PN_AVX512 void dequantize_rows_avx512(const uint8_t* packed, const float* absmax, int64_t K,
                                      int64_t bs, QuantType qt, int64_t n0, int64_t n1,
                                      float* out) {
  const __m512 table = _mm512_loadu_ps(code_table(qt));
  const int log2bs = __builtin_ctzll(static_cast<unsigned long long>(bs));
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = packed + n * (K / 2);
    const float* arow = absmax + n * (K / bs);
    float* o = out + (n - n0) * K;
    for (int64_t k = 0; k < K; k += 32) {
      __m512 we, wo;
      unpack32_avx512(wrow + k / 2, table, _mm512_set1_ps(arow[k >> log2bs]), &we, &wo);
      _mm512_storeu_ps(o + k, we);
      _mm512_storeu_ps(o + k + 16, wo);
    }
  }
}

// ------------------------------------------------------------------- AVX2 ---

#define PN_AVX2 __attribute__((target("avx2,fma")))

// Table lookup of 8 nibbles: vpermps indexes 8 entries, so look up both halves
// of the table and pick by bit 3 (moved to the sign bit for blendv).
PN_AVX2 inline __m256 lookup8_avx2(__m256i idx, __m256 tlo, __m256 thi) {
  const __m256 a = _mm256_permutevar8x32_ps(tlo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(thi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// 8 bytes at p -> 16 weights: evens in *we, odds in *wo, times scale.
PN_AVX2 inline void unpack16_avx2(const uint8_t* p, __m256 tlo, __m256 thi, __m256 scale,
                                  __m256* we, __m256* wo) {
  const __m256i bytes =
      _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i hi = _mm256_srli_epi32(bytes, 4);
  const __m256i lo = _mm256_and_si256(bytes, _mm256_set1_epi32(0xF));
  *we = _mm256_mul_ps(lookup8_avx2(hi, tlo, thi), scale);
  *wo = _mm256_mul_ps(lookup8_avx2(lo, tlo, thi), scale);
}

PN_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int MT>
PN_AVX2 inline void gemv_row_avx2(const float* xp, int64_t K, const uint8_t* wrow,
                                  const float* arow, int log2bs, __m256 tlo, __m256 thi,
                                  float* sums) {
  __m256 acc[MT][4];
  for (int m = 0; m < MT; ++m)
    for (int s = 0; s < 4; ++s) acc[m][s] = _mm256_setzero_ps();
  const int64_t nchunks = K / 16;
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t k = c * 16;
    const int slot = static_cast<int>(c & 1) * 2;
    __m256 we, wo;
    unpack16_avx2(wrow + k / 2, tlo, thi, _mm256_set1_ps(arow[k >> log2bs]), &we, &wo);
    for (int m = 0; m < MT; ++m) {
      const float* xk = xp + m * K + k;
      acc[m][slot] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xk), acc[m][slot]);
      acc[m][slot + 1] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xk + 8), acc[m][slot + 1]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    sums[m] = hsum_avx2(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]),
                                      _mm256_add_ps(acc[m][2], acc[m][3])));
  }
}

template <int MT>
PN_AVX2 void gemv_rows_avx2_mt(const float* xp, int64_t K, const uint8_t* packed,
                               const float* absmax, int64_t bs, QuantType qt, const float* bias,
                               int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const __m256 tlo = _mm256_loadu_ps(code_table(qt));
  const __m256 thi = _mm256_loadu_ps(code_table(qt) + 8);
  const int log2bs = __builtin_ctzll(static_cast<unsigned long long>(bs));
  float sums[MT];
  for (int64_t n = n0; n < n1; ++n) {
    gemv_row_avx2<MT>(xp, K, packed + n * (K / 2), absmax + n * (K / bs), log2bs, tlo, thi,
                      sums);
    const float b = bias ? bias[n] : 0.0f;
    for (int m = 0; m < MT; ++m) y[m * ldy + n] = sums[m] + b;
  }
}

PN_AVX2 void dequantize_rows_avx2(const uint8_t* packed, const float* absmax, int64_t K,
                                  int64_t bs, QuantType qt, int64_t n0, int64_t n1, float* out) {
  const __m256 tlo = _mm256_loadu_ps(code_table(qt));
  const __m256 thi = _mm256_loadu_ps(code_table(qt) + 8);
  const int log2bs = __builtin_ctzll(static_cast<unsigned long long>(bs));
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = packed + n * (K / 2);
    const float* arow = absmax + n * (K / bs);
    float* o = out + (n - n0) * K;
    for (int64_t k = 0; k < K; k += 16) {
      __m256 we, wo;
      unpack16_avx2(wrow + k / 2, tlo, thi, _mm256_set1_ps(arow[k >> log2bs]), &we, &wo);
      _mm256_storeu_ps(o + k, we);
      _mm256_storeu_ps(o + k + 8, wo);
    }
  }
}

// Rows of x are taken in groups of at most 4 (kept in registers while one row
// of W is unpacked); a group of MT rows calls the MT instantiation.
template <template <int> class Fn, typename... Args>
void for_m_groups(int64_t M, const float* xp, int64_t K, float* y, int64_t ldy, Args... args) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const float* x = xp + m0 * K;
    float* yo = y + m0 * ldy;
    switch (std::min<int64_t>(4, M - m0)) {
      case 4: Fn<4>::run(x, K, args..., yo, ldy); break;
      case 3: Fn<3>::run(x, K, args..., yo, ldy); break;
      case 2: Fn<2>::run(x, K, args..., yo, ldy); break;
      default: Fn<1>::run(x, K, args..., yo, ldy); break;
    }
  }
}

template <int MT>
struct Avx512Rows {
  static void run(const float* x, int64_t K, const uint8_t* p, const float* a, int64_t bs,
                  QuantType qt, const float* bias, int64_t n0, int64_t n1, float* y,
                  int64_t ldy) {
    gemv_rows_avx512_mt<MT>(x, K, p, a, bs, qt, bias, n0, n1, y, ldy);
  }
};

template <int MT>
struct Avx2Rows {
  static void run(const float* x, int64_t K, const uint8_t* p, const float* a, int64_t bs,
                  QuantType qt, const float* bias, int64_t n0, int64_t n1, float* y,
                  int64_t ldy) {
    gemv_rows_avx2_mt<MT>(x, K, p, a, bs, qt, bias, n0, n1, y, ldy);
  }
};

}  // namespace

void permute_k(const float* x, int64_t M, int64_t K, int64_t ldx, Isa isa, float* xp) {
  const int64_t C = chunk_elems(isa);
  const int64_t half = C / 2;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    float* o = xp + m * K;
    for (int64_t c = 0; c < K; c += C) {
      for (int64_t i = 0; i < half; ++i) {
        o[c + i] = xr[c + 2 * i];
        o[c + half + i] = xr[c + 2 * i + 1];
      }
    }
  }
}

void gemv_4bit_rows(const float* xp, int64_t M, int64_t K, const uint8_t* packed,
                    const float* absmax, int64_t blocksize, QuantType qt, const float* bias,
                    int64_t n0, int64_t n1, float* y, int64_t ldy, Isa isa) {
  switch (isa) {
    case Isa::AVX512:
      for_m_groups<Avx512Rows>(M, xp, K, y, ldy, packed, absmax, blocksize, qt, bias, n0, n1);
      break;
    case Isa::AVX2:
      for_m_groups<Avx2Rows>(M, xp, K, y, ldy, packed, absmax, blocksize, qt, bias, n0, n1);
      break;
    default:
      gemv_rows_scalar(xp, M, K, packed, absmax, blocksize, qt, bias, n0, n1, y, ldy);
  }
}

void dequantize_rows_permuted(const uint8_t* packed, const float* absmax, int64_t K,
                              int64_t blocksize, QuantType qt, int64_t n0, int64_t n1,
                              float* out, Isa isa) {
  switch (isa) {
    case Isa::AVX512: dequantize_rows_avx512(packed, absmax, K, blocksize, qt, n0, n1, out); break;
    case Isa::AVX2: dequantize_rows_avx2(packed, absmax, K, blocksize, qt, n0, n1, out); break;
    default: dequantize_rows_scalar(packed, absmax, K, blocksize, qt, n0, n1, out);
  }
}

}  // namespace cpu
}  // namespace pythia_native
