// CPU kernels of gemm_4bit: the GEMV over packed 4-bit rows (M <= 4), the
// row dequantization that feeds the small-M tiles (common/tiles.h, M up to a
// few dozen) and the BLAS panels (large M). ops.cpp picks one by M (measured
// crossovers there).
//
// Versions (chosen at run time by cpu::active_isa()):
//   avx512  16 floats per register; one vpermps looks a nibble up in the whole
//           16-entry code table held in one zmm register.
//   avx2    8 floats per register, 32 weights per chunk; the lookup by two
//           vpermps (low/high half of the table) and a blend on bit 3 of the
//           nibble, or by vpshufb on the codes' byte planes (AMD CPUs; the
//           same bits, see unpack32_avx2).
//   scalar  the portable fallback and the readable definition of the loops.
//
// Unpacking without shuffles (AVX-512; AVX2's vpermps lookup likewise, from
// a broadcast dword): the 16 bytes of a chunk (32 weights) are
// broadcast to every 128-bit lane by the load itself, and a per-lane variable
// shift (vpsrlvd) moves a different nibble to the bottom of each 32-bit lane.
// vpermps reads only the low 4 bits of an index, so the bits above need no
// mask. The weights then sit in a fixed, scrambled order within the chunk
// (chunk_source() below); x is permuted once per call into the same order
// (permute_k), and a dot product does not care about the order of its terms.
// Per 32 weights that leaves 2 shuffle-port uops (the two lookups) instead of
// 3 with a vpmovzxbd widening. (AVX2's vpshufb lookup is all shuffles, but on
// CPUs with two shuffle pipes; see unpack32_avx2.)
//
// Every activation dtype runs these float32 kernels: permute_k widens bf16 /
// fp16 x to float32 (exact) while it reorders it, and the epilogue rounds y
// once to x's dtype. A bf16 dot-product kernel (vdpbf16ps on bf16-rounded
// codes) was tried and removed: on the Xeon this was measured on, vdpbf16ps
// issues one per ~2.2 cycles (vfmadd231ps: two per cycle), so it was slower
// than this kernel at every M as well as less exact.
//
// Napkin math, pythia-160m MLP (K=768, N=3072, M=1): 1.18 MB of packed weights
// + 74 KB of absmax per call. From cache (L2 2 MB per core, a 300 MB L3 on the
// Xeon measured) that arrives in ~12 us; the kernel is bound by its two
// 512-bit ports instead. Measured there with independent-instruction loops:
// vpermps, vpsrlvd and vpsrld issue once per cycle, vfmadd231ps twice, all on
// the same two ports, so a chunk (2 shifts + 2 lookups + 2 FMAs) takes ~3
// cycles: ~11-13 GB/s of NF4 per core at ~2.9 GHz. Hence: no per-element work
// other than shift, lookup and FMA; absmax applied once per quant block. From
// DRAM (a decode step's case) the stream prefetch (common/prefetch.h) lets memory
// stalls overlap that work.
// gcc 12's AVX-512 headers trip -Wuninitialized inside their own
// _mm512_undefined_ps() (a known false positive in _mm512_reduce_add_ps).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

#include "common/elements.h"
#include "common/kernels.h"
#include "common/prefetch.h"
#include "common/simd_x86.h"
#include "common/tiles.h"

namespace pythia_native {
namespace cpu {

namespace {
// -1: the CPU's choice; else an Avx2Decode forced by set_avx2_decode.
std::atomic<int> g_avx2_decode_forced{-1};
}  // namespace

Avx2Decode avx2_decode() {
  const int f = g_avx2_decode_forced.load(std::memory_order_relaxed);
  if (f >= 0) return static_cast<Avx2Decode>(f);
  static const Avx2Decode best = __builtin_cpu_is("amd") ? Avx2Decode::Shuf : Avx2Decode::Perm;
  return best;
}
void set_avx2_decode(Avx2Decode d) { g_avx2_decode_forced.store(static_cast<int>(d)); }
void reset_avx2_decode() { g_avx2_decode_forced.store(-1); }
const char* avx2_decode_name(Avx2Decode d) { return d == Avx2Decode::Shuf ? "vpshufb" : "vpermps"; }

namespace {

// ----------------------------------------------------------------- scalar ---

void gemv_rows_scalar(const float* xp, int64_t M, int64_t K, const uint8_t* packed,
                      const float* absmax, int64_t bs, QuantType qt, const float* bias,
                      int64_t n0, int64_t n1, void* y, DType ydt, int64_t ldy) {
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
      store_out(y, ydt, m * ldy + n, acc + (bias ? bias[n] : 0.0f));
    }
  }
}

// Rows [n0, n1) x columns [k0, k1) of W, out row stride k1 - k0. k0, k1
// even (the vector versions: multiples of their chunk).
void dequantize_rows_scalar(const uint8_t* packed, const float* absmax, int64_t K, int64_t bs,
                            QuantType qt, int64_t n0, int64_t n1, int64_t k0, int64_t k1,
                            float* out) {
  const float* code = code_table(qt);
  const int64_t row_bytes = K / 2;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = packed + n * row_bytes;
    const float* arow = absmax + n * (K / bs);
    float* o = out + (n - n0) * (k1 - k0);
    for (int64_t j = k0 / 2; j < k1 / 2; ++j) {
      const float scale = arow[(2 * j) / bs];
      o[2 * j - k0] = code[wrow[j] >> 4] * scale;
      o[2 * j + 1 - k0] = code[wrow[j] & 0xF] * scale;
    }
  }
}

