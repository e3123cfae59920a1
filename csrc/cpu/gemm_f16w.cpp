// CPU kernels of gemm_f16w: a dense layer whose weight stays in float16 while
// x and the sums are float32 (bf16/fp16 x is widened by the caller, exactly).
//
// What it is for: the dense embed_out of a CPU model. Pythia checkpoints are
// float16, so a float32 model's head holds float16 values widened to 32 bits;
// keeping them as float16 halves the bytes a decode step reads (154 -> 77 MB
// for pythia-160m, the largest single read of a step) and changes no value.
//
// Versions (chosen by the isa argument):
//   avx512  16 weights per vcvtph2ps, 4 rows of W at a time against up to 4
//           rows of x (4 x MT independent FMA chains, each x load shared by
//           4 rows); masked loads for the K % 16 tail
//   avx2    the same with F16C, 8 weights per step, 2 rows at a time, a scalar
//           tail
//   scalar  the portable fallback and the readable definition
//
// Napkin math, pythia-160m head (N = 50304, K = 768, M = 1): 77 MB of weights
// against 39 M FMAs. Per 16 weights: one vcvtph2ps (2 uops) + one FMA, ~1.5
// cycles, i.e. ~30 GB/s of float16 per core at 3 GHz: above what the memory
// delivers, so the kernel is bound by DRAM. It reads W as several streams at
// once (the rows of a block far apart, see rows()), each row prefetching its
// own lines one per 64 bytes. Measured on a 2-vCPU Xeon (family 6 model 167,
// 105 MB L3; four 77 MB heads cycled, so from DRAM; in one process,
// alternated with the previous kernel, whose 4 consecutive rows prefetched
// the next block's lines, 2026-12-02): 1.60-1.63x at M = 1 on one thread
// (8.9 -> 14.2-14.6 GB/s) and 1.41-1.43x on two (16.3 -> 23.1-23.4 GB/s, above
// the 18.5-19.3 GB/s one plain stream per thread reads there); M = 4
// 1.44-1.47x and 1.40-1.41x; AVX2 with two streams 1.23-1.26x, with four
// (rows()) 1.19-1.21x more. (That previous kernel had measured 1.06-1.13x at
// M = 1 over a StreamPrefetcher asking 4 KiB ahead once per block.)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>

#include "common/elements.h"
#include "common/kernels.h"
#include "common/prefetch.h"
#include "common/simd_x86.h"
#include "common/tiles.h"

namespace pythia_native {
namespace cpu {

namespace {

// One line of W's stream `ahead` bytes past p, into L1 (T1/T2 hints measured
// no better for the 4-bit GEMV, common/prefetch.h).
inline void prefetch_row_line(const uint16_t* p, int64_t ahead) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + ahead, _MM_HINT_T0);
}

// ----------------------------------------------------------------- scalar ---

void rows_scalar(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* bias,
                 int64_t n0, int64_t n1, void* y, DType ydt, int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += to_f32(F16{wr[k]}) * xr[k];
      store_out(y, ydt, m * ldy + n, acc + (bias ? bias[n] : 0.0f));
    }
  }
}

// ---------------------------------------------------------------- AVX-512 ---

#define PN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))

// R rows of W (n + r * step, r < R) against MT rows of x; with kPrefetch,
// each row asks for its line `ahead` bytes on.
template <int R, int MT, bool kPrefetch>
PN_AVX512 inline void block_avx512(const float* x, int64_t K, const uint16_t* w, int64_t n,
                                   int64_t step, int64_t ahead, float (&out)[R][MT]) {
  const uint16_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (n + r * step) * K;
  __m512 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  const int64_t K16 = K - K % 16;
  for (int64_t k = 0; k < K16; k += 16) {
    __m512 xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = _mm512_loadu_ps(x + m * K + k);
    // Every other step (64 bytes of each row).
    if (kPrefetch && (k & 31) == 0) {
      for (int r = 0; r < R; ++r) prefetch_row_line(wr[r] + k, ahead);
    }
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[r] + k)));
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  if (K16 < K) {
    const __mmask16 mk = static_cast<__mmask16>((1u << (K - K16)) - 1);
    __m512 xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = _mm512_maskz_loadu_ps(mk, x + m * K + K16);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, wr[r] + K16));
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) out[r][m] = _mm512_reduce_add_ps(acc[r][m]);
}

