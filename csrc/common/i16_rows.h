// The order in which both int16 GEMVs (cpu/gemv_i16.cpp with AVX-512 VNNI,
// cpu/gemv_i16_avx2.cpp with AVX2) take rows [n0, n1) of W, and where their
// sums go (torch-free).
//
// At M = 1: blocks of R rows side by side, the rows of a block (n1 - n0) / R
// apart, so that W is read as R separate streams, each front to back and
// prefetching at least kRowAhead bytes (or a row) ahead (common/prefetch.h);
// the rows the blocks leave over go one at a time. Above M = 1: one row of W
// at a time against the rows of x in groups of up to 4 (a group shares the
// row's lookups; the row stays in L1 from one group to the next, so W comes
// from memory once for any M), prefetching kPrefetchAhead bytes ahead.
//
// row(mt, r, m0, n, step, ahead, sums), mt and r std::integral_constant<int>:
// sums[i * mt + m] = the float32 total of row n + i * step of W (i < r)
// against row m0 + m of x (m < mt). Each kernel passes a lambda carrying its
// own target attribute, which inlines its row kernel; this loop calls it once
// per block of rows (no vector arguments cross the call).
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/elements.h"
#include "common/prefetch.h"

namespace pythia_native {
namespace cpu {

template <int R, typename Row>
inline void i16_rows(int64_t M, int64_t n0, int64_t n1, int64_t wrow, const float* bias, void* y,
                     DType ydt, int64_t ldy, const Row& row) {
  using std::integral_constant;
  int64_t n = n0;
  if (M == 1) {
    const int64_t q = (n1 - n0) / R;
    const int64_t ahead = std::max<int64_t>(kRowAhead, wrow);
    float sums[R];
    for (int64_t i = 0; i < q; ++i) {
      row(integral_constant<int, 1>(), integral_constant<int, R>(), 0, n0 + i, q, ahead, sums);
      for (int r = 0; r < R; ++r) {
        const int64_t nr = n0 + i + r * q;
        store_out(y, ydt, nr, sums[r] + (bias ? bias[nr] : 0.0f));
      }
    }
    n = n0 + R * q;
  }
  const integral_constant<int, 1> one;
  for (; n < n1; ++n) {
    const float b = bias ? bias[n] : 0.0f;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      float sums[4];
      const int mt = static_cast<int>(std::min<int64_t>(4, M - m0));
      switch (mt) {
        case 4: row(integral_constant<int, 4>(), one, m0, n, 0, kPrefetchAhead, sums); break;
        case 3: row(integral_constant<int, 3>(), one, m0, n, 0, kPrefetchAhead, sums); break;
        case 2: row(integral_constant<int, 2>(), one, m0, n, 0, kPrefetchAhead, sums); break;
        default: row(one, one, m0, n, 0, kPrefetchAhead, sums); break;
      }
      for (int m = 0; m < mt; ++m) store_out(y, ydt, (m0 + m) * ldy + n, sums[m] + b);
    }
  }
}

}  // namespace cpu
}  // namespace pythia_native