// ---------------------------------------------------------------- AVX-512 ---

#define PN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

// 16 bytes at p -> the 32 code values of one chunk, in chunk_source() order:
// lane i of *ca holds the high nibble of byte 4*(i%4) + i/4, lane i of *cb
// its low nibble (element +1).
PN_AVX512 inline void unpack32_avx512(const uint8_t* p, __m512 table, __m512* ca, __m512* cb) {
  const __m512i bytes = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i shift_a = _mm512_set_epi32(28, 28, 28, 28, 20, 20, 20, 20, 12, 12, 12, 12, 4, 4, 4, 4);
  const __m512i shift_b = _mm512_set_epi32(24, 24, 24, 24, 16, 16, 16, 16, 8, 8, 8, 8, 0, 0, 0, 0);
  *ca = _mm512_permutexvar_ps(_mm512_srlv_epi32(bytes, shift_a), table);
  *cb = _mm512_permutexvar_ps(_mm512_srlv_epi32(bytes, shift_b), table);
}

// blk[m] (+)= codes of the chunk at w (16 bytes) times x[m * K : + 32].
// FIRST starts the block's partial sums with a multiply. Template arguments
// keep the accumulator arrays in registers.
template <int MT, bool FIRST>
PN_AVX512 __attribute__((always_inline)) inline void chunk_avx512(
    const float* x, int64_t K, const uint8_t* w, __m512 table, __m512 (&blk)[MT][2]) {
  __m512 ca, cb;
  unpack32_avx512(w, table, &ca, &cb);
  for (int m = 0; m < MT; ++m) {
    const float* xk = x + m * K;
    if (FIRST) {
      blk[m][0] = _mm512_mul_ps(ca, _mm512_loadu_ps(xk));
      blk[m][1] = _mm512_mul_ps(cb, _mm512_loadu_ps(xk + 16));
    } else {
      blk[m][0] = _mm512_fmadd_ps(ca, _mm512_loadu_ps(xk), blk[m][0]);
      blk[m][1] = _mm512_fmadd_ps(cb, _mm512_loadu_ps(xk + 16), blk[m][1]);
    }
  }
}

// One row of W against MT rows of xp. Per quant block: sum code * x over the
// block, then one FMA by absmax into the running total (the scale costs one
// instruction per block, not per chunk). CPB = chunks per block when known at
// compile time (2 for blocksize 64, every published checkpoint), 0 = runtime:
// the loop is then straight-line code with pointer bumps, because at ~10
// instructions per 32 weights the scalar index arithmetic is not free.
template <int MT, int CPB>
PN_AVX512 inline void gemv_row_avx512(const float* xp, int64_t K, const uint8_t* wrow,
                                      const float* arow, int64_t bs, __m512 table,
                                      StreamPrefetcher& pw, StreamPrefetcher& pa, float* sums) {
  __m512 tot[MT][2];
  for (int m = 0; m < MT; ++m) tot[m][0] = tot[m][1] = _mm512_setzero_ps();
  const int64_t cpb = CPB > 0 ? CPB : bs / 32;
  const int64_t nb = K / bs;
  const uint8_t* w = wrow;
  const float* x = xp;
  for (int64_t b = 0; b < nb; ++b) {
    pw.before(w + bs / 2);
    pa.before(arow + b + 1);
    __m512 blk[MT][2];
    chunk_avx512<MT, true>(x, K, w, table, blk);
    w += 16;
    x += 32;
    for (int64_t c = 1; c < cpb; ++c, w += 16, x += 32) chunk_avx512<MT, false>(x, K, w, table, blk);
    const __m512 scale = _mm512_set1_ps(arow[b]);
    for (int m = 0; m < MT; ++m) {
      tot[m][0] = _mm512_fmadd_ps(blk[m][0], scale, tot[m][0]);
      tot[m][1] = _mm512_fmadd_ps(blk[m][1], scale, tot[m][1]);
    }
  }
  for (int m = 0; m < MT; ++m) sums[m] = _mm512_reduce_add_ps(_mm512_add_ps(tot[m][0], tot[m][1]));
}

