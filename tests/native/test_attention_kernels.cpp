// Native tests of the torch-free CPU attention kernels
// (csrc/common/attention_kernels.h, csrc/cpu/attention.cpp), run by ctest.
//
// Each kernel is checked against a naive double-precision reference, for every
// instruction set the CPU supports, every storage dtype, head dims 8..256
// (80 included), odd cache lengths and positions at every block edge, padding
// (negative positions) and positions past the cache. The last line is
// "N passed, M failed"; the exit status is non-zero on any failure.
#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/attention_kernels.h"
#include "check.h"

namespace pn = pythia_native;
namespace cpu = pythia_native::cpu;
using cpu::Isa;
using pn::DType;

using namespace native_test;

namespace {

// Storage <-> double. bf16: top 16 bits of a float32 (round to nearest even);
// fp16: through the hardware-free IEEE conversion below.
uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
float f16_to_f32(uint16_t h) {
  const int exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  const double sign = (h & 0x8000) ? -1.0 : 1.0;
  if (exp == 0) return static_cast<float>(sign * std::ldexp(mant, -24));
  if (exp == 31) return mant ? NAN : static_cast<float>(sign * INFINITY);
  return static_cast<float>(sign * std::ldexp(1024 + mant, exp - 25));
}
// fp16 bits of a value known to be exactly representable as a normal fp16
// (or zero): test inputs are drawn that way, so no rounding is involved here.
uint16_t f16_bits_exact(double x) {
  const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const double a = std::fabs(x);
  if (a == 0.0) return sign;
  int e2;
  const double m = std::frexp(a, &e2);  // a = m * 2^e2, m in [0.5, 1)
  const int e = e2 - 1;                  // a = (1 + f) * 2^e
  const auto mant = static_cast<uint16_t>((m * 2.0 - 1.0) * 1024.0);
  return sign | static_cast<uint16_t>((e + 15) << 10) | mant;
}

// A tensor in one storage dtype, with its exact values as doubles.
struct Buf {
  DType dt;
  std::vector<float> f32;
  std::vector<uint16_t> u16;
  std::vector<double> val;  // exact stored values
  void* data() { return dt == DType::F32 ? static_cast<void*>(f32.data()) : u16.data(); }
  double at(int64_t i) const {
    return dt == DType::F32 ? f32[i] : dt == DType::BF16 ? bf16_to_f32(u16[i]) : f16_to_f32(u16[i]);
  }
};

Buf make_buf(DType dt, int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Buf b{dt, {}, {}, {}};
  b.val.resize(n);
  if (dt == DType::F32) {
    b.f32.resize(n);
    for (int64_t i = 0; i < n; ++i) b.val[i] = b.f32[i] = dist(rng);
  } else {
    b.u16.resize(n);
    std::uniform_int_distribution<int> k(-1024, 1024);
    for (int64_t i = 0; i < n; ++i) {
      // bf16: a rounded normal sample; fp16: k / 256, exact (11 bits, >= 2^-8).
      b.u16[i] = dt == DType::BF16 ? f32_to_bf16(dist(rng)) : f16_bits_exact(k(rng) / 256.0);
      b.val[i] = b.at(i);
    }
  }
  return b;
}

Buf zeros_buf(DType dt, int64_t n) {
  Buf b{dt, {}, {}, {}};
  if (dt == DType::F32) b.f32.assign(n, 0.0f); else b.u16.assign(n, 0);
  b.val.assign(n, 0.0);
  return b;
}

// Relative tolerance of one stored output element: the kernels compute in
// float32 and round once to the storage type (half an ulp: 2^-9 bf16, 2^-11
// fp16); twice that covers the float32 error under the rounding.
double out_rel_tol(DType dt) {
  return dt == DType::F32 ? 0.0 : dt == DType::BF16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -10);
}


// ------------------------------------------------------- decode_attention ---

