// Experiment, not part of the package: an AMX-INT8 M = 1 GEMV with the int16
// numerics of gemm_4bit's compute="int16", timed against the shipped AVX-512
// VNNI kernel (cpu/gemv_i16.cpp) on the same weights, alternated in one
// process. It was measured slower and so not shipped (2026-12-07, numbers in
// the header of csrc/cpu/gemv_i16.cpp); it is kept so that the measurement
// can be repeated on other AMX CPUs.
//
//   cmake -S . -B build-native && cmake --build build-native --target amx_gemv_i16
//   build-native/amx_gemv_i16 2048 8192      # N K (K % 128 == 0) [calls per round]
//
// The idea. tdpbssd multiplies a 16 x 64 int8 tile A by a 64 x 16 int8 tile B
// (C[16 x 16] += sums of 64 products in int32). A holds 16 rows of W's codes,
// 64 weights each in W's own byte order, so no transpose; B holds x. An
// int16 code cq = 256 ch + cl (cl in [-128, 127], ch in [-32, 32]) and x
// (|xq| <= 32639 here, so that its two signed bytes xh, xl fit, where the
// shipped kernel allows 32767) give cq xq = 65536 ch xh + 256 (ch xl + cl xh) +
// cl xl: B's columns route each product to one of three "classes" per
// 64-block, two pairs of 128-weight groups (12 columns) per C tile before it
// is stored and scaled in float32. Per 16 rows x 128 weights: four tiles of
// A (the high and low code bytes of the low and high nibbles, vpshufb
// lookups), four tdpbssd; two row tiles share each tile of B.
// Linux only: the process must ask for the AMX state (arch_prctl).
// gcc 12's AVX-512 headers trip -Wuninitialized (as in csrc/cpu/gemm_4bit.cpp).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <vector>

#include "common/kernels.h"