// M = 1, blocksize 64: R rows of W against one row of x, each row's sums
// in exactly the order of gemv_row_avx512<1, 2> (so the same bits, whatever
// rows a thread is given). The x loads serve all R rows and the per-row work
// (the horizontal sums, the stores, the loop) is paid once per R rows: at
// K = 768 that work was ~10-15% of a row. Measured at M = 1, one thread, on
// the pythia-160m shapes (2-vCPU AVX-512 Xeon, medians of 5 alternated runs):
// R = 2 took 768x2304 from 128 to 110 us and 768x768 from 39 to 36 us; K =
// 3072 rows gained nothing measurable (their per-row work is 4x rarer); R = 3
// and 4 were slower than 2 (more live registers than zmm0-31 hold). Pairs
// once stopped at K = 3072: consecutive pairs read K = 8192 8% slower from
// cache in one A/B (x alone is 32 KiB there). Pairs half the range apart,
// each row its own stream (below), gain at every K: alternated in one process
// against one row at a time (a 2-vCPU Xeon, family 6 model 167, 2026-12-03),
// from DRAM (330 MB of each shape cycled), 1 / 2 threads: 8192x2048 1.30x /
// 1.31x, 4096x1024 1.13x / 1.25x, 10240x2560 1.18x / 1.22x, 16384x4096 1.26x
// / 1.34x, 20480x5120 1.21x / 1.30x, 5120x15360 1.09x / 1.24x (2048x8192, a
// pair both ways, 1.00x); one weight called repeatedly (from cache):
// 1.40-1.59x / 1.24-1.41x on four of them. At K = 20480 x (80 KiB) no longer
// fits L1 and a pair reads it from L2 half as often as single rows do.
// The R rows are wstep bytes apart (astep absmax), each prefetching its own
// lines `ahead` bytes on (absmax as far in rows), one per 64 bytes: the
// driver takes a pair's rows half the thread's range apart, two streams (see
// gemv_rows_avx512).
constexpr int kM1RowsPerStep = 2;
template <int R>
PN_AVX512 inline void gemv_rows_m1_bs64_avx512(const float* x, int64_t K, const uint8_t* w,
                                                const float* a, int64_t wstep, int64_t astep,
                                                int64_t ahead, __m512 table, float* sums) {
  const int64_t row_bytes = wstep, row_blocks = astep;
  __m512 t[R][2];
  for (int r = 0; r < R; ++r) t[r][0] = t[r][1] = _mm512_setzero_ps();
  const int64_t nb = K / 64;
  const char* aahead = reinterpret_cast<const char*>(a) + ahead / 8;
  for (int64_t b = 0; b < nb; ++b, w += 32, x += 64) {
    // A block is 32 bytes of each row and 4 of its absmax: a line of W every
    // other block, of absmax every 16th.
    if (b & 1) {
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w + r * row_bytes) + ahead, _MM_HINT_T0);
      }
    }
    if ((b & 15) == 0) {
      for (int r = 0; r < R; ++r) _mm_prefetch(aahead + 4 * (r * row_blocks + b), _MM_HINT_T0);
    }
    const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
    const __m512 x2 = _mm512_loadu_ps(x + 32), x3 = _mm512_loadu_ps(x + 48);
    __m512 p[R][2];
    for (int r = 0; r < R; ++r) {
      __m512 ca, cb;
      unpack32_avx512(w + r * row_bytes, table, &ca, &cb);
      p[r][0] = _mm512_mul_ps(ca, x0);
      p[r][1] = _mm512_mul_ps(cb, x1);
    }
    for (int r = 0; r < R; ++r) {
      __m512 ca, cb;
      unpack32_avx512(w + r * row_bytes + 16, table, &ca, &cb);
      p[r][0] = _mm512_fmadd_ps(ca, x2, p[r][0]);
      p[r][1] = _mm512_fmadd_ps(cb, x3, p[r][1]);
    }
    for (int r = 0; r < R; ++r) {
      const __m512 sc = _mm512_set1_ps(a[r * row_blocks + b]);
      t[r][0] = _mm512_fmadd_ps(p[r][0], sc, t[r][0]);
      t[r][1] = _mm512_fmadd_ps(p[r][1], sc, t[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = _mm512_reduce_add_ps(_mm512_add_ps(t[r][0], t[r][1]));
}

// One row of W against MT rows of x, stored to y[m * ldy + n]. table holds
// the codes times 2^-s, unscale is 2^s (gemv_code_shift).
template <int MT>
PN_AVX512 inline void row_group_avx512(const float* x, int64_t K, const uint8_t* wrow,
                                       const float* arow, int64_t bs, __m512 table, float unscale,
                                       float b, StreamPrefetcher& pw, StreamPrefetcher& pa,
                                       void* y, DType ydt, int64_t ldy, int64_t n) {
  float sums[MT];
  if (bs == 64) {
    gemv_row_avx512<MT, 2>(x, K, wrow, arow, bs, table, pw, pa, sums);
  } else {
    gemv_row_avx512<MT, 0>(x, K, wrow, arow, bs, table, pw, pa, sums);
  }
  for (int m = 0; m < MT; ++m) store_out(y, ydt, m * ldy + n, sums[m] * unscale + b);
}

// Rows [n0, n1) of W against all M rows of xp: row by row, and for each row
// the rows of x in groups of up to 4 (kept in registers while the row is
// unpacked); the row (K / 2 bytes) stays in L1 from one group to the next,
// so W comes from memory once whatever M is.
PN_AVX512 void gemv_rows_avx512(const float* xp, int64_t M, int64_t K, const uint8_t* packed,
                                const float* absmax, int64_t bs, QuantType qt, const float* bias,
                                int64_t n0, int64_t n1, void* y, DType ydt, int64_t ldy, int shift) {
  // The codes times 2^-shift, y times 2^shift (gemv_code_shift; 0 but for an
  // x near the float32 maximum).
  const float unscale = std::ldexp(1.0f, shift);
  const __m512 table = _mm512_mul_ps(_mm512_loadu_ps(code_table(qt)),
                                     _mm512_set1_ps(std::ldexp(1.0f, -shift)));
  // absmax is 8 / bs bytes per packed byte: its stream is prefetched as far
  // ahead in rows.
  const int64_t esize = dtype_size(ydt);
  int64_t n = n0;
  if (M == 1 && bs == 64) {
    // Decoding: rows in pairs n0 + i, n0 + i + q (q = (n1 - n0) / 2, two
    // streams); an odd last row goes through the loop below, with the same
    // bits. Against consecutive pairs prefetched by a StreamPrefetcher
    // 4 KiB ahead, alternated in one process on weights from DRAM (287-340
    // MB of 160m- and 1.4b-shaped layers cycled, a 2-vCPU Xeon, family 6
    // model 167, 2026-12-02): 1.05-1.20x on one thread, 1.06-1.13x on two;
    // a 160m decode step 1.04-1.05x. Consecutive pairs with this prefetch:
    // 1.03-1.11x; pairs from four quarters in turn: 1.03-1.12x. The kernel's
    // own work (~8-9 GB/s per core from cache) is what binds it.
    constexpr int R = kM1RowsPerStep;
    const int64_t q = (n1 - n0) / R, wrow = K / 2, arow = K / 64;
    const int64_t ahead = std::max<int64_t>(kRowAhead, wrow);
    for (int64_t i = 0; i < q; ++i) {
      const int64_t nn = n0 + i;
      float sums[R];
      gemv_rows_m1_bs64_avx512<R>(xp, K, packed + nn * wrow, absmax + nn * arow, q * wrow,
                                  q * arow, ahead, table, sums);
      for (int r = 0; r < R; ++r) {
        store_out(y, ydt, nn + r * q, sums[r] * unscale + (bias ? bias[nn + r * q] : 0.0f));
      }
    }
    n = n0 + R * q;
  }
  // The rows from n on, one stream.
  StreamPrefetcher pw(packed + n * (K / 2), packed + n1 * (K / 2), kPrefetchAhead);
  StreamPrefetcher pa(absmax + n * (K / bs), absmax + n1 * (K / bs), kPrefetchAhead * 8 / bs);
  for (; n < n1; ++n) {
    const uint8_t* wrow = packed + n * (K / 2);
    const float* arow = absmax + n * (K / bs);
    const float b = bias ? bias[n] : 0.0f;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const float* x = xp + m0 * K;
      void* yo = static_cast<char*>(y) + m0 * ldy * esize;
      switch (std::min<int64_t>(4, M - m0)) {
        case 4: row_group_avx512<4>(x, K, wrow, arow, bs, table, unscale, b, pw, pa, yo, ydt, ldy, n); break;
        case 3: row_group_avx512<3>(x, K, wrow, arow, bs, table, unscale, b, pw, pa, yo, ydt, ldy, n); break;
        case 2: row_group_avx512<2>(x, K, wrow, arow, bs, table, unscale, b, pw, pa, yo, ydt, ldy, n); break;
        default: row_group_avx512<1>(x, K, wrow, arow, bs, table, unscale, b, pw, pa, yo, ydt, ldy, n); break;
      }
    }
  }
}

PN_AVX512 void dequantize_rows_avx512(const uint8_t* packed, const float* absmax, int64_t K,
                                      int64_t bs, QuantType qt, int64_t n0, int64_t n1,
                                      int64_t k0, int64_t k1, float* out) {
  const __m512 table = _mm512_loadu_ps(code_table(qt));
  const int log2bs = __builtin_ctzll(static_cast<unsigned long long>(bs));
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = packed + n * (K / 2);
    const float* arow = absmax + n * (K / bs);
    float* o = out + (n - n0) * (k1 - k0);
    for (int64_t k = k0; k < k1; k += 32) {
      const __m512 scale = _mm512_set1_ps(arow[k >> log2bs]);
      __m512 ce, co;
      unpack32_avx512(wrow + k / 2, table, &ce, &co);
      _mm512_storeu_ps(o + (k - k0), _mm512_mul_ps(ce, scale));
      _mm512_storeu_ps(o + (k - k0) + 16, _mm512_mul_ps(co, scale));
    }
  }
}

