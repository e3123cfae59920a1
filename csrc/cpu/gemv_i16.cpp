// gemm_4bit's compute="int16" GEMV (M <= 16): x rounded to 16-bit integers per
// 64 elements, the 16 codes to multiples of 2^-13, products summed exactly in
// int32 over each 128-weight group, then scaled and summed in float32. This
// is the AVX-512 VNNI kernel; CPUs without VNNI take its AVX2 sibling
// (cpu/gemv_i16_avx2.cpp, the same numerics over 8 float32 lanes), chosen
// here by i16_kernel().
//
// Why: the float32 GEMV (cpu/gemm_4bit.cpp) spends one 512-bit shuffle (the
// vpermps lookup) per 16 weights and is bound by it and its shifts. Here one
// vpermw looks up 32 codes as int16, and vpdpwssd multiplies 32 int16 pairs
// into int32. It was first measured on a 2-vCPU AVX-512 Xeon (family 6
// model 207; benchmarks/results/gemm_4bit_cpu_m1.md), then reworked on a
// 2-vCPU AMD EPYC (family 25 model 17, AVX-512 on 256-bit units). Measured
// there with independent-instruction loops (2026-12-02): vpsrlw, vpermw,
// vpdpwssd, vcvtdq2ps, FMA one per cycle each; a shift and a vpdpwssd (or a
// convert and a vpdpwssd) two per cycle together, vpermw with either 1.5;
// this kernel's mix per 128 weights (3 shifts, 4 lookups, 4 multiplies, a
// convert, and half of a pair's fold and scaling) ~2 per cycle, ~7 cycles.
// The loop itself, on L1-resident data, takes ~9.3 cycles per 128 weights,
// ~6.2 without its shifts and ~8.5 without its lookups, so the shifts bind;
// but a multiply-high (vpmulhuw) in place of a shift (0.94-1.0x), a second
// load one byte on in place of two shifts, and two shorter multiply chains
// per group (0.97-1.01x) all measured slower or even. Four rows of W side by
// side at M = 1 (rows_i16) share each load of x.
// Through the op (1 thread, M = 1, bench_gemm_4bit, each side timed in
// alternation with bitsandbytes' Linear4bit, three runs, 2026-12-02;
// benchmarks/results/gemm_4bit_cpu_m1_epyc.md): 1.96-4.22x Linear4bit on the
// pythia-160m shapes, 1.43-1.55x on the 1b/1.4b ones and 1.11-1.29x on
// 5120x15360 (44 MB, streamed from memory at 18-21 GB/s, 69-83% of the copy
// bandwidth the same runs measured). Standalone, in one process, alternated
// with the kernel of the previous results: 1.22-1.55x faster at M = 1,
// 1.00-1.13x at M = 2-4.
// On a 2-vCPU Xeon reporting family 6 model 167 (2026-12-02) vpermw is two
// micro-ops (p0 + p5: beside a vpdpwssd, a shift or a convert, the pair
// takes 0.8-1.0 cycles per instruction, against 0.55 with vpermb, vpshufb or
// vpermps in its place), so the mix above is ~18.5 micro-ops per 128 weights
// on two vector ports, ~9.3 cycles; it runs ~11. A vpermb lookup of the same int16 codes needs its
// index bytes built (a multishift and a ternary logic op per 32 codes): no
// fewer micro-ops. There: 1.98-3.32x Linear4bit at M = 1 on seven shapes,
// 1.31-1.57x on 5120x15360 (at the read bandwidth of one core, one stream;
// benchmarks/results/gemm_4bit_cpu_m1_xeon167.md); with rows_i16's four
// streams, 1.90-4.48x on all eight over six runs, 1.93-2.08x on 5120x15360
// (benchmarks/results/gemm_4bit_cpu_m1_xeon167_streams.md).
// AMX, tried on a model 167 Xeon with AMX-INT8 (2026-12-07): tdpbssd on int8
// tiles, each int16 code and x split into two signed bytes, three int32
// columns per 64-block (benchmarks/experiments/amx_gemv_i16.cpp; within
// 1.5e-7 of its exact sums). At M = 1 it ran 1.7-2.8x slower than this
// kernel (5.8-7.9 ns per 128 weights against 2.9-4.5, the eight Pythia
// shapes, one thread, alternated in one process): each 1 KiB tile of W serves a
// single tdpbssd, so every one is decoded, stored and loaded again, and with
// the decode left out the tile loads and tdpbssd alone took 2.7-2.8 ns. The
// same host measured vpdpwssd at two per cycle (p0 and p5), vpermw at one
// (p0 + p5) and vpsrlw at one (p0); moving shifts off p0 did not pay there
// either (the kernel alone, M = 1, a 32 KiB and an 8 MiB weight, alternated
// builds): the second load one byte on (it and it >> 4 for >> 8 and >> 12,
// one shift fewer) 1.08-1.26x slower, vpmultishiftqb (p5) in place of >> 12,
// or of >> 8 and >> 12, 1.06-1.24x slower.
//
// Numerics (the contract of compute="int16", reference.py gemm_4bit_int16):
//   per row m of x and 64-element block j of K:
//     s = max|x| / 32767 (float32), xq = round_half_even(x / s) (0 when s = 0),
//   per code c: cq = round(code[c] * 8192) (|cq| <= 8192),
//   y[m, n] = sum over blocks j of (absmax[n, j'] * (s / 8192)) * sum_k cq * xq,
// the inner sums exact (int32: 8 products of at most 8192 * 32767 per lane
// and group, < 2^31), the outer sum in float32. x's rounding is at most 2^-16
// of its block's max, the codes' at most 2^-14 of absmax: ~6e-5 relative
// error in y on random Pythia-shaped layers (bitsandbytes' bf16 CPU kernel:
// ~4e-3; float32: ~1e-7). Non-finite x is reported to the caller, which then
// takes the float32 path (inf and NaN propagate as usual).
//
// Layout. A group is 128 weights = 64 packed bytes (two 64-blocks). Seen as
// 32 words, word w holds (from bit 0) the nibbles of elements 4w+1, 4w,
// 4w+3, 4w+2. vpermw reads bits 0-4 of each word, so with the 16 codes
// repeated twice in its 32-entry table the bits above a nibble need no mask:
// words of the group (nibble 4w+1), words >> 4 (4w), >> 8 (4w+3) and >> 12
// (4w+2). x is put in the same order once per
// call (quantize_x_i16): xq[g*128 + 32j + w] = x[g*128 + 4w + {1,0,3,2}[j]].
// Words 0-15 are the group's first block, 16-31 its second, so after the four
// vpdpwssd dword lanes 0-7 hold the first block's partial sums, 8-15 the
// second's. Two groups' vectors are then folded into one with lane 4q + b
// holding block b of the pair (scale_pair), and one multiply and one FMA apply
// the four blocks' scales; xs holds them in that order.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
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

