// gemm_4bit's compute="int16" GEMV for CPUs without AVX-512 VNNI (AVX2 + FMA:
// AMD Zen 1-3, Intel client cores without AVX-512, Skylake-X's AVX-512
// without VNNI). The numerics are gemv_i16.cpp's, defined by reference.py
// gemm_4bit_int16: x rounded to int16 per 64 elements (the same rounding),
// the codes to multiples of 2^-13, exact int32 sums over each 64-block, the
// rest in float32. The float32 sums run over 8 lanes instead of 16, so the
// two kernels agree to float32 rounding, not bit for bit.
//
// Why: AVX2 has no 16-entry shuffle of 32-bit lanes, so the float32 GEMV
// (cpu/gemm_4bit.cpp) looks up every 8 codes with two vpermps (one per half
// of the table) and a blendv (~1.2 cycles each in a loop of independent
// blendvs on the host below). It runs at ~1.5 GB/s per core on a Xeon
// (family 6 model 167, held to AVX2, 2026-12-03), about half of
// bitsandbytes' Linear4bit there. Here the 16 int16 codes are two 16-byte
// tables (low and high bytes) that vpshufb indexes with the nibbles
// directly, and vpunpck{l,h}bw interleaves the two bytes into the int16
// codes. Per 64 weights (32 bytes): 3 ops to split the nibbles, 4 lookups, 4
// interleaves, 4 vpmaddwd and 3 adds, then a convert, a multiply and an FMA
// (~21 on three vector ports, ~7 cycles; it runs ~10 at the ~2 GHz this
// host's instruction loops suggest). Measured there, alternated
// in one process: 3.6-4.4x the float32 GEMV at M = 1 (one thread, the
// Pythia shapes), 1.4-3.0x at M = 2-16 (benchmarks/results/
// gemm_4bit_cpu_avx2_xeon167.md).
//
// Layout. A block is 64 weights = 32 packed bytes, one register. Byte i holds
// element 2i in its high nibble and 2i + 1 in its low one (FORMAT.md). The
// unpacks work within 128-bit lanes, so word w (0-15) of the four code
// vectors holds
//   c0: element 2i, c1: element 2i + 1  with i = w % 8 + 16 * (w / 8)
//   c2: element 2i, c3: element 2i + 1  with i = w % 8 + 16 * (w / 8) + 8
// and x is put in the same order once per call (quantize_x_i16_avx2):
// xq[64 j + 16 v + w] = x[64 j + i16_avx2_source(v, w)]. After the four
// vpmaddwd, dword lane d holds 8 products (elements 4 (d % 4) + 32 (d / 4)
// + {0..3, 16..19}): at most 8 * 8192 * 32767 < 2^31, exact.
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "common/elements.h"
#include "common/i16_rows.h"
#include "common/kernels.h"
#include "common/prefetch.h"
#include "common/simd_x86.h"