// ------------------------------------------------------------------- AVX2 ---

#define PN_AVX2 __attribute__((target("avx2,fma")))

// The AVX2 decode: 16 bytes (a chunk of 32 weights) -> f[0..3], 8 codes each,
// in chunk_source() order: lane r of f[q] holds the code of element
// 2 * (4q + r % 4) + (r >= 4), i.e. byte 4q + r % 4's high nibble for r < 4
// and its low nibble for r >= 4. Two ways, with the same result bit for bit
// (so the sums run in one order whichever a CPU takes):
//   Perm  dword q broadcast, a nibble shifted down per lane (vpsrlvd), then
//         two vpermps (the table's halves) and a blend on bit 3 (vpermps
//         reads bits 0-2, the blend the sign: no mask needed);
//   Shuf  the four bytes of each float32 code as four 16-entry tables
//         (planes), looked up with vpshufb by the nibbles, then interleaved
//         into floats (vpunpck{l,h}bw, {l,h}wd).
// On an AVX2-only AMD EPYC (family 25 model 1, 2026-12-08) vpermps took
// ~1.25 cycles each and the Perm mix 18.2-18.5 ns per 128 weights, the Shuf
// mix 11.3-11.5 (benchmarks/experiments/avx2_decode.cpp); on Intel cores
// (one shuffle port) Shuf's 12 shuffles per 32 weights should lose to Perm's
// 8 (not measured). So AMD CPUs take Shuf, others Perm (avx2_decode()).
struct Avx2Tables {
  __m256 lo, hi;      // Perm: codes 0-7 and 8-15
  __m256i plane[4];   // Shuf: byte j of each code, in both 128-bit lanes
};