#define PN_I16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))

// The source element (within its group) of each word lane w of xq's vector j.
constexpr int kI16Offset[4] = {1, 0, 3, 2};
// x's integer range per 64-block, [-kXMax, kXMax], and the codes' scale:
// 8 * kCodeScale * kXMax < 2^31, so a lane's 8 products per group cannot
// overflow int32.
constexpr int32_t kXMax = 32767;
constexpr float kCodeScale = 8192.0f;
static_assert(8.0 * kCodeScale * kXMax < 2147483648.0, "a lane's int32 sum could overflow");

template <typename E>
PN_I16 bool quantize_x_rows(const E* x, int64_t M, int64_t K, int64_t ldx, int16_t* xq,
                            float* xs) {
  const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
  // Lane w of the word permutation of vector j: element 4 * (w % 16) + off_j
  // of the 64 values in the pair of registers it reads (the group's first or
  // second half).
  __m512i idx[4];
  for (int j = 0; j < 4; ++j) {
    alignas(64) int16_t t[32];
    for (int w = 0; w < 32; ++w) t[w] = static_cast<int16_t>(4 * (w % 16) + kI16Offset[j]);
    idx[j] = _mm512_load_si512(t);
  }
  const __m512i lim = _mm512_set1_epi32(kXMax), nlim = _mm512_set1_epi32(-kXMax);
  __mmask16 bad = 0;
  for (int64_t m = 0; m < M; ++m) {
    const E* xr = x + m * ldx;
    int16_t* qr = xq + m * K;
    float* sr = xs + m * (K / 8);
    for (int64_t g = 0; g < K / 128; ++g) {
      __m512i q[8];
      for (int h = 0; h < 2; ++h) {
        __m512 v[4];
        __m512 amax = _mm512_setzero_ps();
        for (int i = 0; i < 4; ++i) {
          v[i] = load16(xr + g * 128 + h * 64 + i * 16, 0xFFFF);
          // QNaN, SNaN, +inf, -inf.
          bad |= _mm512_fpclass_ps_mask(v[i], 0x99);
          amax = _mm512_max_ps(amax, _mm512_castsi512_ps(
                                         _mm512_and_si512(_mm512_castps_si512(v[i]), absmask)));
        }
        const float am = _mm512_reduce_max_ps(amax);
        const float s = am / static_cast<float>(kXMax);
        // The block's scale (times 2^-13 for the codes) in the lanes of its
        // pair of groups that hold its sums (scale_pair): 4q + b, b its place
        // among the pair's four blocks.
        const int b = 2 * static_cast<int>(g % 2) + h;
        for (int q = 0; q < 4; ++q) sr[8 * (g - g % 2) + 4 * q + b] = s * (1.0f / kCodeScale);
        // An odd last group's pair has no second group: 0 in its lanes.
        if (g % 2 == 0 && g + 1 == K / 128) {
          for (int q = 0; q < 4; ++q) sr[8 * g + 4 * q + 2 + h] = 0.0f;
        }
        const __m512 sv = _mm512_set1_ps(s);
        for (int i = 0; i < 4; ++i) {
          __m512i r = s > 0.0f ? _mm512_cvt_roundps_epi32(_mm512_div_ps(v[i], sv),
                                                           _MM_FROUND_TO_NEAREST_INT |
                                                               _MM_FROUND_NO_EXC)
                                : _mm512_setzero_si512();
          q[4 * h + i] = _mm512_max_epi32(nlim, _mm512_min_epi32(lim, r));
        }
      }
      // Natural order as int16: n[0..3] = elements 0-31, 32-63, 64-95, 96-127.
      __m512i n[4];
      for (int i = 0; i < 4; ++i) {
        n[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(q[2 * i])),
                                  _mm512_cvtepi32_epi16(q[2 * i + 1]), 1);
      }
      for (int j = 0; j < 4; ++j) {
        const __m512i lo = _mm512_permutex2var_epi16(n[0], idx[j], n[1]);
        const __m512i hi = _mm512_permutex2var_epi16(n[2], idx[j], n[3]);
        _mm512_storeu_si512(qr + g * 128 + 32 * j, _mm512_mask_blend_epi16(0xFFFF0000u, lo, hi));
      }
    }
  }
  return bad == 0;
}