PN_AVX512 void widen_avx512(const uint16_t* w, int64_t count, float* out) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(w + i))));
  }
  if (i < count) {
    const __mmask16 mk = static_cast<__mmask16>((1u << (count - i)) - 1);
    _mm512_mask_storeu_ps(out + i, mk, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, w + i)));
  }
}

// ------------------------------------------------------------------- AVX2 ---

#define PN_AVX2 __attribute__((target("avx2,fma,f16c")))

template <int R, int MT, bool kPrefetch>
PN_AVX2 inline void block_avx2(const float* x, int64_t K, const uint16_t* w, int64_t n,
                               int64_t step, int64_t ahead, float (&out)[R][MT]) {
  const uint16_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (n + r * step) * K;
  __m256 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
  const int64_t K8 = K - K % 8;
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
    // Every fourth step (64 bytes of each row).
    if (kPrefetch && (k & 31) == 0) {
      for (int r = 0; r < R; ++r) prefetch_row_line(wr[r] + k, ahead);
    }
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[r] + k)));
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < MT; ++m) {
      float s = hsum8(acc[r][m]);
      for (int64_t k = K8; k < K; ++k) s += to_f32(F16{wr[r][k]}) * x[m * K + k];
      out[r][m] = s;
    }
  }
}

PN_AVX2 void widen_avx2(const uint16_t* w, int64_t count, float* out) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    _mm256_storeu_ps(out + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i))));
  }
  for (; i < count; ++i) out[i] = to_f32(F16{w[i]});
}

// ----------------------------------------------------------------- driver ---

// The ISA kernels by name, for the driver: kRows rows of W per block (what
// fits the accumulators in registers: 4 x MT zmm, 2 x MT ymm), kRowsM1 at
// M = 1.
struct Avx512Blocks {
  static constexpr int kRows = 4;
  static constexpr int kRowsM1 = 4;
  template <int R, int MT, bool kPrefetch>
  static void run(const float* x, int64_t K, const uint16_t* w, int64_t n, int64_t step,
                  int64_t ahead, float (&out)[R][MT]) {
    block_avx512<R, MT, kPrefetch>(x, K, w, n, step, ahead, out);
  }
};
struct Avx2Blocks {
  static constexpr int kRows = 2;
  static constexpr int kRowsM1 = 4;
  template <int R, int MT, bool kPrefetch>
  static void run(const float* x, int64_t K, const uint16_t* w, int64_t n, int64_t step,
                  int64_t ahead, float (&out)[R][MT]) {
    block_avx2<R, MT, kPrefetch>(x, K, w, n, step, ahead, out);
  }
};

// R rows of W (n + r * step) against MT rows of x, stored with the bias;
// with kPrefetch, each row also asks for its lines `ahead` bytes on.
template <class Blocks, int R, int MT, bool kPrefetch>
void store_block(const float* x, int64_t K, const uint16_t* w, int64_t n, int64_t step,
                 int64_t ahead, const float* bias, void* y, DType ydt, int64_t ldy) {
  float out[R][MT];
  Blocks::template run<R, MT, kPrefetch>(x, K, w, n, step, ahead, out);
  for (int r = 0; r < R; ++r) {
    const int64_t nr = n + r * step;
    for (int m = 0; m < MT; ++m)
      store_out(y, ydt, m * ldy + nr, out[r][m] + (bias ? bias[nr] : 0.0f));
  }
}

// store_block for mt (1-4) rows of x.
template <class Blocks, int R, bool kPrefetch>
void store_block_mt(int mt, const float* x, int64_t K, const uint16_t* w, int64_t n,
                    int64_t step, int64_t ahead, const float* bias, void* y, DType ydt,
                    int64_t ldy) {
  switch (mt) {
    case 4: store_block<Blocks, R, 4, kPrefetch>(x, K, w, n, step, ahead, bias, y, ydt, ldy); break;
    case 3: store_block<Blocks, R, 3, kPrefetch>(x, K, w, n, step, ahead, bias, y, ydt, ldy); break;
    case 2: store_block<Blocks, R, 2, kPrefetch>(x, K, w, n, step, ahead, bias, y, ydt, ldy); break;
    default: store_block<Blocks, R, 1, kPrefetch>(x, K, w, n, step, ahead, bias, y, ydt, ldy); break;
  }
}