PN_AVX2 inline Avx2Tables avx2_tables(QuantType qt, float scale) {
  alignas(32) float code[16];
  for (int i = 0; i < 16; ++i) code[i] = code_table(qt)[i] * scale;  // a power of two: exact
  alignas(16) uint8_t pl[4][16];
  for (int i = 0; i < 16; ++i) {
    uint32_t u;
    __builtin_memcpy(&u, &code[i], 4);
    for (int j = 0; j < 4; ++j) pl[j][i] = static_cast<uint8_t>(u >> (8 * j));
  }
  Avx2Tables t;
  t.lo = _mm256_load_ps(code);
  t.hi = _mm256_load_ps(code + 8);
  for (int j = 0; j < 4; ++j) {
    t.plane[j] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(pl[j])));
  }
  return t;
}

template <Avx2Decode D>
PN_AVX2 __attribute__((always_inline)) inline void unpack32_avx2(const uint8_t* p,
                                                                 const Avx2Tables& t, __m256* f) {
  if (D == Avx2Decode::Shuf) {
    const __m256i v =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    // Low 128-bit lane: the 16 high nibbles; high lane: the 16 low nibbles.
    const __m256i idx = _mm256_blend_epi32(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
                                           _mm256_and_si256(v, m4), 0xF0);
    const __m256i b0 = _mm256_shuffle_epi8(t.plane[0], idx);
    const __m256i b1 = _mm256_shuffle_epi8(t.plane[1], idx);
    const __m256i b2 = _mm256_shuffle_epi8(t.plane[2], idx);
    const __m256i b3 = _mm256_shuffle_epi8(t.plane[3], idx);
    const __m256i u0 = _mm256_unpacklo_epi8(b0, b1), u1 = _mm256_unpackhi_epi8(b0, b1);
    const __m256i u2 = _mm256_unpacklo_epi8(b2, b3), u3 = _mm256_unpackhi_epi8(b2, b3);
    // f[q]: bytes 4q..4q+3, high nibbles' codes in the low lane, low nibbles' in the high.
    f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(u0, u2));
    f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(u0, u2));
    f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(u1, u3));
    f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(u1, u3));
  } else {
    const __m256i sh = _mm256_set_epi32(24, 16, 8, 0, 28, 20, 12, 4);
    for (int q = 0; q < 4; ++q) {
      int32_t d;
      __builtin_memcpy(&d, p + 4 * q, 4);
      f[q] = lookup8(_mm256_srlv_epi32(_mm256_set1_epi32(d), sh), t.lo, t.hi);
    }
  }
}