// One group of 128 weights (64 packed bytes at w) against MT rows of xq
// (the group's 128 values at xg, row stride K): f[m] = its 16 int32 lane sums
// (lanes 0-7 the group's first 64-block, 8-15 its second; exact, at most 8
// products each, |sum| < 2^31) converted to float32 (rounded only above
// 2^24). 4 lookups and 3 shifts per group, 4 multiplies and 1 convert per row
// of x. The shifts could be 2 with a second load of the group one byte on
// (its words' bits 0-3 are nibble 4w+3): that load spans two cache lines and
// must be masked at the group's end, and measured slower on the EPYC
// (standalone, alternated, 1 thread: the three shifts 1.01-1.18x faster).
template <int MT>
PN_I16 inline void group_i16(const uint8_t* w, const int16_t* xg, int64_t K, __m512i table,
                             __m512* f) {
  const __m512i l = _mm512_loadu_si512(w);
  const __m512i c0 = _mm512_permutexvar_epi16(l, table);
  const __m512i c1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(l, 4), table);
  const __m512i c2 = _mm512_permutexvar_epi16(_mm512_srli_epi16(l, 8), table);
  const __m512i c3 = _mm512_permutexvar_epi16(_mm512_srli_epi16(l, 12), table);
  for (int m = 0; m < MT; ++m) {
    const int16_t* x = xg + m * K;
    // One chain: no add to join two (the vector ports are what binds).
    __m512i p = _mm512_madd_epi16(c0, _mm512_loadu_si512(x));
    p = _mm512_dpwssd_epi32(p, c1, _mm512_loadu_si512(x + 32));
    p = _mm512_dpwssd_epi32(p, c2, _mm512_loadu_si512(x + 64));
    p = _mm512_dpwssd_epi32(p, c3, _mm512_loadu_si512(x + 96));
    f[m] = _mm512_cvtepi32_ps(p);
  }
}

