// Not part of the package: the instruction mix of the float32 AVX2 GEMV's
// code lookup as it was before 2abc4aa ("shipped" below: unpack16_avx2 +
// lookup8 + FMA) against a vpshufb decode, timed in loops with no memory
// traffic, and a check that both produce exact float32 codes. 2abc4aa built
// the vpshufb decode and the vpermps one in its order ("perm32") into
// csrc/cpu/gemm_4bit.cpp (unpack32_avx2), vpshufb on AMD CPUs. Built with the native tests
// (`cmake --build build-native --target avx2_decode`), not run by ctest:
//   build-native/avx2_decode
//
// Why: on an AVX2-only AMD EPYC (family 25 model 1, 2026-12-08) the float32
// AVX2 GEMV took 19.5-27 ns per 128 weights, and its decode + FMA mix alone
// 18.4-18.6 ns here: the mix binds, not memory (vpermps ~1.25 cycles each on
// that CPU, two per 8 weights). The vpshufb decode looks a nibble up in four
// byte planes of the 16 float32 codes (four 16-byte tables) and interleaves
// the planes into floats (vpunpck{l,h}bw, then {l,h}wd): per 32 weights
// about 4 index ops, 4 lookups, 8 interleaves and 4 FMAs, all on shuffle or
// ALU pipes that this CPU has two of. Measured there: 10.1-10.2 ns per 128
// weights, 1.8x faster. On Intel cores (one shuffle port, p5) its 12 shuffles
// per 32 weights should lose to the 8 vpermps; not measured (no such host).
//
// Its weight order within a 32-weight chunk (16 bytes) is: vector q (0-3),
// lane r (0-7) holds element 2 * (4q + r % 4) + (r >= 4), byte 4q + r % 4's
// high nibble for r < 4, its low nibble for r >= 4. A vpermps decode can
// produce the same order (vpbroadcastd of dword q, then per-lane shifts
// 4, 12, 20, 28, 0, 8, 16, 24): "perm32" below. So a kernel could pick
// either decode per CPU vendor and still sum in one order, with the same
// bits; this program checks that the two decodes agree bit for bit.
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "common/codebook.h"

namespace {

using pythia_native::QuantType;
using pythia_native::code_table;

constexpr long long kIters = 20000000;

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

#define PN_AVX2 __attribute__((target("avx2,fma")))

struct Planes {
  __m256i t[4];  // byte j of each code, the 16-byte table in both 128-bit lanes
};

PN_AVX2 Planes planes(const float* code) {
  alignas(16) uint8_t pl[4][16];
  for (int i = 0; i < 16; ++i) {
    uint32_t u;
    std::memcpy(&u, &code[i], 4);
    for (int j = 0; j < 4; ++j) pl[j][i] = static_cast<uint8_t>(u >> (8 * j));
  }
  Planes p;
  for (int j = 0; j < 4; ++j) p.t[j] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(pl[j])));
  return p;
}

// 16 bytes (32 weights) -> f[0..3] in the order above, by vpshufb.
PN_AVX2 inline void shuf32(const uint8_t* p, const Planes& t, __m256* f) {
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  // Lane 0: high nibbles (even elements); lane 1: low nibbles (odd elements).
  const __m256i idx = _mm256_blend_epi32(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), _mm256_and_si256(v, m4), 0xF0);
  const __m256i b0 = _mm256_shuffle_epi8(t.t[0], idx), b1 = _mm256_shuffle_epi8(t.t[1], idx);
  const __m256i b2 = _mm256_shuffle_epi8(t.t[2], idx), b3 = _mm256_shuffle_epi8(t.t[3], idx);
  const __m256i u0 = _mm256_unpacklo_epi8(b0, b1), u1 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i u2 = _mm256_unpacklo_epi8(b2, b3), u3 = _mm256_unpackhi_epi8(b2, b3);
  // f[q]: bytes 4q..4q+3 of the chunk, their high nibbles' codes in the low
  // 128-bit lane (r 0-3), their low nibbles' in the high one (r 4-7).
  const __m256i w0 = _mm256_unpacklo_epi16(u0, u2), w1 = _mm256_unpackhi_epi16(u0, u2);
  const __m256i w2 = _mm256_unpacklo_epi16(u1, u3), w3 = _mm256_unpackhi_epi16(u1, u3);
  f[0] = _mm256_castsi256_ps(w0);
  f[1] = _mm256_castsi256_ps(w1);
  f[2] = _mm256_castsi256_ps(w2);
  f[3] = _mm256_castsi256_ps(w3);
}