// positions [B, T]; q [B, T, H, D]; caches [Bc, H, L, D].
void test_decode(Isa isa, DType dt, int64_t B, int64_t T, int64_t H, int64_t D, int64_t L,
                 const std::vector<int64_t>& pos, std::mt19937& rng) {
  g_ctx = fmt("decode %s %s B=%lld T=%lld H=%lld D=%lld L=%lld", cpu::isa_name(isa), dt_name(dt),
              (long long)B, (long long)T, (long long)H, (long long)D, (long long)L);
  const int64_t Bc = B + 1;
  Buf q = make_buf(dt, B * T * H * D, rng);
  Buf k = make_buf(dt, Bc * H * L * D, rng);
  Buf v = make_buf(dt, Bc * H * L * D, rng);
  const int64_t rows = B * T * H;
  Buf out = zeros_buf(dt, rows * D + 8);  // + 8: a guard past the end
  if (dt == DType::F32) std::fill(out.f32.begin() + rows * D, out.f32.end(), 12345.0f);
  else std::fill(out.u16.begin() + rows * D, out.u16.end(), uint16_t(0x1234));
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  // Two uneven ranges, as two threads would get them.
  const int64_t mid = rows / 3;
  cpu::decode_attention_rows(q.data(), k.data(), v.data(), dt, pos.data(), T, H, L, D, scale,
                             out.data(), 0, mid, isa);
  cpu::decode_attention_rows(q.data(), k.data(), v.data(), dt, pos.data(), T, H, L, D, scale,
                             out.data(), mid, rows, isa);
  double worst = 0.0;
  int64_t bad = -1;
  double bad_got = 0, bad_ref = 0;
  std::vector<double> ref(D), s(L);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t h = r % H, bt = r / H, b = bt / T;
    const int64_t n = pos[bt] < 0 ? 0 : std::min(pos[bt] + 1, L);
    std::fill(ref.begin(), ref.end(), 0.0);
    if (n > 0) {
      double mx = -INFINITY, sum = 0.0;
      for (int64_t j = 0; j < n; ++j) {
        double dot = 0.0;
        for (int64_t d = 0; d < D; ++d) dot += q.val[r * D + d] * k.val[((b * H + h) * L + j) * D + d];
        s[j] = dot * static_cast<double>(scale);
        mx = std::max(mx, s[j]);
      }
      for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t d = 0; d < D; ++d) ref[d] += s[j] / sum * v.val[((b * H + h) * L + j) * D + d];
      }
    }
    double row_max = 0.0;
    for (int64_t d = 0; d < D; ++d) row_max = std::max(row_max, std::fabs(ref[d]));
    for (int64_t d = 0; d < D; ++d) {
      const double got = out.at(r * D + d);
      const double err = std::fabs(got - ref[d]);
      const double tol = out_rel_tol(dt) * std::fabs(ref[d]) + 1e-5 * row_max;
      if (n == 0 ? got != 0.0 : !(err <= tol)) {
        if (bad < 0) { bad = r * D + d; bad_got = got; bad_ref = ref[d]; }
      }
      if (row_max > 0) worst = std::max(worst, err / row_max);
    }
  }
  CHECK(bad < 0, "out[row %lld, d %lld] = %.9g, reference %.9g (worst error %.3g of the row's max)",
        (long long)(bad / D), (long long)(bad % D), bad_got, bad_ref, worst);
  bool guard_ok = true;
  for (int64_t i = rows * D; i < rows * D + 8; ++i) {
    guard_ok = guard_ok && (dt == DType::F32 ? out.f32[i] == 12345.0f : out.u16[i] == 0x1234);
  }
  CHECK(guard_ok, "wrote past the end of out");
}

// ---------------------------------------------------------------- rotary ---