// One block of R rows of W against every row of x, in groups of up to 4
// (the block, R * K * 2 bytes, stays in L1 from one group to the next, so W
// comes from memory once whatever M is). The first group prefetches
// (kPrefetch), the others find the lines asked for.
template <class Blocks, int R, bool kPrefetch>
void rows_block(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t n,
                int64_t step, int64_t ahead, const float* bias, void* y, DType ydt,
                int64_t ldy) {
  const int64_t esize = dtype_size(ydt);
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const float* xm = x + m0 * K;
    void* ym = static_cast<char*>(y) + m0 * ldy * esize;
    const int mt = static_cast<int>(std::min<int64_t>(4, M - m0));
    if (m0 == 0) {
      store_block_mt<Blocks, R, kPrefetch>(mt, xm, K, w, n, step, ahead, bias, ym, ydt, ldy);
    } else {
      store_block_mt<Blocks, R, false>(mt, xm, K, w, n, step, ahead, bias, ym, ydt, ldy);
    }
  }
}

// Rows [n0, n1) of W: blocks of R rows a 1/R of the range apart, rows
// n0 + i + r * q for q = (n1 - n0) / R, so that W is read as R streams, each
// front to back and prefetching its own lines a row (at least kRowAhead
// bytes) on (common/prefetch.h: several streams draw more from memory than
// one); then the rows left over singly.
template <class Blocks, int R>
void rows_r(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* bias,
            int64_t n0, int64_t n1, void* y, DType ydt, int64_t ldy) {
  const int64_t q = (n1 - n0) / R;
  const int64_t ahead = std::max<int64_t>(kRowAhead, K * 2);
  for (int64_t i = 0; i < q; ++i) {
    rows_block<Blocks, R, true>(x, M, K, w, n0 + i, q, ahead, bias, y, ydt, ldy);
  }
  for (int64_t n = n0 + R * q; n < n1; ++n) {
    rows_block<Blocks, 1, false>(x, M, K, w, n, 1, 0, bias, y, ydt, ldy);
  }
}
// R = Blocks::kRows, or kRowsM1 at M = 1 (AVX2: four streams rather than
// two, 1.19-1.21x on the 77 MB head from DRAM, 1 and 2 threads, alternated;
// four rows of one accumulator each fit its 16 registers).
template <class Blocks>
void rows(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* bias,
          int64_t n0, int64_t n1, void* y, DType ydt, int64_t ldy) {
  if (M == 1) {
    rows_r<Blocks, Blocks::kRowsM1>(x, M, K, w, bias, n0, n1, y, ydt, ldy);
  } else {
    rows_r<Blocks, Blocks::kRows>(x, M, K, w, bias, n0, n1, y, ydt, ldy);
  }
}

bool avx2_usable() { return __builtin_cpu_supports("f16c"); }

}  // namespace

void gemv_f16w_rows(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* bias,
                    int64_t n0, int64_t n1, void* y, DType ydt, int64_t ldy, Isa isa) {
  switch (isa) {
    case Isa::AVX512: rows<Avx512Blocks>(x, M, K, w, bias, n0, n1, y, ydt, ldy); return;
    case Isa::AVX2:
      if (avx2_usable()) {
        rows<Avx2Blocks>(x, M, K, w, bias, n0, n1, y, ydt, ldy);
        return;
      }
      break;
    default: break;
  }
  rows_scalar(x, M, K, w, bias, n0, n1, y, ydt, ldy);
}