// tot[m] += the four 64-blocks of a pair of groups (fa[m]: the first
// group's lane sums, fb[m]: the second's) times their scales: the two 16-lane
// vectors are folded into one whose lane i holds two partial sums of block
// i % 4 (two shuffles and an add), then one multiply (x's scales, xs, by
// absmax, am: lane i holds block i % 4's) and one FMA.
template <int MT>
PN_I16 inline void scale_pair(const __m512* fa, const __m512* fb, __m512 am, const float* xs,
                              int64_t xlanes, const __m512i fold[2], __m512* tot) {
  for (int m = 0; m < MT; ++m) {
    const __m512 h = _mm512_add_ps(_mm512_permutex2var_ps(fa[m], fold[0], fb[m]),
                                   _mm512_permutex2var_ps(fa[m], fold[1], fb[m]));
    const __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(xs + m * xlanes), am);
    tot[m] = _mm512_fmadd_ps(h, scale, tot[m]);
  }
}

// sums[r * MT + m] = the float32 total of row r < R of W (K / 2 bytes from
// w + r * wstep, absmax from a + r * astep) against MT rows of xq (one of MT,
// R is 1). Groups go in pairs (256 weights, four 64-blocks b = 0..3) so that
// the scaling (scale_pair) comes once per 256 weights: ~14.5 vector
// instructions per group instead of 16. xs holds the scales in scale_pair's
// order (quantize_x_rows). R rows of W side by side (at M = 1) share each
// load of x and its scales; every (row of x, row of W) is summed in the same
// order whatever MT and R.
// An odd last group is a pair whose second group is zero (its absmax not
// read); it is done after the loop, which then has no branch: with the test
// inside, the loop ran 1.1-1.3x slower (standalone, alternated, EPYC).
// BS64: blocksize 64, one absmax per block, the pair's four as one 16-byte
// broadcast; larger blocksizes (powers of two, multiples of 128): one per
// group, or one for both.
// ahead: how far past the pair being read each row prefetches its bytes
// (into L1; absmax as far ahead in rows). No bookkeeping: a prefetch never
// faults, and the lines past the thread's last row cost nothing measurable.
// Into L1 rather than L2 (T0, not T1): 1.01-1.10x on 160m- and 1.4b-shaped
// weights streamed from DRAM (287-340 MB of them cycled), 0.99-1.04x on
// weights in cache (a 2-vCPU Xeon with a 105 MB L3, 1 and 2 threads,
// alternated in one process, 2026-12-02). Also measured there, no better:
// twice the distance, a second prefetch into L2 further on, four lines every
// other pair (0.92-1.02x); no software prefetch: 0.69-0.77x.
template <int MT, int R, bool BS64>
PN_I16 inline void row_i16(const int16_t* xq, const float* xs, int64_t K, const uint8_t* w,
                           const float* a, int64_t wstep, int64_t astep, int log2bs,
                           int64_t ahead, __m512i table, const __m512i fold[2], float* sums) {
  static_assert(MT == 1 || R == 1, "rows of x or rows of W side by side, not both");
  const int lb = BS64 ? 6 : log2bs;  // a constant for blocksize 64
  __m512 tot[R * MT];
  for (int i = 0; i < R * MT; ++i) tot[i] = _mm512_setzero_ps();
  const int64_t ng = K / 128, xlanes = K / 8;
  const int64_t aahead = (ahead * 8) >> lb;
  // Above blocksize 64, the second group's absmax is the next one at 128 and
  // the first's above (a pair starts on an even group, so a block of >= 256
  // holds both).
  const int64_t second = 128 >> lb;
  __m512 fa[MT], fb[MT];
  int64_t g = 0;
  for (; g + 1 < ng; g += 2, w += 128) {
    const float* ag = a + ((128 * g) >> lb);
    for (int r = 0; r < R; ++r) {
      const uint8_t* wr = w + r * wstep;
      const float* ar = ag + r * astep;
      // Each pair reads two whole cache lines of each row.
      _mm_prefetch(reinterpret_cast<const char*>(wr) + ahead, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wr) + ahead + 64, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(ar) + aahead, _MM_HINT_T0);
      group_i16<MT>(wr, xq + 128 * g, K, table, fa);
      group_i16<MT>(wr + 64, xq + 128 * g + 128, K, table, fb);
      // The absmax of block i % 4 in lane i.
      const __m512 am = BS64 ? _mm512_broadcast_f32x4(_mm_loadu_ps(ar))
                             : _mm512_mask_broadcastss_ps(_mm512_set1_ps(*ar), 0xCCCC,
                                                          _mm_load_ss(ar + second));
      scale_pair<MT>(fa, fb, am, xs + 8 * g, xlanes, fold, tot + r * MT);
    }
  }
  if (g < ng) {
    const float* ag = a + ((128 * g) >> lb);
    for (int r = 0; r < R; ++r) {
      const float* ar = ag + r * astep;
      group_i16<MT>(w + r * wstep, xq + 128 * g, K, table, fa);
      for (int m = 0; m < MT; ++m) fb[m] = _mm512_setzero_ps();
      const __m512 am = BS64 ? _mm512_broadcast_f32x4(_mm_maskz_loadu_ps(0x3, ar))
                             : _mm512_set1_ps(*ar);
      scale_pair<MT>(fa, fb, am, xs + 8 * g, xlanes, fold, tot + r * MT);
    }
  }
  for (int i = 0; i < R * MT; ++i) sums[i] = _mm512_reduce_add_ps(tot[i]);
}