// One chunk (32 weights) for MT rows of x: f[0], f[1] into blk[m][0], f[2],
// f[3] into blk[m][1] (each accumulator gets blocksize / 16 terms per lane,
// the count gemv_code_shift assumes).
template <int MT, bool FIRST, Avx2Decode D>
PN_AVX2 __attribute__((always_inline)) inline void chunk_avx2(
    const float* xp, int64_t K, int64_t k, const uint8_t* wrow, const Avx2Tables& t,
    __m256 (&blk)[MT][2]) {
  __m256 f[4];
  unpack32_avx2<D>(wrow + k / 2, t, f);
  for (int m = 0; m < MT; ++m) {
    const float* xk = xp + m * K + k;
    if (FIRST) {
      blk[m][0] = _mm256_mul_ps(f[0], _mm256_loadu_ps(xk));
      blk[m][1] = _mm256_mul_ps(f[2], _mm256_loadu_ps(xk + 16));
    } else {
      blk[m][0] = _mm256_fmadd_ps(f[0], _mm256_loadu_ps(xk), blk[m][0]);
      blk[m][1] = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(xk + 16), blk[m][1]);
    }
    blk[m][0] = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(xk + 8), blk[m][0]);
    blk[m][1] = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(xk + 24), blk[m][1]);
  }
}

// As gemv_row_avx512, 32 weights per chunk.
template <int MT, Avx2Decode D>
PN_AVX2 inline void gemv_row_avx2(const float* xp, int64_t K, const uint8_t* wrow,
                                  const float* arow, int64_t bs, const Avx2Tables& t,
                                  StreamPrefetcher& pw, StreamPrefetcher& pa, float* sums) {
  __m256 tot[MT][2];
  for (int m = 0; m < MT; ++m) tot[m][0] = tot[m][1] = _mm256_setzero_ps();
  for (int64_t k0 = 0, b = 0; k0 < K; k0 += bs, ++b) {
    pw.before(wrow + (k0 + bs) / 2);
    pa.before(arow + b + 1);
    __m256 blk[MT][2];
    chunk_avx2<MT, true, D>(xp, K, k0, wrow, t, blk);
    for (int64_t k = k0 + 32; k < k0 + bs; k += 32) {
      chunk_avx2<MT, false, D>(xp, K, k, wrow, t, blk);
    }
    const __m256 scale = _mm256_set1_ps(arow[b]);
    for (int m = 0; m < MT; ++m) {
      tot[m][0] = _mm256_fmadd_ps(blk[m][0], scale, tot[m][0]);
      tot[m][1] = _mm256_fmadd_ps(blk[m][1], scale, tot[m][1]);
    }
  }
  for (int m = 0; m < MT; ++m) sums[m] = hsum8(_mm256_add_ps(tot[m][0], tot[m][1]));
}

template <int MT, Avx2Decode D>
PN_AVX2 inline void row_group_avx2(const float* x, int64_t K, const uint8_t* wrow,
                                   const float* arow, int64_t bs, const Avx2Tables& t,
                                   float unscale, float b, StreamPrefetcher& pw,
                                   StreamPrefetcher& pa, void* y, DType ydt, int64_t ldy,
                                   int64_t n) {
  float sums[MT];
  gemv_row_avx2<MT, D>(x, K, wrow, arow, bs, t, pw, pa, sums);
  for (int m = 0; m < MT; ++m) store_out(y, ydt, m * ldy + n, sums[m] * unscale + b);
}

// As gemv_rows_avx512.
template <Avx2Decode D>
PN_AVX2 void gemv_rows_avx2_d(const float* xp, int64_t M, int64_t K, const uint8_t* packed,
                              const float* absmax, int64_t bs, QuantType qt, const float* bias,
                              int64_t n0, int64_t n1, void* y, DType ydt, int64_t ldy, int shift) {
  // The codes times 2^-shift, y times 2^shift (see gemv_code_shift).
  const float unscale = std::ldexp(1.0f, shift);
  const Avx2Tables t = avx2_tables(qt, std::ldexp(1.0f, -shift));
  StreamPrefetcher pw(packed + n0 * (K / 2), packed + n1 * (K / 2), kPrefetchAhead);
  StreamPrefetcher pa(absmax + n0 * (K / bs), absmax + n1 * (K / bs), kPrefetchAhead * 8 / bs);
  const int64_t esize = dtype_size(ydt);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = packed + n * (K / 2);
    const float* arow = absmax + n * (K / bs);
    const float b = bias ? bias[n] : 0.0f;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const float* x = xp + m0 * K;
      void* yo = static_cast<char*>(y) + m0 * ldy * esize;
      switch (std::min<int64_t>(4, M - m0)) {
        case 4: row_group_avx2<4, D>(x, K, wrow, arow, bs, t, unscale, b, pw, pa, yo, ydt, ldy, n); break;
        case 3: row_group_avx2<3, D>(x, K, wrow, arow, bs, t, unscale, b, pw, pa, yo, ydt, ldy, n); break;
        case 2: row_group_avx2<2, D>(x, K, wrow, arow, bs, t, unscale, b, pw, pa, yo, ydt, ldy, n); break;
        default: row_group_avx2<1, D>(x, K, wrow, arow, bs, t, unscale, b, pw, pa, yo, ydt, ldy, n); break;
      }
    }
  }
}