namespace {
// The tiles' fill (common/tiles.h): rows [n, n + rows) of W widened.
void widen_scalar(const uint16_t* w, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = to_f32(F16{w[i]});
}
// The rows are prefetched ahead (a StreamPrefetcher: a panel's fill reads
// rows in k-chunks, not a row block at a time as the GEMV does).
struct WidenRows {
  void (*widen_fn)(const uint16_t*, int64_t, float*);
  const uint16_t* w;
  int64_t K;
  StreamPrefetcher pf;
  WidenRows(void (*fn)(const uint16_t*, int64_t, float*), const uint16_t* w_, int64_t K_,
            int64_t n0, int64_t n1)
      : widen_fn(fn), w(w_), K(K_), pf(w_ + n0 * K_, w_ + n1 * K_, kPrefetchAhead) {}
  void operator()(int64_t n, int64_t rows, int64_t k0, int64_t k1, float* out) {
    if (k0 == 0) pf.before(w + (n + rows) * K);
    for (int64_t r = 0; r < rows; ++r) widen_fn(w + (n + r) * K + k0, k1 - k0, out + r * (k1 - k0));
  }
};
}  // namespace

bool gemm_f16w_tiles_vectorized(Isa isa, int64_t K) {
  if (isa == Isa::AVX512) return K % tiles::Avx512Tile::kLanes == 0;
  if (isa == Isa::AVX2) return avx2_usable() && K % tiles::Avx2Tile::kLanes == 0;
  return false;
}

void gemm_f16w_tiles(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* bias,
                     int64_t n0, int64_t n1, void* y, DType ydt, int64_t ldy, Isa isa) {
  const bool vec = gemm_f16w_tiles_vectorized(isa, K);
  if (vec && isa == Isa::AVX512) {
    tiles::gemm(tiles::Avx512Tile{}, WidenRows(widen_avx512, w, K, n0, n1), x, M, K, bias, n0, n1,
                y, ydt, ldy);
  } else if (vec && isa == Isa::AVX2) {
    tiles::gemm(tiles::Avx2Tile{}, WidenRows(widen_avx2, w, K, n0, n1), x, M, K, bias, n0, n1, y,
                ydt, ldy);
  } else {
    tiles::gemm(tiles::ScalarTile{}, WidenRows(widen_scalar, w, K, n0, n1), x, M, K, bias, n0, n1,
                y, ydt, ldy);
  }
}

namespace {
// A conversion of count elements, in -> out, on the ISA asked for: AVX2 only
// with F16C (avx2_usable), else the scalar version.
template <typename In, typename Out>
void convert_by_isa(Isa isa, const In* in, int64_t count, Out* out,
                    void (*avx512)(const In*, int64_t, Out*), void (*avx2)(const In*, int64_t, Out*),
                    void (*scalar)(const In*, int64_t, Out*)) {
  if (isa == Isa::AVX512) {
    avx512(in, count, out);
  } else if (isa == Isa::AVX2 && avx2_usable()) {
    avx2(in, count, out);
  } else {
    scalar(in, count, out);
  }
}

void narrow_bf16_scalar(const float* in, int64_t count, Bf16* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = from_f32<Bf16>(in[i]);
}
PN_AVX512 void narrow_bf16_avx512(const float* in, int64_t count, Bf16* out) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) store16(out + i, _mm512_loadu_ps(in + i), 0xFFFF);
  if (i < count) {
    const __mmask16 mk = static_cast<__mmask16>((1u << (count - i)) - 1);
    store16(out + i, _mm512_maskz_loadu_ps(mk, in + i), mk);
  }
}
PN_AVX2 void narrow_bf16_avx2(const float* in, int64_t count, Bf16* out) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) store8(out + i, _mm256_loadu_ps(in + i));
  narrow_bf16_scalar(in + i, count - i, out + i);
}
}  // namespace

void narrow_bf16(const float* in, int64_t count, uint16_t* out, Isa isa) {
  convert_by_isa(isa, in, count, reinterpret_cast<Bf16*>(out), narrow_bf16_avx512, narrow_bf16_avx2,
                 narrow_bf16_scalar);
}

void widen_f16(const uint16_t* w, int64_t count, float* out, Isa isa) {
  convert_by_isa(isa, w, count, out, widen_avx512, widen_avx2, widen_scalar);
}

}  // namespace cpu
}  // namespace pythia_native