// Rows [n0, n1) of W against all M rows of x. At M = 1, four rows of W side
// by side (measured standalone on the EPYC, 1 thread, alternated in one
// process: 1.07-1.13x one row at a time on the Pythia shapes that fit its
// 32 MiB L3 and 1.12x on 5120x15360, streamed from memory). The four are a
// quarter of the thread's rows apart (rows n0 + i + r * q, q = (n1 - n0) / 4),
// so that W is read as four separate streams, each front to back, each
// prefetching one row (at least kRowAhead bytes) ahead: four streams draw
// more from memory than one (common/prefetch.h). Against four consecutive
// rows, alternated in one process on weights streamed from DRAM (287-354 MB
// cycled; a 2-vCPU Xeon, family 6 model 167, 2026-12-02): 1.22-1.33x on
// 160m-, 1.4b- and 12b-shaped weights at one thread, 1.14-1.33x at two; eight
// rows apart, 1.02-1.22x. The schedule (rows the quarters leave over one at
// a time; above M = 1 one row of W at a time against the rows of x in groups
// of 4) is common/i16_rows.h's, shared with the AVX2 kernel; through it the
// M = 1 loop measured 0.99-1.03x the loop written out here before (L1/L3
// weights, 1 thread, alternated in one process, same bits, 2026-12-03).
template <bool BS64>
PN_I16 void rows_i16(const int16_t* xq, const float* xs, int64_t M, int64_t K,
                     const uint8_t* packed, const float* absmax, int64_t bs, __m512i table,
                     const float* bias, int64_t n0, int64_t n1, void* y, DType ydt, int64_t ldy) {
  const int log2bs = __builtin_ctzll(static_cast<unsigned long long>(bs));
  // The fold of a pair of groups (scale_pair): lane i = 4q + b of the result
  // adds lanes 2q and 2q + 1 of block b's 8, where blocks 0 and 1 are lanes
  // 0-7 and 8-15 of the first group's vector (indices 0-15 of the two-source
  // shuffle) and blocks 2 and 3 those of the second's (16-31).
  alignas(64) int32_t lo[16], hi[16];
  for (int i = 0; i < 16; ++i) {
    lo[i] = 8 * (i % 4) + 2 * (i / 4);
    hi[i] = lo[i] + 1;
  }
  const __m512i fold[2] = {_mm512_load_si512(lo), _mm512_load_si512(hi)};
  const int64_t xlanes = K / 8, wrow = K / 2, arow = K / bs;
  i16_rows<4>(M, n0, n1, wrow, bias, y, ydt, ldy,
              [&](auto mt, auto r, int64_t m0, int64_t n, int64_t step, int64_t ahead,
                  float* sums) PN_I16 {
                row_i16<decltype(mt)::value, decltype(r)::value, BS64>(
                    xq + m0 * K, xs + m0 * xlanes, K, packed + n * wrow, absmax + n * arow,
                    step * wrow, step * arow, log2bs, ahead, table, fold, sums);
              });
}

}  // namespace