namespace pythia_native {
namespace cpu {

namespace {

#define PN_I16_AVX2 __attribute__((target("avx2,fma")))

constexpr int32_t kXMax = 32767;
constexpr float kCodeScale = 8192.0f;
static_assert(8.0 * kCodeScale * kXMax < 2147483648.0, "a lane's int32 sum could overflow");

// The element (of its 64-block) whose x goes in word w of x vector v.
constexpr int i16_avx2_source(int v, int w) {
  return 2 * (w % 8 + 16 * (w / 8) + 8 * (v / 2)) + v % 2;
}

template <typename E>
PN_I16_AVX2 bool quantize_x_rows_avx2(const E* x, int64_t M, int64_t K, int64_t ldx,
                                      int16_t* xq, float* xs) {
  int src[64];
  for (int v = 0; v < 4; ++v) {
    for (int w = 0; w < 16; ++w) src[16 * v + w] = i16_avx2_source(v, w);
  }
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff), expmask = _mm256_set1_epi32(0x7f800000);
  const __m256i lim = _mm256_set1_epi32(kXMax), nlim = _mm256_set1_epi32(-kXMax);
  __m256i bad = _mm256_setzero_si256();
  for (int64_t m = 0; m < M; ++m) {
    const E* xr = x + m * ldx;
    int16_t* qr = xq + m * K;
    float* sr = xs + m * (K / 64);
    for (int64_t j = 0; j < K / 64; ++j) {
      alignas(32) float f[64];
      for (int i = 0; i < 64; ++i) f[i] = to_f32(xr[64 * j + i]);
      __m256 v[8];
      __m256 amax = _mm256_setzero_ps();
      for (int i = 0; i < 8; ++i) {
        v[i] = _mm256_load_ps(f + 8 * i);
        const __m256i bits = _mm256_castps_si256(v[i]);
        // Exponent all ones: inf or NaN.
        bad = _mm256_or_si256(
            bad, _mm256_cmpeq_epi32(_mm256_and_si256(bits, expmask), expmask));
        amax = _mm256_max_ps(amax, _mm256_castsi256_ps(_mm256_and_si256(bits, absmask)));
      }
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      const float s = _mm_cvtss_f32(h) / static_cast<float>(kXMax);
      sr[j] = s * (1.0f / kCodeScale);
      alignas(32) int32_t q[64];
      const __m256 sv = _mm256_set1_ps(s);
      for (int i = 0; i < 8; ++i) {
        // Round half to even whatever MXCSR says, as the AVX-512 kernel's
        // embedded rounding does; the quotient is within int32 (|x| <= s *
        // 32767 up to s's rounding), then clamped as the definition says.
        const __m256i r =
            s > 0.0f ? _mm256_cvtps_epi32(_mm256_round_ps(
                           _mm256_div_ps(v[i], sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
                     : _mm256_setzero_si256();
        _mm256_store_si256(reinterpret_cast<__m256i*>(q + 8 * i),
                           _mm256_max_epi32(nlim, _mm256_min_epi32(lim, r)));
      }
      for (int i = 0; i < 64; ++i) qr[64 * j + i] = static_cast<int16_t>(q[src[i]]);
    }
  }
  return _mm256_testz_si256(bad, bad);
}

// The int16 codes as two byte tables (low, high byte of round(code * 8192)),
// each in both 128-bit lanes for vpshufb, and the nibble mask.
struct CodesAvx2 {
  __m256i lo, hi, nib;
};

// One 64-block (32 packed bytes at w) against MT rows of xq (its 64 values at
// xb, row stride K): s[m] = 8 exact int32 sums of 8 products each.
template <int MT>
PN_I16_AVX2 inline void block_i16_avx2(const uint8_t* w, const int16_t* xb, int64_t K,
                                       const CodesAvx2& t, __m256i* s) {
  const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i lo = _mm256_and_si256(p, t.nib);                         // elements 2i + 1
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), t.nib);  // elements 2i
  const __m256i llo = _mm256_shuffle_epi8(t.lo, lo), hlo = _mm256_shuffle_epi8(t.hi, lo);
  const __m256i lhi = _mm256_shuffle_epi8(t.lo, hi), hhi = _mm256_shuffle_epi8(t.hi, hi);
  const __m256i c0 = _mm256_unpacklo_epi8(lhi, hhi), c1 = _mm256_unpacklo_epi8(llo, hlo);
  const __m256i c2 = _mm256_unpackhi_epi8(lhi, hhi), c3 = _mm256_unpackhi_epi8(llo, hlo);
  for (int m = 0; m < MT; ++m) {
    const __m256i* x = reinterpret_cast<const __m256i*>(xb + m * K);
    // Two chains of two, joined: each lane's partial sums stay below 2^31.
    const __m256i a = _mm256_add_epi32(_mm256_madd_epi16(c0, _mm256_loadu_si256(x)),
                                       _mm256_madd_epi16(c2, _mm256_loadu_si256(x + 2)));
    const __m256i b = _mm256_add_epi32(_mm256_madd_epi16(c1, _mm256_loadu_si256(x + 1)),
                                       _mm256_madd_epi16(c3, _mm256_loadu_si256(x + 3)));
    s[m] = _mm256_add_epi32(a, b);
  }
}

// sums[r * MT + m] = the float32 total of row r < R of W (K / 2 bytes from
// w + r * wstep, absmax from a + r * astep) against MT rows of xq (one of MT,
// R is 1). Blocks go in pairs, one cache line of each row per pair, which
// the row prefetches `ahead` bytes on (as row_i16 in gemv_i16.cpp). Each
// block's 8 lane sums, converted to float32, go into one FMA with the
// block's scale (absmax times x's scale); every (row of x, row of W) is
// summed in the same order whatever MT and R.
template <int MT, int R>
PN_I16_AVX2 inline void row_i16_avx2(const int16_t* xq, const float* xs, int64_t K,
                                     const uint8_t* w, const float* a, int64_t wstep,
                                     int64_t astep, int log2bs, int64_t ahead,
                                     const CodesAvx2& t, float* sums) {
  static_assert(MT == 1 || R == 1, "rows of x or rows of W side by side, not both");
  __m256 tot[R * MT];
  for (int i = 0; i < R * MT; ++i) tot[i] = _mm256_setzero_ps();
  const int64_t nb = K / 64;  // 64-blocks per row, and x's scales per row
  // The absmax bytes `ahead` bytes of W on: 2 * ahead weights, 4 bytes per block.
  const int64_t aahead = (ahead * 8) >> log2bs;
  for (int64_t j = 0; j < nb; j += 2, w += 64) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* wr = w + r * wstep;
      const float* ar = a + r * astep;
      _mm_prefetch(reinterpret_cast<const char*>(wr) + ahead, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(ar + ((64 * j) >> log2bs)) + aahead,
                   _MM_HINT_T0);
      for (int h = 0; h < 2; ++h) {
        __m256i s[MT];
        block_i16_avx2<MT>(wr + 32 * h, xq + 64 * (j + h), K, t, s);
        const __m256 am = _mm256_broadcast_ss(ar + ((64 * (j + h)) >> log2bs));
        for (int m = 0; m < MT; ++m) {
          const __m256 scale = _mm256_mul_ps(_mm256_broadcast_ss(xs + m * nb + j + h), am);
          tot[r * MT + m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[m]), scale, tot[r * MT + m]);
        }
      }
    }
  }
  for (int i = 0; i < R * MT; ++i) sums[i] = hsum8(tot[i]);
}

}  // namespace