void gemv_rows_avx2(const float* xp, int64_t M, int64_t K, const uint8_t* packed,
                    const float* absmax, int64_t bs, QuantType qt, const float* bias, int64_t n0,
                    int64_t n1, void* y, DType ydt, int64_t ldy, int shift) {
  if (avx2_decode() == Avx2Decode::Shuf) {
    gemv_rows_avx2_d<Avx2Decode::Shuf>(xp, M, K, packed, absmax, bs, qt, bias, n0, n1, y, ydt, ldy, shift);
  } else {
    gemv_rows_avx2_d<Avx2Decode::Perm>(xp, M, K, packed, absmax, bs, qt, bias, n0, n1, y, ydt, ldy, shift);
  }
}

template <Avx2Decode D>
PN_AVX2 void dequantize_rows_avx2_d(const uint8_t* packed, const float* absmax, int64_t K,
                                    int64_t bs, QuantType qt, int64_t n0, int64_t n1, int64_t k0,
                                    int64_t k1, float* out) {
  const Avx2Tables t = avx2_tables(qt, 1.0f);
  const int log2bs = __builtin_ctzll(static_cast<unsigned long long>(bs));
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = packed + n * (K / 2);
    const float* arow = absmax + n * (K / bs);
    float* o = out + (n - n0) * (k1 - k0);
    for (int64_t k = k0; k < k1; k += 32) {
      const __m256 scale = _mm256_set1_ps(arow[k >> log2bs]);
      __m256 f[4];
      unpack32_avx2<D>(wrow + k / 2, t, f);
      for (int q = 0; q < 4; ++q) _mm256_storeu_ps(o + (k - k0) + 8 * q, _mm256_mul_ps(f[q], scale));
    }
  }
}

void dequantize_rows_avx2(const uint8_t* packed, const float* absmax, int64_t K, int64_t bs,
                          QuantType qt, int64_t n0, int64_t n1, int64_t k0, int64_t k1,
                          float* out) {
  if (avx2_decode() == Avx2Decode::Shuf) {
    dequantize_rows_avx2_d<Avx2Decode::Shuf>(packed, absmax, K, bs, qt, n0, n1, k0, k1, out);
  } else {
    dequantize_rows_avx2_d<Avx2Decode::Perm>(packed, absmax, K, bs, qt, n0, n1, k0, k1, out);
  }
}

}  // namespace

// Position i of a chunk holds weight chunk_source(i) of the chunk: the first
// half the high nibbles, the second half the low nibbles, with `dwords`
// 32-bit words per 128 bits of unpacked lanes (see unpack32_avx512 and
// unpack16_avx2; the scalar kernel keeps natural order).
static int64_t chunk_source(Isa isa, int64_t i) {
  const int64_t half = chunk_elems(isa) / 2;
  const int64_t lane = i % half;
  const int64_t low = i / half;  // 0: high nibble (even element), 1: low nibble
  switch (isa) {
    case Isa::AVX512: return 8 * (lane % 4) + 2 * (lane / 4) + low;
    case Isa::AVX2: return 2 * (4 * (i / 8) + i % 4) + (i % 8 >= 4);  // see unpack32_avx2
    default: return i;
  }
}

template <typename T>
static float permute_k_typed(const T* x, int64_t M, int64_t K, int64_t ldx, Isa isa, float* xp) {
  const int64_t C = chunk_elems(isa);
  int64_t src[32];
  for (int64_t i = 0; i < C; ++i) src[i] = chunk_source(isa, i);
  float amax = 0.0f;
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * ldx;
    float* o = xp + m * K;
    for (int64_t c = 0; c < K; c += C) {
      for (int64_t i = 0; i < C; ++i) {
        const float v = to_f32(xr[c + src[i]]);
        o[c + i] = v;
        amax = std::fabs(v) > amax ? std::fabs(v) : amax;  // a NaN compares false: skipped
      }
    }
  }
  return amax;
}

float permute_k(const void* x, DType dt, int64_t M, int64_t K, int64_t ldx, Isa isa, float* xp) {
  switch (dt) {
    case DType::F32: return permute_k_typed(static_cast<const float*>(x), M, K, ldx, isa, xp);
    case DType::BF16: return permute_k_typed(static_cast<const Bf16*>(x), M, K, ldx, isa, xp);
    case DType::F16: return permute_k_typed(static_cast<const F16*>(x), M, K, ldx, isa, xp);
  }
  return 0.0f;
}