namespace {

bool avx512_vnni() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni");
  }();
  return ok;
}

PN_I16 bool quantize_x_i16_avx512(const void* x, DType dt, int64_t M, int64_t K, int64_t ldx,
                                  int16_t* xq, float* xs) {
  switch (dt) {
    case DType::F32: return quantize_x_rows(static_cast<const float*>(x), M, K, ldx, xq, xs);
    case DType::BF16: return quantize_x_rows(static_cast<const Bf16*>(x), M, K, ldx, xq, xs);
    case DType::F16: return quantize_x_rows(static_cast<const F16*>(x), M, K, ldx, xq, xs);
  }
  return false;
}

PN_I16 void gemv_4bit_i16_rows_avx512(const int16_t* xq, const float* xs, int64_t M, int64_t K,
                                      const uint8_t* packed, const float* absmax,
                                      int64_t blocksize, QuantType qt, const float* bias,
                                      int64_t n0, int64_t n1, void* y, DType ydt, int64_t ldy) {
  alignas(64) int16_t t[32];
  for (int i = 0; i < 32; ++i) t[i] = i16_code(qt, i);
  const __m512i table = _mm512_load_si512(t);
  if (blocksize == 64) {
    rows_i16<true>(xq, xs, M, K, packed, absmax, blocksize, table, bias, n0, n1, y, ydt, ldy);
  } else {
    rows_i16<false>(xq, xs, M, K, packed, absmax, blocksize, table, bias, n0, n1, y, ydt, ldy);
  }
}

}  // namespace

I16Kernel i16_kernel(Isa isa) {
  switch (isa) {
    // Every CPU the AVX-512 ISA is chosen on has AVX2 and FMA too.
    case Isa::AVX512: return avx512_vnni() ? I16Kernel::AVX512VNNI : I16Kernel::AVX2;
    case Isa::AVX2: return I16Kernel::AVX2;
    case Isa::Scalar: break;
  }
  return I16Kernel::None;
}

const char* i16_kernel_name(I16Kernel k) {
  switch (k) {
    case I16Kernel::AVX512VNNI: return "avx512_vnni";
    case I16Kernel::AVX2: return "avx2";
    case I16Kernel::None: break;
  }
  return "none";
}

bool gemv_i16_ok(int64_t M, int64_t K, int64_t blocksize, Isa isa) {
  return i16_kernel(isa) != I16Kernel::None && M >= 1 && M <= kGemvI16MaxM && K % 128 == 0 &&
         blocksize % 64 == 0 && K % blocksize == 0;
}

int16_t i16_code(QuantType qt, int c) {
  return static_cast<int16_t>(std::nearbyint(code_table(qt)[c & 15] * kCodeScale));
}

bool quantize_x_i16(I16Kernel k, const void* x, DType dt, int64_t M, int64_t K, int64_t ldx,
                    int16_t* xq, float* xs) {
  return k == I16Kernel::AVX512VNNI ? quantize_x_i16_avx512(x, dt, M, K, ldx, xq, xs)
                                    : quantize_x_i16_avx2(x, dt, M, K, ldx, xq, xs);
}

void gemv_4bit_i16_rows(I16Kernel k, const int16_t* xq, const float* xs, int64_t M, int64_t K,
                        const uint8_t* packed, const float* absmax, int64_t blocksize,
                        QuantType qt, const float* bias, int64_t n0, int64_t n1, void* y,
                        DType ydt, int64_t ldy) {
  if (k == I16Kernel::AVX512VNNI) {
    gemv_4bit_i16_rows_avx512(xq, xs, M, K, packed, absmax, blocksize, qt, bias, n0, n1, y, ydt,
                              ldy);
  } else {
    gemv_4bit_i16_rows_avx2(xq, xs, M, K, packed, absmax, blocksize, qt, bias, n0, n1, y, ydt,
                            ldy);
  }
}

}  // namespace cpu
}  // namespace pythia_native