PN_I16_AVX2 bool quantize_x_i16_avx2(const void* x, DType dt, int64_t M, int64_t K, int64_t ldx,
                                     int16_t* xq, float* xs) {
  switch (dt) {
    case DType::F32: return quantize_x_rows_avx2(static_cast<const float*>(x), M, K, ldx, xq, xs);
    case DType::BF16: return quantize_x_rows_avx2(static_cast<const Bf16*>(x), M, K, ldx, xq, xs);
    case DType::F16: return quantize_x_rows_avx2(static_cast<const F16*>(x), M, K, ldx, xq, xs);
  }
  return false;
}

// Rows [n0, n1) of W against all M rows of x in common/i16_rows.h's order,
// as the AVX-512 kernel, but at M = 1 with two rows of W side by side, half
// the thread's rows apart (two streams from memory, common/prefetch.h).
// Against four rows a quarter apart (the AVX-512 kernel's choice), alternated
// in one process on a 2-vCPU Xeon (family 6 model 167) forced to AVX2,
// 2026-12-03: 1.03-1.06x with W in cache, 1.01-1.05x streamed from DRAM
// (300 MB cycled) on one thread and 1.02-1.20x on two; one row at a time
// 0.86-1.02x.
PN_I16_AVX2 void gemv_4bit_i16_rows_avx2(const int16_t* xq, const float* xs, int64_t M,
                                         int64_t K, const uint8_t* packed, const float* absmax,
                                         int64_t blocksize, QuantType qt, const float* bias,
                                         int64_t n0, int64_t n1, void* y, DType ydt,
                                         int64_t ldy) {
  alignas(16) uint8_t lo[16], hi[16];
  for (int c = 0; c < 16; ++c) {
    const uint16_t v = static_cast<uint16_t>(i16_code(qt, c));
    lo[c] = static_cast<uint8_t>(v & 0xFF);
    hi[c] = static_cast<uint8_t>(v >> 8);
  }
  CodesAvx2 t;
  t.lo = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(lo)));
  t.hi = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(hi)));
  t.nib = _mm256_set1_epi8(0x0F);
  const int log2bs = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  const int64_t xlanes = K / 64, wrow = K / 2, arow = K / blocksize;
  i16_rows<2>(M, n0, n1, wrow, bias, y, ydt, ldy,
              [&](auto mt, auto r, int64_t m0, int64_t n, int64_t step, int64_t ahead,
                  float* sums) PN_I16_AVX2 {
                row_i16_avx2<decltype(mt)::value, decltype(r)::value>(
                    xq + m0 * K, xs + m0 * xlanes, K, packed + n * wrow, absmax + n * arow,
                    step * wrow, step * arow, log2bs, ahead, t, sums);
              });
}

}  // namespace cpu
}  // namespace pythia_native