int gemv_code_shift(float amax, int64_t blocksize, Isa isa) {
  if (isa == Isa::Scalar) return 0;
  // Terms each accumulator lane sums per block: blocksize / chunk, where a
  // "chunk" here is 32 (AVX-512: one FMA per 32 weights) or 16 (AVX2: a
  // 32-weight chunk's two FMAs per accumulator).
  const int64_t chunk = isa == Isa::AVX512 ? 32 : 16;
  const int64_t terms = std::max<int64_t>(1, blocksize / chunk);
  if (static_cast<double>(amax) * static_cast<double>(terms) <=
      static_cast<double>(std::numeric_limits<float>::max())) {
    return 0;
  }
  return __builtin_ctzll(static_cast<unsigned long long>(terms));  // blocksize, chunk: powers of two
}

void gemv_4bit_rows(const float* xp, int64_t M, int64_t K, const uint8_t* packed,
                    const float* absmax, int64_t blocksize, QuantType qt, const float* bias,
                    int64_t n0, int64_t n1, void* y, DType ydt, int64_t ldy, Isa isa,
                    int code_shift) {
  switch (isa) {
    case Isa::AVX512:
      gemv_rows_avx512(xp, M, K, packed, absmax, blocksize, qt, bias, n0, n1, y, ydt, ldy,
                       code_shift);
      break;
    case Isa::AVX2:
      gemv_rows_avx2(xp, M, K, packed, absmax, blocksize, qt, bias, n0, n1, y, ydt, ldy,
                     code_shift);
      break;
    default:
      gemv_rows_scalar(xp, M, K, packed, absmax, blocksize, qt, bias, n0, n1, y, ydt, ldy);
  }
}

namespace {
// The tiles' fill (common/tiles.h): rows [n, n + rows) of W dequantized in
// the permuted chunk order by the ISA's dequantize_rows_*, the packed rows
// and their absmax prefetched ahead as in the GEMVs.
using DequantRowsFn = void (*)(const uint8_t*, const float*, int64_t, int64_t, QuantType, int64_t,
                               int64_t, int64_t, int64_t, float*);
struct DequantRows {
  DequantRowsFn rows_fn;
  const uint8_t* packed;
  const float* absmax;
  int64_t K, bs;
  QuantType qt;
  StreamPrefetcher pw, pa;
  DequantRows(DequantRowsFn fn, const uint8_t* packed_, const float* absmax_, int64_t K_,
              int64_t bs_, QuantType qt_, int64_t n0, int64_t n1)
      : rows_fn(fn), packed(packed_), absmax(absmax_), K(K_), bs(bs_), qt(qt_),
        pw(packed_ + n0 * (K_ / 2), packed_ + n1 * (K_ / 2), kPrefetchAhead),
        pa(absmax_ + n0 * (K_ / bs_), absmax_ + n1 * (K_ / bs_), kPrefetchAhead * 8 / bs_) {}
  void operator()(int64_t n, int64_t rows, int64_t k0, int64_t k1, float* out) {
    if (k0 == 0) {
      pw.before(packed + (n + rows) * (K / 2));
      pa.before(absmax + (n + rows) * (K / bs));
    }
    rows_fn(packed, absmax, K, bs, qt, n, n + rows, k0, k1, out);
  }
};
}  // namespace

void gemm_4bit_tiles(const float* xp, int64_t M, int64_t K, const uint8_t* packed,
                     const float* absmax, int64_t blocksize, QuantType qt, const float* bias,
                     int64_t n0, int64_t n1, void* y, DType ydt, int64_t ldy, Isa isa) {
  switch (isa) {
    case Isa::AVX512:
      tiles::gemm(tiles::Avx512Tile{},
                  DequantRows(dequantize_rows_avx512, packed, absmax, K, blocksize, qt, n0, n1), xp,
                  M, K, bias, n0, n1, y, ydt, ldy);
      break;
    case Isa::AVX2:
      tiles::gemm(tiles::Avx2Tile{},
                  DequantRows(dequantize_rows_avx2, packed, absmax, K, blocksize, qt, n0, n1), xp,
                  M, K, bias, n0, n1, y, ydt, ldy);
      break;
    default:
      tiles::gemm(tiles::ScalarTile{},
                  DequantRows(dequantize_rows_scalar, packed, absmax, K, blocksize, qt, n0, n1), xp,
                  M, K, bias, n0, n1, y, ydt, ldy);
  }
}

void dequantize_rows_permuted(const uint8_t* packed, const float* absmax, int64_t K,
                              int64_t blocksize, QuantType qt, int64_t n0, int64_t n1,
                              float* out, Isa isa) {
  switch (isa) {
    case Isa::AVX512: dequantize_rows_avx512(packed, absmax, K, blocksize, qt, n0, n1, 0, K, out); break;
    case Isa::AVX2: dequantize_rows_avx2(packed, absmax, K, blocksize, qt, n0, n1, 0, K, out); break;
    default: dequantize_rows_scalar(packed, absmax, K, blocksize, qt, n0, n1, 0, K, out);
  }
}

}  // namespace cpu
}  // namespace pythia_native