PN_AVX2 inline __m256 lookup8(__m256i idx, __m256 tlo, __m256 thi) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, idx), _mm256_permutevar8x32_ps(thi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// The same order by vpermps: dword q broadcast, a nibble shifted down per lane.
PN_AVX2 inline void perm32(const uint8_t* p, __m256 tlo, __m256 thi, __m256* f) {
  const __m256i sh = _mm256_set_epi32(24, 16, 8, 0, 28, 20, 12, 4);
  for (int q = 0; q < 4; ++q) {
    int32_t d;
    std::memcpy(&d, p + 4 * q, 4);
    f[q] = lookup8(_mm256_srlv_epi32(_mm256_set1_epi32(d), sh), tlo, thi);
  }
}

// The shipped decode (unpack16_avx2): 8 bytes -> two vectors of 8 codes.
PN_AVX2 inline void shipped16(const uint8_t* p, __m256 tlo, __m256 thi, __m256* ca, __m256* cb) {
  int64_t word;
  std::memcpy(&word, p, 8);
  const __m256i bytes = _mm256_set1_epi64x(word);
  *ca = lookup8(_mm256_srlv_epi32(bytes, _mm256_set_epi32(28, 28, 20, 20, 12, 12, 4, 4)), tlo, thi);
  *cb = lookup8(_mm256_srlv_epi32(bytes, _mm256_set_epi32(24, 24, 16, 16, 8, 8, 0, 0)), tlo, thi);
}

// Each timed loop decodes a 64-byte window that moves by one byte per
// iteration (L1-resident: the mix, not memory) and FMAs the codes into four
// accumulators; ns per 128 weights.
PN_AVX2 double time_shipped(const uint8_t* buf, const float* code, float* out) {
  const __m256 tlo = _mm256_loadu_ps(code), thi = _mm256_loadu_ps(code + 8), x = _mm256_set1_ps(0.5f);
  __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  const double t0 = now();
  for (long long n = 0; n < kIters; ++n) {
    const uint8_t* p = buf + (n & 63);
    for (int c = 0; c < 4; ++c) {  // 4 chunks of 16 weights = 64
      __m256 ca, cb;
      shipped16(p + 8 * c, tlo, thi, &ca, &cb);
      a[(2 * c) & 3] = _mm256_fmadd_ps(ca, x, a[(2 * c) & 3]);
      a[(2 * c + 1) & 3] = _mm256_fmadd_ps(cb, x, a[(2 * c + 1) & 3]);
    }
  }
  const double t = (now() - t0) / kIters * 2e9;
  *out = _mm256_cvtss_f32(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
  return t;
}

template <bool SHUF>
PN_AVX2 double time_32(const uint8_t* buf, const float* code, float* out) {
  const Planes t = planes(code);
  const __m256 tlo = _mm256_loadu_ps(code), thi = _mm256_loadu_ps(code + 8), x = _mm256_set1_ps(0.5f);
  __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  const double t0 = now();
  for (long long n = 0; n < kIters; ++n) {
    const uint8_t* p = buf + (n & 63);
    for (int c = 0; c < 2; ++c) {  // 2 chunks of 32 weights = 64
      __m256 f[4];
      if (SHUF) {
        shuf32(p + 16 * c, t, f);
      } else {
        perm32(p + 16 * c, tlo, thi, f);
      }
      for (int q = 0; q < 4; ++q) a[q] = _mm256_fmadd_ps(f[q], x, a[q]);
    }
  }
  const double t1 = (now() - t0) / kIters * 2e9;
  *out = _mm256_cvtss_f32(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
  return t1;
}

// Both 32-weight decodes against the definition, every byte value in every
// position, NF4 and FP4: the exact code of element 2 * (4q + r % 4) + (r >= 4).
PN_AVX2 int check(const float* code) {
  const Planes t = planes(code);
  const __m256 tlo = _mm256_loadu_ps(code), thi = _mm256_loadu_ps(code + 8);
  int bad = 0;
  for (int s = 0; s < 256; ++s) {
    uint8_t bytes[16];
    for (int i = 0; i < 16; ++i) bytes[i] = static_cast<uint8_t>(s * 7 + i * 37 + (i * i) * 11);
    __m256 fs[4], fp[4];
    shuf32(bytes, t, fs);
    perm32(bytes, tlo, thi, fp);
    for (int q = 0; q < 4; ++q) {
      alignas(32) float vs[8], vp[8];
      _mm256_store_ps(vs, fs[q]);
      _mm256_store_ps(vp, fp[q]);
      for (int r = 0; r < 8; ++r) {
        const int k = 4 * q + r % 4;
        const int nib = r >= 4 ? (bytes[k] & 15) : (bytes[k] >> 4);
        bad += std::memcmp(&vs[r], &code[nib], 4) != 0;
        bad += std::memcmp(&vp[r], &code[nib], 4) != 0;
      }
    }
  }
  return bad;
}

}  // namespace

int main() {
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    std::printf("this CPU has no AVX2 + FMA\n");
    return 0;
  }
  int bad = 0;
  for (QuantType qt : {QuantType::NF4, QuantType::FP4}) bad += check(code_table(qt));
  std::printf("decodes checked against the code tables: %s\n", bad ? "MISMATCH" : "exact");
  alignas(64) uint8_t buf[128];
  for (int i = 0; i < 128; ++i) buf[i] = static_cast<uint8_t>(i * 73 + 5);
  const float* code = code_table(QuantType::NF4);
  float sink = 0.0f, s;
  for (int round = 0; round < 3; ++round) {
    const double a = time_shipped(buf, code, &s);
    sink += s;
    const double b = time_32<true>(buf, code, &s);
    sink += s;
    const double c = time_32<false>(buf, code, &s);
    sink += s;
    std::printf("ns per 128 weights: shipped (vpermps) %.2f  vpshufb %.2f  vpermps in vpshufb's order %.2f\n", a, b,
                c);
  }
  return bad != 0 || sink == 12345.0f;
}