void test_rotary(Isa isa, DType dt, int64_t B, int64_t T, int64_t H, int64_t D, int64_t R,
                 int64_t L, const std::vector<int64_t>& pos, int64_t row_pad, std::mt19937& rng) {
  g_ctx = fmt("rotary isa=%s %s B=%lld T=%lld H=%lld D=%lld R=%lld L=%lld pad=%lld",
              cpu::isa_name(isa), dt_name(dt),
              (long long)B, (long long)T, (long long)H, (long long)D, (long long)R, (long long)L,
              (long long)row_pad);
  const int64_t W = H * 3 * D;
  const int64_t st = W + row_pad, sb = T * st;  // strided rows
  const int64_t Bc = B + 1;
  Buf qkv = make_buf(dt, B * sb, rng);
  Buf kc = make_buf(dt, Bc * H * L * D, rng);
  Buf vc = make_buf(dt, Bc * H * L * D, rng);
  const Buf k0 = kc, v0 = vc;
  Buf q = zeros_buf(dt, B * T * H * D);
  const float theta = 10000.0f;
  cpu::rotary_kv_cache_tokens(qkv.data(), dt, T, sb, st, pos.data(), H, D, L, R, theta,
                              kc.data(), vc.data(), q.data(), 0, B * T, isa);
  // Every ISA writes the scalar loop's bits (same roundings, no FMA).
  if (isa != Isa::Scalar) {
    Buf kc_s = k0, vc_s = v0, q_s = zeros_buf(dt, B * T * H * D);
    cpu::rotary_kv_cache_tokens(qkv.data(), dt, T, sb, st, pos.data(), H, D, L, R, theta,
                                kc_s.data(), vc_s.data(), q_s.data(), 0, B * T, Isa::Scalar);
    const bool same = kc_s.f32 == kc.f32 && kc_s.u16 == kc.u16 && vc_s.f32 == vc.f32 &&
                      vc_s.u16 == vc.u16 && q_s.f32 == q.f32 && q_s.u16 == q.u16;
    CHECK(same, "isa %s wrote different bits from the scalar loop", cpu::isa_name(isa));
  }
  // Expected values; rotary angles as the contract defines them (float32
  // inv_freq and angle), cos/sin and the rotation in double.
  std::vector<double> eq(B * T * H * D), ek(k0.val), ev(v0.val);
  for (int64_t i = 0; i < B * T; ++i) {
    const int64_t b = i / T, t = i % T, p = pos[i];
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t d = 0; d < D; ++d) {
        const int64_t base = b * sb + t * st + h * 3 * D;
        auto rot = [&](int64_t off) {
          const double x = qkv.val[base + off + d];
          if (p < 0 || d >= R) return x;
          const int64_t half = R / 2, j = d < half ? d : d - half;
          const float inv = 1.0f / std::pow(theta, static_cast<float>(2 * j) / static_cast<float>(R));
          const double ang = static_cast<float>(p) * inv;
          const double c = std::cos(ang), s = std::sin(ang);
          return d < half ? x * c - qkv.val[base + off + d + half] * s
                          : x * c + qkv.val[base + off + d - half] * s;
        };
        eq[(i * H + h) * D + d] = rot(0);
        if (p >= 0) {
          ek[((b * H + h) * L + p) * D + d] = rot(D);
          ev[((b * H + h) * L + p) * D + d] = qkv.val[base + 2 * D + d];
        }
      }
    }
  }
  auto compare = [&](const Buf& got, const std::vector<double>& exp, const char* what) {
    int64_t bad = -1;
    for (int64_t i = 0; i < static_cast<int64_t>(exp.size()) && bad < 0; ++i) {
      const double tol = out_rel_tol(dt) * std::fabs(exp[i]) + 2e-6 * (1.0 + std::fabs(exp[i]));
      if (!(std::fabs(got.at(i) - exp[i]) <= tol)) bad = i;
    }
    CHECK(bad < 0, "%s[%lld] = %.9g, expected %.9g", what, (long long)bad,
          bad < 0 ? 0.0 : got.at(bad), bad < 0 ? 0.0 : exp[bad]);
  };
  compare(q, eq, "q");
  compare(kc, ek, "k_cache");
  compare(vc, ev, "v_cache");
}

}  // namespace

int main() {
  std::printf("pythia-native CPU attention kernel tests (best isa %s)\n",
              cpu::isa_name(cpu::best_isa()));
  const DType dts[] = {DType::F32, DType::BF16, DType::F16};
  std::mt19937 rng(2024);

  // Rotary on every ISA: Pythia head dims and rotary dims, R = 0 and R = D,
  // strided rows, padding and a middle slot.
  const int64_t dims[][2] = {{32, 8}, {64, 16}, {80, 20}, {128, 32}, {256, 64}, {80, 0}, {40, 40}};
  for (Isa isa : supported_isas()) {
    for (DType dt : dts) {
      for (const auto& dr : dims) {
        const int64_t B = 3, T = 4, L = 37;
        const std::vector<int64_t> pos = {0, 1, 2, 3, -2, -1, 0, 1, 30, 31, 32, 36};
        test_rotary(isa, dt, B, T, 2, dr[0], dr[1], L, pos, 0, rng);
        test_rotary(isa, dt, B, T, 2, dr[0], dr[1], L, pos, 24, rng);
      }
    }
  }

  for (Isa isa : supported_isas()) {
    const int64_t before_pass = g_passed, before_fail = g_failed;
    for (DType dt : dts) {
      for (int64_t D : {8, 32, 64, 80, 128, 256}) {
        for (int64_t L : {1, 15, 16, 17, 37, 130}) {
          // Two sequences: one ending at the last slot (with a position past
          // the cache, which sees all L slots), one left-padded.
          const int64_t T = std::min<int64_t>(L, 3);
          std::vector<int64_t> pos;
          for (int64_t t = 0; t < T; ++t) pos.push_back(L - T + t + (t == T - 1 ? 5 : 0));
          for (int64_t t = 0; t < T; ++t) pos.push_back(t - 1);
          test_decode(isa, dt, 2, T, 3, D, L, pos, rng);
        }
      }
    }
    std::printf("isa %s: %lld passed, %lld failed\n", cpu::isa_name(isa),
                (long long)(g_passed - before_pass), (long long)(g_failed - before_fail));
  }
  return summary();
}
