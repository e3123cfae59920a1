// The small-M GEMM core shared by gemm_4bit and gemm_f16w (torch-free, x86):
// y[m, n] = sum_k x[m, k] * W[n, k] + bias[n] for a few dozen rows of x.
//
// Rows of W are widened to float32 kRows at a time into a buffer that stays
// in L1/L2 (by the caller's `fill`: the 4-bit dequantization, or float16 ->
// float32), then multiplied by register tiles of up to 6 rows of x. Each
// weight is converted once for all M, and each load of x feeds kRows FMAs.
//
// Why this sits between the GEMVs and BLAS: the GEMVs convert a row of W
// again for every 4 rows of x, and BLAS (the panel path of ops.cpp) is tuned
// for large M. At M = 16 on one core of the Xeon measured (2-vCPU VM, AVX-512)
// the 4-bit GEMV ran at ~65 GFLOP/s and BLAS at ~50, these tiles at ~100 (the
// two FMA ports allow ~190). K-slicing (to keep a slice of the buffer in L1
// across the tiles of x) and padding the row stride (rows 12 KB apart share
// L1 sets) were both tried and measured no faster.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <new>

#include "elements.h"
#include "simd_x86.h"

namespace pythia_native {
namespace cpu {
namespace tiles {

constexpr int64_t kRows = 4;  // rows of W per buffer fill

// The converted rows, kRows x K floats, 64-byte aligned. When fewer than kRows
// rows of W are left, the rest is zeroed (no stale NaNs or denormals through
// the FMAs) and their sums are dropped, which keeps one tile shape.
struct Buffer {
  float* p;
  explicit Buffer(int64_t K)
      : p(static_cast<float*>(std::aligned_alloc(64, (kRows * K * 4 + 63) / 64 * 64))) {
    if (p == nullptr) throw std::bad_alloc();
  }
  ~Buffer() { std::free(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

// M rows of x split into the fewest tiles of at most max_mr rows, as even as
// possible (M = 8 with 6-row tiles: 4 + 4, not 6 + 2). Tile t holds rows
// [begin(t), begin(t) + size(t)). (A struct rather than a callback: a lambda
// would not inherit the kernels' target attributes.)
struct MSplit {
  int64_t count, base, extra;
  MSplit(int64_t M, int64_t max_mr)
      : count((M + max_mr - 1) / max_mr), base(M / count), extra(M % count) {}
  int64_t begin(int64_t t) const { return t * base + std::min(t, extra); }
  int64_t size(int64_t t) const { return base + (t < extra ? 1 : 0); }
};

// y[m0 + m, n + r] = sums[r * mr + m] + bias[n + r] for the rows r < rows.
inline void store(const float* sums, int64_t rows, int64_t mr, int64_t m0, int64_t n,
                  const float* bias, void* y, DType ydt, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r) {
    const float b = bias ? bias[n + r] : 0.0f;
    for (int64_t m = 0; m < mr; ++m) {
      store_out(y, ydt, (m0 + m) * ldy + n + r, sums[r * mr + m] + b);
    }
  }
}

// The driver every ISA shares: for each group of kRows rows of W in [n0, n1),
// fill the buffer, then run Tile over the rows of x split into tiles.
// fill(n, rows, out) writes rows [n, n + rows) of W as float32 into out (row
// stride K), prefetching the rows ahead of it as the GEMVs do (W comes from
// DRAM in a decode step; without it the hardware prefetchers stop at every
// 4 KiB page); tile(mr, w, x, K, sums) is an ISA's register tile (below),
// whose K requirement the caller meets. The driver itself holds no vector
// code, so it needs no target attribute; the tiles and fills carry theirs.
template <class Tile, class Fill>
void gemm(const Tile& tile, Fill fill, const float* x, int64_t M, int64_t K,
          const float* bias, int64_t n0, int64_t n1, void* y, DType ydt, int64_t ldy) {
  Buffer buf(K);
  float sums[kRows * Tile::kMaxMr];
  const MSplit split(M, Tile::kMaxMr);
  for (int64_t n = n0; n < n1; n += kRows) {
    const int64_t rows = std::min(kRows, n1 - n);
    fill(n, rows, buf.p);
    if (rows < kRows) std::fill(buf.p + rows * K, buf.p + kRows * K, 0.0f);
    for (int64_t t = 0; t < split.count; ++t) {
      const int64_t m0 = split.begin(t), mr = split.size(t);
      tile(mr, buf.p, x + m0 * K, K, sums);
      store(sums, rows, mr, m0, n, bias, y, ydt, ldy);
    }
  }
}

// ----------------------------------------------------------------- scalar ---

// sums[r] = dot(w row r, x row 0), in order: the readable definition. Any K.
// (Never faster than BLAS: the entry points use it only when the scalar ISA
// is forced, as the reference of the vector tiles.)
struct ScalarTile {
  static constexpr int64_t kMaxMr = 1;
  void operator()(int64_t, const float* w, const float* x, int64_t K, float* sums) const {
    for (int64_t r = 0; r < kRows; ++r) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += w[r * K + k] * x[k];
      sums[r] = acc;
    }
  }
};

// ---------------------------------------------------------------- AVX-512 ---

#define PN_TILES_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

// sums[r * MR + m] = dot(w[r * K : + K], x[m * K : + K]) for the kRows rows of
// w and MR rows of x; K % 16 == 0. The 4 x MR accumulators (24 for MR = 6),
// the 4 rows of w and one row of x fill 29 of the 32 zmm registers; per 16
// values of k, 4 + MR loads feed 4 * MR FMAs, so the FMA ports set the pace
// while the operands come from L1 or L2.
template <int MR>
PN_TILES_AVX512 inline void tile_avx512(const float* w, const float* x, int64_t K, float* sums) {
  __m512 acc[kRows][MR];
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = _mm512_loadu_ps(w + r * K + k);
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int r = 0; r < kRows; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < MR; ++m) sums[r * MR + m] = _mm512_reduce_add_ps(acc[r][m]);
}

struct Avx512Tile {
  static constexpr int64_t kMaxMr = 6;
  PN_TILES_AVX512 void operator()(int64_t mr, const float* w, const float* x, int64_t K,
                                  float* sums) const {
    switch (mr) {
      case 6: tile_avx512<6>(w, x, K, sums); break;
      case 5: tile_avx512<5>(w, x, K, sums); break;
      case 4: tile_avx512<4>(w, x, K, sums); break;
      case 3: tile_avx512<3>(w, x, K, sums); break;
      case 2: tile_avx512<2>(w, x, K, sums); break;
      default: tile_avx512<1>(w, x, K, sums); break;
    }
  }
};

// ------------------------------------------------------------------- AVX2 ---

#define PN_TILES_AVX2 __attribute__((target("avx2,fma")))

// As tile_avx512, 8 values of k per register (K % 8 == 0): 4 x MR
// accumulators, the 4 rows of w and one row of x fit the 16 ymm registers for
// MR <= 2.
template <int MR>
PN_TILES_AVX2 inline void tile_avx2(const float* w, const float* x, int64_t K, float* sums) {
  __m256 acc[kRows][MR];
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = _mm256_loadu_ps(w + r * K + k);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < kRows; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < MR; ++m) sums[r * MR + m] = hsum8(acc[r][m]);
}

struct Avx2Tile {
  static constexpr int64_t kMaxMr = 2;
  PN_TILES_AVX2 void operator()(int64_t mr, const float* w, const float* x, int64_t K,
                                float* sums) const {
    if (mr == 2) {
      tile_avx2<2>(w, x, K, sums);
    } else {
      tile_avx2<1>(w, x, K, sums);
    }
  }
};

#undef PN_TILES_AVX512
#undef PN_TILES_AVX2

}  // namespace tiles
}  // namespace cpu
}  // namespace pythia_native