namespace {

using namespace pythia_native;

double now() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

constexpr int kXMax = 32639;  // xq = 256 xh + xl with both bytes signed

int i16_code(int c) { return cpu::i16_code(QuantType::NF4, c); }  // round(code * 8192)
int low_byte(int v) { return ((v + 128) & 255) - 128; }

// Tiles of B for one pair of 128-weight groups (p): [4][16 rows][64 bytes],
// tile t = (odd elements, code high byte), (odd, low), (even, high), (even,
// low). Row r, bytes 4 c + i: k' = 4 r + i of A's 64 bytes (packed byte j =
// k', element 2j + 1 for the odd tiles, 2j for the even) in column c.
void build_b(const int16_t* xq, int64_t K, int8_t* B) {
  const int64_t P = K / 128;
  std::memset(B, 0, P * 4 * 1024);
  for (int64_t p = 0; p < P; ++p) {
    for (int t = 0; t < 4; ++t) {
      int8_t* b = B + (p * 4 + t) * 1024;
      const int odd = t < 2, low_code = t & 1;
      for (int j = 0; j < 64; ++j) {
        const int x = xq[128 * p + 2 * j + odd];
        const int xl = low_byte(x), xh = (x - xl) / 256;
        // Columns 6 (p % 2) + 3 block + class, class 0: x 65536, 1: x 256, 2: x 1.
        const int base = 6 * static_cast<int>(p % 2) + 3 * (j / 32);
        int8_t* row = b + (j / 4) * 64 + j % 4;
        row[4 * (base + low_code)] = static_cast<int8_t>(xh);
        row[4 * (base + low_code + 1)] = static_cast<int8_t>(xl);
      }
    }
  }
}

// Per 256 weights (a C tile): lane L = 6 q + 3 b + class -> x's scale of block
// 2 q + b times the class's power of two.
void build_scales(const float* xs64, int64_t K, float* XS) {
  const int64_t spans = (K / 128 + 1) / 2;
  for (int64_t s = 0; s < spans; ++s) {
    for (int L = 0; L < 16; ++L) {
      float v = 0.0f;
      const int64_t blk = 4 * s + 2 * (L / 6) + (L % 6) / 3;
      if (L < 12 && blk < K / 64) v = xs64[blk] * std::ldexp(1.0f, 16 - 8 * (L % 3));
      XS[16 * s + L] = v;
    }
  }
}

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

#define PN_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,amx-tile,amx-int8")))

// One tile of B (tmm TB) against the same tile of A of both row tiles (tmm
// TA0, TA1) into C (tmm 0 and 1). gcc's tile intrinsics paste their register
// numbers into the assembly text, so they must be literals: a macro, not a
// template. The two (B, A) register sets alternate, so that a load need not
// wait for the tdpbssd reading the registers before it.
#define PN_TILE_STEP(TB, TA0, TA1, b, a0, a1) \
  do {                                        \
    _tile_loadd(TB, b, 64);                   \
    _tile_loadd(TA0, a0, 64);                 \
    _tile_loadd(TA1, a1, 64);                 \
    _tile_dpbssd(0, TA0, TB);                 \
    _tile_dpbssd(1, TA1, TB);                 \
  } while (0)

// y[n] for n in [0, N), blocksize 64, NF4, M = 1.
PN_AMX void gemv_amx(const int8_t* B, const float* XS, int64_t K, const uint8_t* W,
                     const float* absmax, int64_t N, float* y) {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = 16;
  _tile_loadconfig(&cfg);
  const int64_t P = K / 128, wrow = K / 2, arow = K / 64;
  alignas(64) static int8_t A[2][2][4][16][64];  // [buffer][row tile][tile][row][k']
  alignas(64) int32_t C[2][16][16];
  alignas(64) float acc[32][16];
  alignas(16) int8_t th[16], tl[16];
  for (int c = 0; c < 16; ++c) {
    tl[c] = static_cast<int8_t>(low_byte(i16_code(c)));
    th[c] = static_cast<int8_t>((i16_code(c) - tl[c]) / 256);
  }
  const __m512i tab_h = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<__m128i*>(th)));
  const __m512i tab_l = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<__m128i*>(tl)));
  const __m512i nib = _mm512_set1_epi8(0x0f);
  alignas(64) int32_t idx[16];
  for (int L = 0; L < 16; ++L) idx[L] = L < 12 ? 2 * (L / 6) + (L % 6) / 3 : 0;
  const __m512i aidx = _mm512_load_si512(idx);
  for (int64_t n0 = 0; n0 < N; n0 += 32) {
    const int rows = static_cast<int>(std::min<int64_t>(32, N - n0));
    std::memset(acc, 0, sizeof acc);
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t p = 0; p < P; ++p) {
      auto& a = A[p & 1];
      for (int r = 0; r < rows; ++r) {
        const uint8_t* w = W + (n0 + r) * wrow + 64 * p;
        _mm_prefetch(reinterpret_cast<const char*>(w) + 1024, _MM_HINT_T0);
        const __m512i l = _mm512_loadu_si512(w);
        const __m512i lo = _mm512_and_si512(l, nib);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(l, 4), nib);
        _mm512_store_si512(a[r >> 4][0][r & 15], _mm512_shuffle_epi8(tab_h, lo));
        _mm512_store_si512(a[r >> 4][1][r & 15], _mm512_shuffle_epi8(tab_l, lo));
        _mm512_store_si512(a[r >> 4][2][r & 15], _mm512_shuffle_epi8(tab_h, hi));
        _mm512_store_si512(a[r >> 4][3][r & 15], _mm512_shuffle_epi8(tab_l, hi));
      }
      const int8_t* b = B + p * 4 * 1024;
      PN_TILE_STEP(2, 4, 5, b, a[0][0], a[1][0]);
      PN_TILE_STEP(3, 6, 7, b + 1024, a[0][1], a[1][1]);
      PN_TILE_STEP(2, 4, 5, b + 2048, a[0][2], a[1][2]);
      PN_TILE_STEP(3, 6, 7, b + 3072, a[0][3], a[1][3]);
      if ((p & 1) || p + 1 == P) {  // a C tile holds 256 weights of each row
        _tile_stored(0, C[0], 64);
        _tile_stored(1, C[1], 64);
        _tile_zero(0);
        _tile_zero(1);
        const int64_t s = p / 2;
        const __m512 xsv = _mm512_loadu_ps(XS + 16 * s);
        const int blocks = static_cast<int>(std::min<int64_t>(4, arow - 4 * s));
        for (int r = 0; r < rows; ++r) {
          const __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(C[r >> 4][r & 15]));
          const __m128 am4 = _mm_maskz_loadu_ps(static_cast<__mmask8>((1 << blocks) - 1),
                                                absmax + (n0 + r) * arow + 4 * s);
          const __m512 am = _mm512_permutexvar_ps(aidx, _mm512_castps128_ps512(am4));
          _mm512_store_ps(acc[r], _mm512_fmadd_ps(v, _mm512_mul_ps(am, xsv),
                                                  _mm512_load_ps(acc[r])));
        }
      }
    }
    for (int r = 0; r < rows; ++r) y[n0 + r] = _mm512_reduce_add_ps(_mm512_load_ps(acc[r]));
  }
  _tile_release();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s N K [reps]\n", argv[0]);
    return 2;
  }
  const int64_t N = std::atol(argv[1]), K = std::atol(argv[2]);
  const long reps = argc > 3 ? std::atol(argv[3]) : 50;
  if (N < 1 || K < 128 || K % 128 != 0 || reps < 1) {
    std::fprintf(stderr, "need N >= 1, K a positive multiple of 128, reps >= 1\n");
    return 2;
  }
  if (!__builtin_cpu_supports("avx512bw") || syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                                     18 /* XTILEDATA */) != 0) {
    std::fprintf(stderr, "no AMX here (or the kernel refused its state)\n");
    return 1;
  }
  std::mt19937 gen(1);
  std::vector<uint8_t> W(N * K / 2);
  for (auto& b : W) b = static_cast<uint8_t>(gen());
  std::vector<float> absmax(N * K / 64), x(K);
  for (auto& a : absmax) a = 0.5f + (gen() % 1000) / 1000.0f;
  for (auto& v : x) v = (static_cast<int>(gen() % 2001) - 1000) / 1000.0f;

  // x as the AMX kernel takes it: per 64-block s = max|x| / kXMax.
  std::vector<int16_t> xq(K);
  std::vector<float> xs64(K / 64);
  for (int64_t b = 0; b < K / 64; ++b) {
    float am = 0.0f;
    for (int i = 0; i < 64; ++i) am = std::max(am, std::fabs(x[64 * b + i]));
    const float s = am / kXMax;
    xs64[b] = s / 8192.0f;
    for (int i = 0; i < 64; ++i) {
      xq[64 * b + i] = s > 0 ? static_cast<int16_t>(std::nearbyint(x[64 * b + i] / s)) : 0;
    }
  }
  std::vector<int8_t> B(K / 128 * 4096);
  std::vector<float> XS((K / 128 + 1) / 2 * 16), y(N);
  build_b(xq.data(), K, B.data());
  build_scales(xs64.data(), K, XS.data());
  gemv_amx(B.data(), XS.data(), K, W.data(), absmax.data(), N, y.data());

  // Exact reference of the same numerics: int64 sums per block, double after.
  double err = 0.0, ref_max = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    double tot = 0.0;
    for (int64_t b = 0; b < K / 64; ++b) {
      int64_t s = 0;
      for (int i = 0; i < 64; ++i) {
        const int64_t e = n * K + 64 * b + i;
        const int c = (e & 1) ? W[e / 2] & 15 : W[e / 2] >> 4;
        s += static_cast<int64_t>(i16_code(c)) * xq[64 * b + i];
      }
      tot += static_cast<double>(s) * absmax[n * (K / 64) + b] * xs64[b];
    }
    err = std::max(err, std::fabs(tot - y[n]));
    ref_max = std::max(ref_max, std::fabs(tot));
  }
  std::printf("AMX result: max |y - exact| / max |exact| = %.2g\n", err / ref_max);

  // The shipped kernel on the same weights and x.
  const cpu::I16Kernel kern = cpu::i16_kernel(cpu::Isa::AVX512);
  std::vector<int16_t> xq_ship(K);
  std::vector<float> xs_ship(K / 8 + 16), y_ship(N);
  if (!cpu::quantize_x_i16(kern, x.data(), DType::F32, 1, K, K, xq_ship.data(), xs_ship.data())) {
    return 1;
  }
  const auto shipped = [&] {
    cpu::gemv_4bit_i16_rows(kern, xq_ship.data(), xs_ship.data(), 1, K, W.data(), absmax.data(),
                            64, QuantType::NF4, nullptr, 0, N, y_ship.data(), DType::F32, N);
  };
  const auto amx = [&] { gemv_amx(B.data(), XS.data(), K, W.data(), absmax.data(), N, y.data()); };
  double best_amx = 1e30, best_ship = 1e30;
  for (int round = 0; round < 7; ++round) {
    double t = now();
    for (long r = 0; r < reps; ++r) amx();
    best_amx = std::min(best_amx, (now() - t) / reps);
    t = now();
    for (long r = 0; r < reps; ++r) shipped();
    best_ship = std::min(best_ship, (now() - t) / reps);
  }
  const double groups = static_cast<double>(N) * K / 128;
  std::printf("N=%ld K=%ld, one thread, best of 7 rounds of %ld calls:\n", static_cast<long>(N),
              static_cast<long>(K), reps);
  std::printf("  AMX prototype       %9.1f us  %.2f ns per 128 weights\n", best_amx * 1e6,
              best_amx / groups * 1e9);
  std::printf("  shipped %-11s %9.1f us  %.2f ns per 128 weights\n", cpu::i16_kernel_name(kern),
              best_ship * 1e6, best_ship / groups * 1e9);
  return 0;
}
