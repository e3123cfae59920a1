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
// two FMA ports allow ~190). k runs in chunks (kChunk) so that the buffer
// stays in L1: measured 1.2-1.6x on the layers with K >= 2048 at M = 8-32.
// Padding the row stride (rows 12 KB apart share L1 sets) was tried and
// measured no faster.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <new>

#include "elements.h"
#include "kernels.h"
#include "simd_x86.h"

namespace pythia_native {
namespace cpu {
namespace tiles {

constexpr int64_t kRows = kTileRows;  // rows of W per buffer fill (kernels.h)
// Values of k per fill: the buffer (kRows x kChunk floats, 16 KiB) stays in
// L1 while the tiles of x pass over it. Whole rows did not: at K = 3072 the 4
// rows are 48 KiB, and the M = 8 tiles of pythia-160m's 4h->h layer ran at
// ~55% of the speed of its h->4h layer (K = 768, the same weight count).
// A multiple of every ISA's chunk (32 values).
constexpr int64_t kChunk = 1024;

// A 64-byte aligned float buffer owned by one thread's call: the converted
// rows (kRows x min(K, kChunk); when fewer than kRows rows of W are left, the
// rest is zeroed, no stale NaNs or denormals through the FMAs, and their sums
// are dropped, which keeps one tile shape), or the tiles' unreduced sums
// between chunks.
struct Buffer {
  float* p;
  explicit Buffer(int64_t count)
      : p(static_cast<float*>(std::aligned_alloc(64, (count * 4 + 63) / 64 * 64))) {
    if (p == nullptr) throw std::bad_alloc();
  }
  ~Buffer() { std::free(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

// M >= 1 rows of x split into the fewest tiles of at most max_mr rows, as
// even as possible (M = 8 with 6-row tiles: 4 + 4, not 6 + 2). Tile t holds
// rows [begin(t), begin(t) + size(t)).
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

// The driver every ISA shares: for each group of kRows rows of W in [n0, n1)
// and each chunk of k, fill the buffer, then run Tile over the rows of x
// split into tiles; the tiles' unreduced sums wait in `acc` between chunks.
// fill(n, rows, k0, k1, out) writes rows [n, n + rows) x columns [k0, k1) of
// W as float32 into out (row stride k1 - k0), prefetching the rows ahead of
// it as the GEMVs do (W comes from DRAM in a decode step; without it the
// hardware prefetchers stop at every 4 KiB page). Tile is an ISA's register
// tile (below), whose K requirement the caller meets. The driver itself holds
// no vector code, so it needs no target attribute; the tiles and fills carry
// theirs.
template <class Tile, class Fill>
void gemm(const Tile& tile, Fill fill, const float* x, int64_t M, int64_t K, const float* bias,
          int64_t n0, int64_t n1, void* y, DType ydt, int64_t ldy) {
  const int64_t kc = std::min(K, kChunk);
  Buffer buf(kRows * kc);
  Buffer acc(K > kc ? kRows * M * Tile::kLanes : 1);
  float sums[kRows * Tile::kMaxMr];
  const MSplit split(M, Tile::kMaxMr);
  for (int64_t n = n0; n < n1; n += kRows) {
    const int64_t rows = std::min(kRows, n1 - n);
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      const int64_t k1 = std::min(K, k0 + kc), klen = k1 - k0;
      fill(n, rows, k0, k1, buf.p);
      if (rows < kRows) std::fill(buf.p + rows * klen, buf.p + kRows * klen, 0.0f);
      for (int64_t t = 0; t < split.count; ++t) {
        const int64_t m0 = split.begin(t), mr = split.size(t);
        tile(mr, buf.p, klen, x + m0 * K + k0, K, acc.p + kRows * m0 * Tile::kLanes, k0 == 0,
             k1 == K, sums);
        if (k1 == K) store(sums, rows, mr, m0, n, bias, y, ydt, ldy);
      }
    }
  }
}

// A tile's contract: over k < klen, acc(r, m) += w[r * klen + k] * x[m * ldx + k]
// for the kRows rows of w and mr rows of x. first: acc starts at zero, else
// from accmem (kLanes floats per (r, m)); last: sums[r * mr + m] = the
// reduced acc, else acc goes back to accmem.

// ----------------------------------------------------------------- scalar ---

// One row of x at a time, in order: the readable definition. Any K. (Never
// faster than BLAS: the entry points use it only when the scalar ISA is
// forced, as the reference of the vector tiles.)
struct ScalarTile {
  static constexpr int64_t kMaxMr = 1;
  static constexpr int64_t kLanes = 1;
  void operator()(int64_t, const float* w, int64_t klen, const float* x, int64_t,
                  float* accmem, bool first, bool last, float* sums) const {
    for (int64_t r = 0; r < kRows; ++r) {
      float a = first ? 0.0f : accmem[r];
      for (int64_t k = 0; k < klen; ++k) a += w[r * klen + k] * x[k];
      if (last) {
        sums[r] = a;
      } else {
        accmem[r] = a;
      }
    }
  }
};

// ---------------------------------------------------------------- AVX-512 ---

#define PN_TILES_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

// The tile contract above with 16 lanes per accumulator; klen % 16 == 0. The
// 4 x MR accumulators (24 for MR = 6), the 4 rows of w and one row of x fill
// 29 of the 32 zmm registers; per 16 values of k, 4 + MR loads feed 4 * MR
// FMAs, so the FMA ports set the pace while the operands come from L1 or L2.
template <int MR, bool FIRST, bool LAST>
PN_TILES_AVX512 inline void tile_avx512(const float* w, int64_t klen, const float* x, int64_t ldx,
                                        float* accmem, float* sums) {
  __m512 acc[kRows][MR];
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < MR; ++m)
      acc[r][m] = FIRST ? _mm512_setzero_ps() : _mm512_load_ps(accmem + 16 * (r * MR + m));
  for (int64_t k = 0; k < klen; k += 16) {
    __m512 wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = _mm512_loadu_ps(w + r * klen + k);
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      for (int r = 0; r < kRows; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int m = 0; m < MR; ++m) {
      if (LAST) {
        sums[r * MR + m] = _mm512_reduce_add_ps(acc[r][m]);
      } else {
        _mm512_store_ps(accmem + 16 * (r * MR + m), acc[r][m]);
      }
    }
  }
}

template <bool FIRST, bool LAST>
PN_TILES_AVX512 void tile_avx512_mr(int64_t mr, const float* w, int64_t klen, const float* x,
                                    int64_t ldx, float* accmem, float* sums) {
  switch (mr) {
    case 6: tile_avx512<6, FIRST, LAST>(w, klen, x, ldx, accmem, sums); break;
    case 5: tile_avx512<5, FIRST, LAST>(w, klen, x, ldx, accmem, sums); break;
    case 4: tile_avx512<4, FIRST, LAST>(w, klen, x, ldx, accmem, sums); break;
    case 3: tile_avx512<3, FIRST, LAST>(w, klen, x, ldx, accmem, sums); break;
    case 2: tile_avx512<2, FIRST, LAST>(w, klen, x, ldx, accmem, sums); break;
    default: tile_avx512<1, FIRST, LAST>(w, klen, x, ldx, accmem, sums); break;
  }
}

struct Avx512Tile {
  static constexpr int64_t kMaxMr = 6;
  static constexpr int64_t kLanes = 16;
  void operator()(int64_t mr, const float* w, int64_t klen, const float* x, int64_t ldx,
                  float* accmem, bool first, bool last, float* sums) const {
    if (first && last) {
      tile_avx512_mr<true, true>(mr, w, klen, x, ldx, accmem, sums);
    } else if (first) {
      tile_avx512_mr<true, false>(mr, w, klen, x, ldx, accmem, sums);
    } else if (last) {
      tile_avx512_mr<false, true>(mr, w, klen, x, ldx, accmem, sums);
    } else {
      tile_avx512_mr<false, false>(mr, w, klen, x, ldx, accmem, sums);
    }
  }
};

// ------------------------------------------------------------------- AVX2 ---

#define PN_TILES_AVX2 __attribute__((target("avx2,fma")))

// As tile_avx512 with 8 lanes (klen % 8 == 0): 4 x MR accumulators, the 4
// rows of w and one row of x fit the 16 ymm registers for MR <= 2.
template <int MR, bool FIRST, bool LAST>
PN_TILES_AVX2 inline void tile_avx2(const float* w, int64_t klen, const float* x, int64_t ldx,
                                    float* accmem, float* sums) {
  __m256 acc[kRows][MR];
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < MR; ++m)
      acc[r][m] = FIRST ? _mm256_setzero_ps() : _mm256_load_ps(accmem + 8 * (r * MR + m));
  for (int64_t k = 0; k < klen; k += 8) {
    __m256 wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = _mm256_loadu_ps(w + r * klen + k);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
      for (int r = 0; r < kRows; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int m = 0; m < MR; ++m) {
      if (LAST) {
        sums[r * MR + m] = hsum8(acc[r][m]);
      } else {
        _mm256_store_ps(accmem + 8 * (r * MR + m), acc[r][m]);
      }
    }
  }
}

template <bool FIRST, bool LAST>
PN_TILES_AVX2 void tile_avx2_mr(int64_t mr, const float* w, int64_t klen, const float* x,
                                int64_t ldx, float* accmem, float* sums) {
  if (mr == 2) {
    tile_avx2<2, FIRST, LAST>(w, klen, x, ldx, accmem, sums);
  } else {
    tile_avx2<1, FIRST, LAST>(w, klen, x, ldx, accmem, sums);
  }
}

struct Avx2Tile {
  static constexpr int64_t kMaxMr = 2;
  static constexpr int64_t kLanes = 8;
  void operator()(int64_t mr, const float* w, int64_t klen, const float* x, int64_t ldx,
                  float* accmem, bool first, bool last, float* sums) const {
    if (first && last) {
      tile_avx2_mr<true, true>(mr, w, klen, x, ldx, accmem, sums);
    } else if (first) {
      tile_avx2_mr<true, false>(mr, w, klen, x, ldx, accmem, sums);
    } else if (last) {
      tile_avx2_mr<false, true>(mr, w, klen, x, ldx, accmem, sums);
    } else {
      tile_avx2_mr<false, false>(mr, w, klen, x, ldx, accmem, sums);
    }
  }
};

#undef PN_TILES_AVX512
#undef PN_TILES_AVX2

}  // namespace tiles
}  // namespace cpu
}  // namespace pythia_native
