// Native tests of the torch-free CPU kernels (csrc/common/kernels.h,
// csrc/cpu/*.cpp), built by CMakeLists.txt and run by ctest.
//
// Every kernel is checked against a naive reference, once for each instruction
// set the CPU supports (best_isa() and every lower one); the harness is
// check.h.
//
// Element-wise comparisons look for the first bad element and then make ONE
// check of it, so the counts are per case rather than per element.
#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/elements.h"
#include "common/kernels.h"
#include "check.h"

namespace pn = pythia_native;
namespace cpu = pythia_native::cpu;
using pn::QuantType;
using cpu::Isa;
using pn::DType;

using namespace native_test;

namespace {

double g_worst_rel = 0.0, g_worst_rel_cond = 0.0;  // gemv error statistics, per ISA

std::vector<float> normal_vec(std::mt19937& rng, int64_t n, float stddev = 1.0f) {
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = dist(rng);
  return v;
}

uint8_t nibble(const uint8_t* packed, int64_t e) {
  const uint8_t b = packed[e >> 1];
  return (e & 1) ? (b & 0xF) : (b >> 4);
}

// Index of the code value nearest 0.0 (the pad of an odd numel).
int zero_code_index(QuantType qt) {
  const float* code = pn::code_table(qt);
  int best = 0;
  for (int j = 1; j < 16; ++j) {
    if (std::fabs(code[j]) < std::fabs(code[best])) best = j;
  }
  return best;
}


// ------------------------------------------------------------ ISA control ---

void test_isa_control() {
  g_ctx = "isa control";
  const Isa best = cpu::best_isa();
  std::printf("best_isa = %s\n", cpu::isa_name(best));
  CHECK(cpu::chunk_elems(Isa::AVX512) == 32, "got %lld", ll(cpu::chunk_elems(Isa::AVX512)));
  CHECK(cpu::chunk_elems(Isa::AVX2) == 32, "got %lld", ll(cpu::chunk_elems(Isa::AVX2)));
  CHECK(cpu::chunk_elems(Isa::Scalar) == 2, "got %lld", ll(cpu::chunk_elems(Isa::Scalar)));
  CHECK(cpu::active_isa() == best, "active %s, best %s", cpu::isa_name(cpu::active_isa()),
        cpu::isa_name(best));

  for (Isa isa : supported_isas()) {
    bool threw = false;
    try {
      cpu::set_isa(isa);
    } catch (const std::exception&) {
      threw = true;
    }
    CHECK(!threw && cpu::active_isa() == isa, "set_isa(%s): threw=%d active=%s",
          cpu::isa_name(isa), int(threw), cpu::isa_name(cpu::active_isa()));
  }
  cpu::set_isa(Isa::Scalar);

  // Every ISA above best_isa() (and one past the enum, always above) must throw
  // std::invalid_argument and leave the active ISA alone.
  for (int i = static_cast<int>(best) + 1; i <= static_cast<int>(Isa::AVX512) + 1; ++i) {
    const Isa isa = static_cast<Isa>(i);
    int outcome = 0;  // 0: no throw, 1: invalid_argument, 2: another exception
    try {
      cpu::set_isa(isa);
    } catch (const std::invalid_argument&) {
      outcome = 1;
    } catch (...) {
      outcome = 2;
    }
    CHECK(outcome == 1, "set_isa(%d) above best (%s): outcome %d (0 = no throw, 2 = other)",
          i, cpu::isa_name(best), outcome);
    CHECK(cpu::active_isa() == Isa::Scalar, "active changed to %s by a failed set_isa(%d)",
          cpu::isa_name(cpu::active_isa()), i);
  }
  cpu::set_isa(best);
}

// ------------------------------------------------ quantize / dequantize ---

void test_quant_roundtrip(Isa isa, QuantType qt, int64_t numel, int64_t bs, std::mt19937& rng) {
  g_ctx = fmt("isa=%s %s numel=%lld bs=%lld quantize/dequantize", cpu::isa_name(isa),
              qt_name(qt), ll(numel), ll(bs));
  const float* code = pn::code_table(qt);
  const int64_t nb = (numel + bs - 1) / bs;
  const int64_t nbytes = (numel + 1) / 2;

  std::vector<float> w = normal_vec(rng, numel);
  // Block 1 all zeros: a full block stores absmax 0, a partial (last) one 1e-38.
  if (nb > 1) std::fill(w.begin() + bs, w.begin() + std::min(numel, 2 * bs), 0.0f);
  // A large outlier in block 0 (scales every other value there down).
  if (numel > 3) w[3] = -9.5f;

  // Whole tensor in one call, and again as two block ranges [0, h), [h, nb)
  // into buffers pre-filled differently: equal results mean every byte and
  // every absmax was written, and identically, by both.
  const uint8_t kGuard = 0x5A;
  std::vector<uint8_t> packed(nbytes + 16, 0x00), packed2(nbytes + 16, 0xFF);
  std::fill(packed.begin() + nbytes, packed.end(), kGuard);
  std::fill(packed2.begin() + nbytes, packed2.end(), kGuard);
  std::vector<float> absmax(nb + 4, -7.0f), absmax2(nb + 4, -3.0f);
  std::fill(absmax2.begin() + nb, absmax2.end(), -7.0f);
  cpu::quantize_4bit_blocks(w.data(), numel, bs, qt, 0, nb, packed.data(), absmax.data());
  const int64_t h = nb / 2;
  cpu::quantize_4bit_blocks(w.data(), numel, bs, qt, h, nb, packed2.data(), absmax2.data());
  cpu::quantize_4bit_blocks(w.data(), numel, bs, qt, 0, h, packed2.data(), absmax2.data());

  {
    int64_t bad = -1;
    for (int64_t i = 0; i < nbytes + 16 && bad < 0; ++i) {
      if (packed[i] != packed2[i]) bad = i;
    }
    CHECK(bad < 0, "byte %lld: whole call 0x%02x, split call 0x%02x (or not written)", ll(bad),
          packed[bad], packed2[bad]);
    bad = -1;
    for (int64_t i = nbytes; i < nbytes + 16 && bad < 0; ++i) {
      if (packed[i] != kGuard) bad = i;
    }
    CHECK(bad < 0, "byte %lld past the end written: 0x%02x", ll(bad), packed[bad]);
    bad = -1;
    for (int64_t b = 0; b < nb + 4 && bad < 0; ++b) {
      if (!same_bits(absmax[b], absmax2[b])) bad = b;
    }
    CHECK(bad < 0, "absmax[%lld]: whole call %.9g, split call %.9g", ll(bad), absmax[bad],
          absmax2[bad]);
    bad = -1;
    for (int64_t b = nb; b < nb + 4 && bad < 0; ++b) {
      if (absmax[b] != -7.0f) bad = b;
    }
    CHECK(bad < 0, "absmax[%lld] past the end written: %.9g", ll(bad), absmax[bad]);
  }

  // absmax: max |w| of the block; a partial last block floors it at 1e-38.
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t start = b * bs, end = std::min(numel, start + bs);
    float mx = 0.0f;
    for (int64_t e = start; e < end; ++e) mx = std::max(mx, std::fabs(w[e]));
    const bool full = end - start == bs;
    const float expect = full ? mx : std::max(mx, pn::kAbsmaxFloor);
    CHECK(same_bits(absmax[b], expect), "absmax[%lld] (%s block of %lld) = %.9g, expected %.9g",
          ll(b), full ? "full" : "partial", ll(end - start), absmax[b], expect);
  }

  // The chosen index is the nearest code to w / absmax.
  {
    int64_t bad = -1;
    int bad_j = -1;
    double bad_s = 0.0;
    for (int64_t e = 0; e < numel && bad < 0; ++e) {
      const double a = std::max(absmax[e / bs], pn::kAbsmaxFloor);
      const double s = static_cast<double>(w[e]) / a;
      const int idx = nibble(packed.data(), e);
      const double d = std::fabs(s - code[idx]);
      for (int j = 0; j < 16; ++j) {
        if (d > std::fabs(s - code[j]) + 1e-6) {
          bad = e;
          bad_j = j;
          bad_s = s;
          break;
        }
      }
    }
    CHECK(bad < 0,
          "element %lld: w=%.9g absmax=%.9g w/absmax=%.9g chose index %d (code %.9g) but index "
          "%d (code %.9g) is nearer",
          ll(bad), w[bad], absmax[bad / bs], bad_s, nibble(packed.data(), bad),
          code[nibble(packed.data(), bad)], bad_j, code[bad_j]);
  }

  // Pad nibble of an odd numel: the code nearest 0.0.
  if (numel % 2 == 1) {
    const int pad = packed[nbytes - 1] & 0xF;
    const int expect = zero_code_index(qt);
    CHECK(pad == expect && expect == (qt == QuantType::NF4 ? 7 : 0),
          "pad nibble %d, expected %d (nearest 0.0)", pad, expect);
  }

  // dequantize_4bit_range, whole tensor: out[e] = code[index] * absmax.
  std::vector<float> deq(numel + 8, 1234.5f);
  cpu::dequantize_4bit_range(packed.data(), absmax.data(), bs, qt, 0, numel, deq.data());
  {
    int64_t bad = -1;
    for (int64_t e = 0; e < numel && bad < 0; ++e) {
      if (!same_bits(deq[e], code[nibble(packed.data(), e)] * absmax[e / bs])) bad = e;
    }
    CHECK(bad < 0, "dequantized[%lld] = %.9g, expected code[%d] * %.9g = %.9g", ll(bad), deq[bad],
          nibble(packed.data(), bad), absmax[bad / bs],
          code[nibble(packed.data(), bad)] * absmax[bad / bs]);
    bad = -1;
    for (int64_t i = numel; i < numel + 8 && bad < 0; ++i) {
      if (deq[i] != 1234.5f) bad = i;
    }
    CHECK(bad < 0, "out[%lld] past e1 - e0 written: %.9g", ll(bad), deq[bad]);
  }

  // Sub-ranges [e0, e1) land at out[e - e0], including odd starts and ends.
  const int64_t ranges[][2] = {{0, 1}, {1, numel}, {numel / 3, numel - numel / 4},
                               {numel - 1, numel}, {numel / 2, numel / 2}};
  for (const auto& r : ranges) {
    const int64_t e0 = r[0], e1 = r[1];
    if (e0 < 0 || e1 > numel || e0 > e1) continue;
    std::vector<float> part(e1 - e0 + 4, 1234.5f);
    cpu::dequantize_4bit_range(packed.data(), absmax.data(), bs, qt, e0, e1, part.data());
    int64_t bad = -1;
    for (int64_t e = e0; e < e1 && bad < 0; ++e) {
      if (!same_bits(part[e - e0], deq[e])) bad = e;
    }
    CHECK(bad < 0, "range [%lld, %lld): element %lld = %.9g, whole-tensor value %.9g", ll(e0),
          ll(e1), ll(bad), part[bad - e0], deq[bad]);
    bad = -1;
    for (int64_t i = e1 - e0; i < e1 - e0 + 4 && bad < 0; ++i) {
      if (part[i] != 1234.5f) bad = i;
    }
    CHECK(bad < 0, "range [%lld, %lld): out[%lld] past the range written: %.9g", ll(e0), ll(e1),
          ll(bad), part[bad]);
  }
}

// -------------------------------------------------------------- permute_k ---

// permute_k reorders each chunk of C = chunk_elems(isa) elements by a fixed
// permutation (the kernels' weight order; kernels.h leaves it to the
// implementation). With distinct values in x, the permutation is read off the
// first chunk and must be a bijection of [0, C) that every chunk of every row
// follows, reading row m at x + m * ldx and never the padding past K.
// Whether it matches the kernels' weight order is what the gemv and
// dequantize_rows_permuted tests check.
void test_permute_k(Isa isa) {
  const int64_t C = cpu::chunk_elems(isa);
  for (int64_t M : {1, 3}) {
    for (int64_t K : {C, 2 * C, int64_t{96}, int64_t{768}}) {
      if (K % C) continue;
      for (int64_t ldx : {K, K + 7}) {
        g_ctx = fmt("isa=%s permute_k M=%lld K=%lld ldx=%lld", cpu::isa_name(isa), ll(M), ll(K),
                    ll(ldx));
        // x[m, k] = 4096 m + k: exact in float32, and tells where each came from.
        std::vector<float> x(M * ldx, std::numeric_limits<float>::quiet_NaN());
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t k = 0; k < K; ++k) x[m * ldx + k] = static_cast<float>(4096 * m + k);
        }
        std::vector<float> xp(M * K + 8, 1234.5f);
        cpu::permute_k(x.data(), DType::F32, M, K, ldx, isa, xp.data());

        std::vector<int64_t> src(C);
        std::vector<int> seen(C, 0);
        bool bijection = true;
        for (int64_t i = 0; i < C; ++i) {
          const float v = xp[i];
          src[i] = (v >= 0.0f && v < static_cast<float>(C) && v == std::floor(v))
                       ? static_cast<int64_t>(v) : -1;
          if (src[i] < 0 || seen[src[i]]++) bijection = false;
        }
        CHECK(bijection, "first chunk of xp is not a permutation of x[0, %lld): xp[0..3] = "
              "%.9g %.9g %.9g %.9g", ll(C), xp[0], xp[std::min<int64_t>(1, C - 1)],
              xp[std::min<int64_t>(2, C - 1)], xp[std::min<int64_t>(3, C - 1)]);
        if (!bijection) continue;
        if (M == 1 && K == C && ldx == K) {
          std::string order;
          for (int64_t i = 0; i < C; ++i) order += fmt(i ? " %lld" : "%lld", ll(src[i]));
          std::printf("isa %s: permute_k chunk order (source of each position): %s\n",
                      cpu::isa_name(isa), order.c_str());
        }
        int64_t bad = -1;
        for (int64_t i = 0; i < M * K && bad < 0; ++i) {
          const int64_t m = i / K, k = i % K;
          const float expect = static_cast<float>(4096 * m + (k - k % C) + src[k % C]);
          if (!same_bits(xp[i], expect)) bad = i;
        }
        CHECK(bad < 0, "xp[m=%lld, k=%lld] = %.9g, expected x[m, %lld] = %.9g (the first "
              "chunk's permutation)", ll(bad / K), ll(bad % K), xp[bad],
              ll(bad % K - bad % K % C + src[bad % K % C]),
              static_cast<double>(4096 * (bad / K) + bad % K - bad % K % C + src[bad % K % C]));
        bad = -1;
        for (int64_t i = M * K; i < M * K + 8 && bad < 0; ++i) {
          if (xp[i] != 1234.5f) bad = i;
        }
        CHECK(bad < 0, "xp[%lld] past M*K written: %.9g", ll(bad), xp[bad]);

        // bf16 / fp16 x: the same order, each element widened exactly. Values
        // (k % 61) - 30 + m / 4 are exact in both formats.
        std::vector<cpu::Bf16> xb(M * ldx);
        std::vector<cpu::F16> xh(M * ldx);
        std::vector<float> xf(M * ldx), xpf(M * K), xpb(M * K), xph(M * K);
        for (int64_t i = 0; i < M * ldx; ++i) {
          xf[i] = static_cast<float>((i % ldx) % 61) - 30.0f + static_cast<float>(i / ldx) / 4;
          xb[i] = cpu::from_f32<cpu::Bf16>(xf[i]);
          xh[i] = cpu::from_f32<cpu::F16>(xf[i]);
        }
        cpu::permute_k(xf.data(), DType::F32, M, K, ldx, isa, xpf.data());
        cpu::permute_k(xb.data(), DType::BF16, M, K, ldx, isa, xpb.data());
        cpu::permute_k(xh.data(), DType::F16, M, K, ldx, isa, xph.data());
        bad = -1;
        for (int64_t i = 0; i < M * K && bad < 0; ++i) {
          if (!same_bits(xpb[i], xpf[i]) || !same_bits(xph[i], xpf[i])) bad = i;
        }
        CHECK(bad < 0, "permute_k of bf16/fp16 x differs from float32 at %lld: %.9g / %.9g vs "
              "%.9g", ll(bad), xpb[bad], xph[bad], xpf[bad]);
      }
    }
  }
}

// ------------------------------------------------ gemv / panel dequantize ---

struct QuantWeight {
  int64_t N, K, bs;
  QuantType qt;
  std::vector<uint8_t> packed;  // exact sizes, so a sanitizer sees any over-read
  std::vector<float> absmax;
  std::vector<float> deq;  // [N, K] dequantized (the reference weights)
};

QuantWeight make_weight(int64_t N, int64_t K, int64_t bs, QuantType qt, std::mt19937& rng) {
  QuantWeight q{N, K, bs, qt, {}, {}, {}};
  std::vector<float> w = normal_vec(rng, N * K, 0.05f);
  if (N > 1) std::fill(w.begin() + K, w.begin() + K + bs, 0.0f);  // a zero block (row 1)
  const int64_t nb = N * K / bs;
  q.packed.resize(N * K / 2);
  q.absmax.resize(nb);
  q.deq.resize(N * K);
  cpu::quantize_4bit_blocks(w.data(), N * K, bs, qt, 0, nb, q.packed.data(), q.absmax.data());
  cpu::dequantize_4bit_range(q.packed.data(), q.absmax.data(), bs, qt, 0, N * K, q.deq.data());
  return q;
}

// The two small-M product kernels share one contract (kernels.h).
using RowsKernel = void (*)(const float*, int64_t, int64_t, const uint8_t*, const float*, int64_t,
                            QuantType, const float*, int64_t, int64_t, void*, DType, int64_t, Isa);
struct NamedKernel {
  const char* name;
  RowsKernel run;
};
// gemv_4bit_rows with the code shift ops.cpp gives it (0 for these x).
void gemv_rows_as_called(const float* xp, int64_t M, int64_t K, const uint8_t* packed,
                         const float* absmax, int64_t bs, QuantType qt, const float* bias,
                         int64_t n0, int64_t n1, void* y, DType ydt, int64_t ldy, Isa isa) {
  float amax = 0.0f;
  for (int64_t i = 0; i < M * K; ++i) amax = std::max(amax, std::fabs(xp[i]));
  cpu::gemv_4bit_rows(xp, M, K, packed, absmax, bs, qt, bias, n0, n1, y, ydt, ldy, isa,
                      cpu::gemv_code_shift(amax, bs, isa));
}
const NamedKernel kRowsKernels[] = {{"gemv_4bit_rows", gemv_rows_as_called},
                                    {"gemm_4bit_tiles", cpu::gemm_4bit_tiles}};

void test_gemv(const NamedKernel& kernel, Isa isa, const QuantWeight& q, int64_t M,
               bool with_bias, int64_t ldx_pad, int64_t ldy_pad, std::mt19937& rng) {
  const int64_t N = q.N, K = q.K;
  const int64_t ldx = K + ldx_pad, ldy = N + ldy_pad;
  const std::string base = fmt("isa=%s %s %s M=%lld K=%lld N=%lld bs=%lld bias=%d ldx=%lld "
                               "ldy=%lld",
                               cpu::isa_name(isa), qt_name(q.qt), kernel.name, ll(M), ll(K), ll(N),
                               ll(q.bs), int(with_bias), ll(ldx), ll(ldy));
  // x padding columns are NaN: reading them would poison the result.
  std::vector<float> x = normal_vec(rng, M * ldx);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = K; k < ldx; ++k) x[m * ldx + k] = std::numeric_limits<float>::quiet_NaN();
  }
  std::vector<float> bias = with_bias ? normal_vec(rng, N) : std::vector<float>();
  std::vector<float> xp(M * K);
  cpu::permute_k(x.data(), DType::F32, M, K, ldx, isa, xp.data());

  // yref: the exact result (double); yabs: the same sum of absolute values,
  // the scale of float32 rounding error in any summation order.
  std::vector<double> yref(M * N), yabs(M * N);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double acc = with_bias ? bias[n] : 0.0;
      double mag = std::fabs(acc);
      for (int64_t k = 0; k < K; ++k) {
        const double t = static_cast<double>(x[m * ldx + k]) * static_cast<double>(q.deq[n * K + k]);
        acc += t;
        mag += std::fabs(t);
      }
      yref[m * N + n] = acc;
      yabs[m * N + n] = mag;
    }
  }

  // Row ranges: the whole of [0, N), a strict sub-range, and an empty one.
  const int64_t sub0 = N / 3, sub1 = std::max(sub0 + 1, N - N / 4);
  const int64_t ranges[][2] = {{0, N}, {sub0, sub1}, {N / 2, N / 2}};
  const float kSentinel = -4321.25f;
  for (const auto& r : ranges) {
    const int64_t n0 = r[0], n1 = r[1];
    g_ctx = base + fmt(" rows [%lld, %lld)", ll(n0), ll(n1));
    // One extra row of y past M: it must stay untouched too.
    std::vector<float> y((M + 1) * ldy, kSentinel);
    kernel.run(xp.data(), M, K, q.packed.data(), q.absmax.data(), q.bs, q.qt,
                        with_bias ? bias.data() : nullptr, n0, n1, y.data(), DType::F32, ldy,
                        isa);
    double max_ref = 0.0, max_abs = 0.0, max_err = 0.0;
    int64_t worst = -1, touched = -1;
    for (int64_t m = 0; m <= M; ++m) {
      for (int64_t n = 0; n < ldy; ++n) {
        const float v = y[m * ldy + n];
        if (m < M && n >= n0 && n < n1) {
          const double ref = yref[m * N + n];
          const double err = std::isfinite(v) ? std::fabs(v - ref) : HUGE_VAL;
          max_ref = std::max(max_ref, std::fabs(ref));
          max_abs = std::max(max_abs, yabs[m * N + n]);
          if (err > max_err || worst < 0) {
            max_err = std::max(max_err, err);
            worst = m * ldy + n;
          }
        } else if (!same_bits(v, kSentinel) && touched < 0) {
          touched = m * ldy + n;
        }
      }
    }
    CHECK(touched < 0, "y[m=%lld, n=%lld] outside rows [%lld, %lld) / m < %lld written: %.9g",
          ll(touched / ldy), ll(touched % ldy), ll(n0), ll(n1), ll(M), y[touched]);
    // Relative error max|y - y_ref| / max|y_ref| <= 1e-5, except that the
    // denominator is at least max(sum_k |x w| + |bias|): when a random case
    // cancels to a tiny y_ref, plain float32 rounding (any summation order)
    // would otherwise fail it. A wrong weight, scale or x element still costs
    // ~|x w| / sum|x w| ~ 1e-3 here, far above the bound.
    if (n1 > n0) {
      const double rel = max_ref > 0 ? max_err / max_ref : max_err;
      const double denom = std::max(max_ref, max_abs);
      const double rel_cond = denom > 0 ? max_err / denom : max_err;
      CHECK(rel_cond <= 1e-5,
            "max|y - y_ref| / max(max|y_ref|, max sum|x w|) = %.3g (max|y - y_ref| / max|y_ref| "
            "= %.3g; max err %.3g, max|y_ref| %.6g, max sum|x w| %.6g); worst at m=%lld n=%lld: "
            "y=%.9g y_ref=%.9g",
            rel_cond, rel, max_err, max_ref, max_abs, ll(worst / ldy), ll(worst % ldy), y[worst],
            yref[(worst / ldy) * N + worst % ldy]);
      g_worst_rel = std::max(g_worst_rel, rel);
      g_worst_rel_cond = std::max(g_worst_rel_cond, rel_cond);
    }
    // A bf16 / fp16 y is the float32 result rounded once (same sums, same
    // order), and the same cells stay untouched.
    std::vector<cpu::Bf16> yb((M + 1) * ldy, cpu::Bf16{0x7bcd});
    std::vector<cpu::F16> yh((M + 1) * ldy, cpu::F16{0x7bcd});
    kernel.run(xp.data(), M, K, q.packed.data(), q.absmax.data(), q.bs, q.qt,
                        with_bias ? bias.data() : nullptr, n0, n1, yb.data(), DType::BF16, ldy,
                        isa);
    kernel.run(xp.data(), M, K, q.packed.data(), q.absmax.data(), q.bs, q.qt,
                        with_bias ? bias.data() : nullptr, n0, n1, yh.data(), DType::F16, ldy,
                        isa);
    int64_t bad = -1;
    for (int64_t i = 0; i < (M + 1) * ldy && bad < 0; ++i) {
      const bool inside = i / ldy < M && i % ldy >= n0 && i % ldy < n1;
      const uint16_t eb = inside ? cpu::from_f32<cpu::Bf16>(y[i]).bits : 0x7bcd;
      const uint16_t eh = inside ? cpu::from_f32<cpu::F16>(y[i]).bits : 0x7bcd;
      if (yb[i].bits != eb || yh[i].bits != eh) bad = i;
    }
    CHECK(bad < 0, "bf16/fp16 y at m=%lld n=%lld: %04x / %04x, expected the float32 result "
          "%.9g rounded", ll(bad / ldy), ll(bad % ldy), yb[bad].bits, yh[bad].bits, y[bad]);
  }

  // The GEMV's sums of a row do not depend on which rows a thread is given
  // (M = 1 takes rows in pairs; a row alone, or the odd one of a range, goes
  // through the single-row loop): every row computed alone has the bits of
  // the whole range's result, so results do not change with the thread count.
  if (kernel.run == gemv_rows_as_called) {
    g_ctx = base + " rows alone vs [0, N)";
    std::vector<float> y_all(M * ldy, 0.0f), y_one(M * ldy, 0.0f);
    const float* b = with_bias ? bias.data() : nullptr;
    kernel.run(xp.data(), M, K, q.packed.data(), q.absmax.data(), q.bs, q.qt, b, 0, N,
               y_all.data(), DType::F32, ldy, isa);
    for (int64_t n = 0; n < N; ++n) {
      kernel.run(xp.data(), M, K, q.packed.data(), q.absmax.data(), q.bs, q.qt, b, n, n + 1,
                 y_one.data(), DType::F32, ldy, isa);
    }
    int64_t differ = -1;
    for (int64_t i = 0; i < M * ldy && differ < 0; ++i) {
      if (!same_bits(y_all[i], y_one[i])) differ = i;
    }
    CHECK(differ < 0, "y[m=%lld, n=%lld] = %.9g from [0, N), %.9g computed alone",
          ll(differ / ldy), ll(differ % ldy), y_all[differ], y_one[differ]);
  }
}

// gemm_4bit's int16 GEMV (cpu/gemv_i16.cpp) against its definition written
// out in scalars (double sums of exact integer products), with exact-size
// buffers (a sanitizer sees any over-read of W, absmax or x) and sentinels
// around y. N = 17: at M = 1 four blocks of four rows side by side (AVX-512
// VNNI) or eight pairs (AVX2), and a lone row after them; N = 1, 3: lone rows
// or one pair and a lone row.
void test_gemv_i16(cpu::I16Kernel kern, const QuantWeight& q, int64_t M, int64_t ldx,
                   bool with_bias, std::mt19937& rng) {
  const int64_t N = q.N, K = q.K;
  g_ctx = fmt("gemv_4bit_i16_rows[%s] %s N=%lld K=%lld bs=%lld M=%lld ldx=%lld bias=%d",
              cpu::i16_kernel_name(kern), q.qt == QuantType::NF4 ? "nf4" : "fp4", ll(N), ll(K),
              ll(q.bs), ll(M), ll(ldx), int(with_bias));
  std::vector<float> x = normal_vec(rng, (M - 1) * ldx + K);
  if (M > 1) std::fill(x.begin() + ldx, x.begin() + ldx + 64, 0.0f);  // a zero block (row 1)
  x[0] *= 1e4f;  // one outlier: the first block's scale is set by it
  std::vector<float> bias = normal_vec(rng, N);
  std::vector<int16_t> xq(M * K);
  std::vector<float> xs(M * K / 8);
  CHECK(cpu::quantize_x_i16(kern, x.data(), DType::F32, M, K, ldx, xq.data(), xs.data()),
        "finite x reported non-finite");
  const float sentinel = -12345.0f;
  const int64_t ldy = N + 3;
  std::vector<float> y(M * ldy, sentinel);
  cpu::gemv_4bit_i16_rows(kern, xq.data(), xs.data(), M, K, q.packed.data(), q.absmax.data(), q.bs,
                          q.qt, with_bias ? bias.data() : nullptr, 0, N, y.data(), DType::F32,
                          ldy);
  int64_t bad = -1, touched = -1;
  double worst = 0.0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < ldy; ++n) {
      const float v = y[m * ldy + n];
      if (n >= N) {
        if (v != sentinel && touched < 0) touched = m * ldy + n;
        continue;
      }
      double ref = with_bias ? bias[n] : 0.0, mag = std::fabs(ref);
      for (int64_t j = 0; j < K / 64; ++j) {
        const float* xb = x.data() + m * ldx + 64 * j;
        float am = 0.0f;
        for (int i = 0; i < 64; ++i) am = std::max(am, std::fabs(xb[i]));
        const float sc = am / 32767.0f;
        int64_t dot = 0, absdot = 0;  // absdot bounds the kernel's lane partials
        for (int i = 0; i < 64; ++i) {
          const int64_t k = 64 * j + i;
          const uint8_t byte = q.packed[(n * K + k) / 2];
          const int idx = (k % 2) ? (byte & 15) : (byte >> 4);
          const int64_t xqi = sc > 0.0f ? static_cast<int64_t>(std::nearbyint(xb[i] / sc)) : 0;
          dot += xqi * cpu::i16_code(q.qt, idx);
          absdot += std::abs(xqi * cpu::i16_code(q.qt, idx));
        }
        const double scale = q.absmax[(n * K + 64 * j) / q.bs] * (static_cast<double>(sc) / 8192.0);
        ref += static_cast<double>(dot) * scale;
        mag += static_cast<double>(absdot) * std::fabs(scale);
      }
      const double err = std::fabs(v - ref) / std::max(mag, 1e-30);
      worst = std::max(worst, err);
      if (err > 2e-6 && bad < 0) bad = m * ldy + n;
    }
  }
  CHECK(bad < 0, "y[%lld] = %.9g: off its definition by %.3g of sum|products|", ll(bad),
        bad >= 0 ? y[bad] : 0.0f, worst);
  CHECK(touched < 0, "y[%lld] past N written: %.9g", ll(touched), touched >= 0 ? y[touched] : 0.0f);
  // A NaN or an infinity anywhere in x is reported (the op then computes in float32).
  for (float special : {std::nanf(""), INFINITY, -INFINITY}) {
    std::vector<float> xb = x;
    xb[(M - 1) * ldx + K - 1] = special;
    CHECK(!cpu::quantize_x_i16(kern, xb.data(), DType::F32, M, K, ldx, xq.data(), xs.data()),
          "x with %g in its last element reported finite", special);
  }
}

void test_dequantize_rows_permuted(Isa isa, const QuantWeight& q, std::mt19937& rng) {
  const int64_t N = q.N, K = q.K;
  // The dequantized weights in permute_k order: permute_k applied to W as if
  // it were x (N rows of K).
  std::vector<float> wperm(N * K);
  cpu::permute_k(q.deq.data(), DType::F32, N, K, K, isa, wperm.data());
  std::vector<float> x = normal_vec(rng, K), xp(K);
  cpu::permute_k(x.data(), DType::F32, 1, K, K, isa, xp.data());

  const int64_t sub0 = N / 3, sub1 = std::max(sub0 + 1, N - N / 4);
  const int64_t ranges[][2] = {{0, N}, {sub0, sub1}, {N - 1, N}, {N / 2, N / 2}};
  const float kSentinel = -4321.25f;
  for (const auto& r : ranges) {
    const int64_t n0 = r[0], n1 = r[1];
    g_ctx = fmt("isa=%s %s dequantize_rows_permuted K=%lld N=%lld bs=%lld rows [%lld, %lld)",
                cpu::isa_name(isa), qt_name(q.qt), ll(K), ll(N), ll(q.bs), ll(n0), ll(n1));
    const int64_t len = (n1 - n0) * K;
    std::vector<float> out(len + 16, kSentinel);
    cpu::dequantize_rows_permuted(q.packed.data(), q.absmax.data(), K, q.bs, q.qt, n0, n1,
                                  out.data(), isa);
    int64_t bad = -1;
    for (int64_t i = 0; i < len && bad < 0; ++i) {
      if (!same_bits(out[i], wperm[n0 * K + i])) bad = i;
    }
    CHECK(bad < 0, "out[row %lld, k' %lld] = %.9g, permuted W = %.9g", ll(n0 + bad / K),
          ll(bad % K), out[bad], wperm[n0 * K + bad]);
    bad = -1;
    for (int64_t i = len; i < len + 16 && bad < 0; ++i) {
      if (!same_bits(out[i], kSentinel)) bad = i;
    }
    CHECK(bad < 0, "out[%lld] past (n1 - n0) * K = %lld written: %.9g", ll(bad), ll(len),
          out[bad]);
    // And so the panel's dot products with xp are those of x with W's rows.
    double worst = 0.0, max_ref = 0.0;
    for (int64_t n = n0; n < n1; ++n) {
      double got = 0.0, ref = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        got += static_cast<double>(xp[k]) * out[(n - n0) * K + k];
        ref += static_cast<double>(x[k]) * q.deq[n * K + k];
      }
      worst = std::max(worst, std::fabs(got - ref));
      max_ref = std::max(max_ref, std::fabs(ref));
    }
    CHECK(worst <= 1e-9 * std::max(1.0, max_ref), "dot product mismatch %.3g (max|ref| %.6g)",
          worst, max_ref);
  }
}

// ------------------------------------------------------------- gemm_f16w ---

// gemv_f16w_rows against a float64 reference on exact sizes (a sanitizer sees
// any over-read of the K % 16 / K % 8 tails), with sentinel-checked y; and
// widen_f16 against the scalar conversion, bit for bit.
// gemv_f16w_rows and gemm_f16w_tiles share one contract (kernels.h).
using F16wKernel = void (*)(const float*, int64_t, int64_t, const uint16_t*, const float*, int64_t,
                            int64_t, void*, DType, int64_t, Isa);
struct NamedF16wKernel {
  const char* name;
  F16wKernel run;
};
const NamedF16wKernel kF16wKernels[] = {{"gemv_f16w_rows", cpu::gemv_f16w_rows},
                                        {"gemm_f16w_tiles", cpu::gemm_f16w_tiles}};

// The two AVX2 code lookups (vpermps, vpshufb) must give the same bits: the
// row decode and the GEMV at M = 1-5, NF4 and FP4, and a code_shift (x near
// the float32 maximum scales the codes down).
void test_avx2_decodes_agree(std::mt19937& rng) {
  cpu::set_isa(Isa::AVX2);
  for (QuantType qt : {QuantType::NF4, QuantType::FP4}) {
    for (const auto& [K, bs] : {std::pair<int64_t, int64_t>{32, 32}, {96, 32}, {768, 64}, {2112, 64}, {1024, 256}}) {
      const int64_t N = 5;
      const QuantWeight q = make_weight(N, K, bs, qt, rng);
      std::vector<float> out[2];
      for (int d = 0; d < 2; ++d) {
        cpu::set_avx2_decode(static_cast<cpu::Avx2Decode>(d));
        out[d].assign(N * K, 0.0f);
        cpu::dequantize_rows_permuted(q.packed.data(), q.absmax.data(), K, bs, qt, 0, N,
                                      out[d].data(), Isa::AVX2);
      }
      g_ctx = fmt("avx2 decodes %s K=%lld bs=%lld: dequantize_rows_permuted", qt_name(qt), ll(K), ll(bs));
      CHECK(std::memcmp(out[0].data(), out[1].data(), out[0].size() * 4) == 0, "vpermps and vpshufb differ");
      for (int64_t M : {1, 4, 5}) {
        for (float big : {1.0f, 3e38f}) {
          std::vector<float> x = normal_vec(rng, M * K), xp(M * K);
          x[0] = big;
          const float amax = cpu::permute_k(x.data(), DType::F32, M, K, K, Isa::AVX2, xp.data());
          const int shift = cpu::gemv_code_shift(amax, bs, Isa::AVX2);
          std::vector<float> y[2];
          for (int d = 0; d < 2; ++d) {
            cpu::set_avx2_decode(static_cast<cpu::Avx2Decode>(d));
            y[d].assign(M * N, 0.0f);
            cpu::gemv_4bit_rows(xp.data(), M, K, q.packed.data(), q.absmax.data(), bs, qt, nullptr, 0, N,
                                y[d].data(), DType::F32, N, Isa::AVX2, shift);
          }
          g_ctx = fmt("avx2 decodes %s K=%lld bs=%lld M=%lld shift=%d: gemv_4bit_rows", qt_name(qt), ll(K),
                      ll(bs), ll(M), shift);
          CHECK(std::memcmp(y[0].data(), y[1].data(), y[0].size() * 4) == 0, "vpermps and vpshufb differ");
        }
      }
    }
  }
  cpu::reset_avx2_decode();
}

void test_gemv_f16w(const NamedF16wKernel& kernel, Isa isa, int64_t M, int64_t N, int64_t K,
                    bool with_bias, std::mt19937& rng) {
  g_ctx = fmt("isa=%s %s M=%lld N=%lld K=%lld bias=%d", cpu::isa_name(isa), kernel.name, ll(M),
              ll(N), ll(K), int(with_bias));
  std::vector<float> wf = normal_vec(rng, N * K, 0.1f);
  std::vector<uint16_t> w(N * K);
  for (int64_t i = 0; i < N * K; ++i) w[i] = cpu::from_f32<cpu::F16>(wf[i]).bits;
  const std::vector<float> x = normal_vec(rng, M * K);
  const std::vector<float> bias = with_bias ? normal_vec(rng, N) : std::vector<float>();
  const int64_t ldy = N + 3;
  const float kSentinel = -4321.25f;
  std::vector<float> y(M * ldy, kSentinel);
  const int64_t n0 = N > 2 ? 1 : 0, n1 = N;  // a range that starts past row 0
  kernel.run(x.data(), M, K, w.data(), with_bias ? bias.data() : nullptr, n0, n1, y.data(),
             DType::F32, ldy, isa);
  double worst = 0.0;
  int64_t touched = -1;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < ldy; ++n) {
      const float v = y[m * ldy + n];
      if (n < n0 || n >= n1) {
        if (!same_bits(v, kSentinel) && touched < 0) touched = m * ldy + n;
        continue;
      }
      double ref = with_bias ? bias[n] : 0.0, mag = std::fabs(ref);
      for (int64_t k = 0; k < K; ++k) {
        const double t = static_cast<double>(x[m * K + k]) * cpu::to_f32(cpu::F16{w[n * K + k]});
        ref += t;
        mag += std::fabs(t);
      }
      worst = std::max(worst, std::fabs(v - ref) / std::max(mag, 1e-30));
    }
  }
  CHECK(touched < 0, "y[m=%lld, n=%lld] outside rows [%lld, %lld) written: %.9g",
        ll(touched / ldy), ll(touched % ldy), ll(n0), ll(n1), y[touched]);
  CHECK(worst <= 1e-6, "max |y - y_ref| / sum|x w| = %.3g", worst);

  std::vector<float> wide(N * K + 5, kSentinel);
  cpu::widen_f16(w.data(), N * K, wide.data(), isa);
  int64_t bad = -1;
  for (int64_t i = 0; i < N * K + 5 && bad < 0; ++i) {
    const float expect = i < N * K ? cpu::to_f32(cpu::F16{w[i]}) : kSentinel;
    if (!same_bits(wide[i], expect)) bad = i;
  }
  CHECK(bad < 0, "widen_f16 out[%lld] = %.9g (count %lld)", ll(bad), wide[bad], ll(N * K));
}

// narrow_bf16 (gemm_4bit's bf16 BLAS panels) against from_f32<Bf16>, bit for
// bit: rounding ties both ways, values that round up into the next binade
// and to inf, subnormals, zeros, infinities and NaNs (quieted, sign and
// payload kept), counts around the vector widths, never writing past count.
void test_narrow_bf16(Isa isa, std::mt19937& rng) {
  std::vector<uint32_t> bits = {0x00000000u, 0x80000000u, 0x3f808000u, 0x3f818000u, 0x3f80ffffu,
                                0x3f7fffffu, 0x7f7fffffu, 0xff7fffffu, 0x7f800000u, 0xff800000u,
                                0x7fc00000u, 0xffc00001u, 0x7f800001u, 0x7fbfffffu, 0x00000001u,
                                0x807fffffu, 0x00008000u, 0x00018000u};
  std::uniform_int_distribution<uint32_t> any;
  for (int i = 0; i < 200; ++i) bits.push_back(any(rng));
  for (float v : normal_vec(rng, 100)) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    bits.push_back(u);
  }
  for (int64_t count : {int64_t{0}, int64_t{1}, int64_t{7}, int64_t{8}, int64_t{9}, int64_t{15},
                        int64_t{16}, int64_t{17}, int64_t{33}, static_cast<int64_t>(bits.size())}) {
    g_ctx = fmt("isa=%s narrow_bf16 count %lld", cpu::isa_name(isa), ll(count));
    std::vector<float> in(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) std::memcpy(&in[i], &bits[i % bits.size()], 4);
    const uint16_t kSentinel = 0xABCD;
    std::vector<uint16_t> out(static_cast<size_t>(count) + 4, kSentinel);
    cpu::narrow_bf16(in.data(), count, out.data(), isa);
    int64_t bad = -1;
    for (int64_t i = 0; i < count + 4 && bad < 0; ++i) {
      const uint16_t expect = i < count ? cpu::from_f32<cpu::Bf16>(in[i]).bits : kSentinel;
      if (out[i] != expect) bad = i;
    }
    CHECK(bad < 0, "out[%lld] = 0x%04x, from_f32 0x%04x (in 0x%08x)", ll(bad), out[bad],
          bad < count ? cpu::from_f32<cpu::Bf16>(in[bad]).bits : kSentinel,
          bad < count ? bits[bad % bits.size()] : 0u);
  }
}

// gelu_range: every ISA writes the scalar kernel's bits (the claim of
// cpu/activation.cpp) for n around the vector widths, for each storage type,
// from an offset start (i0 > 0, as a thread's share), in place too, and never
// past i1 (a sentinel). The scalar kernel against double: within 8 ulp of
// float32 (tests/test_gelu.py measures at most 6.7 on [-13, 10]).
void test_gelu(Isa isa, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 3.0f);
  const DType dts[] = {DType::F32, DType::BF16, DType::F16};
  for (DType dt : dts) {
    const int64_t es = pn::dtype_size(dt);
    for (int64_t n : {1, 7, 8, 9, 15, 16, 17, 33, 100}) {
      for (int64_t i0 : {0, 3}) {
        for (bool in_place : {false, true}) {
          g_ctx = fmt("gelu isa %s dt %d n %lld i0 %lld%s", cpu::isa_name(isa), static_cast<int>(dt),
                      ll(n), ll(i0), in_place ? " in place" : "");
          const int64_t total = i0 + n;
          std::vector<float> xf(static_cast<size_t>(total));
          for (auto& v : xf) v = nd(rng);
          std::vector<uint16_t> x16(static_cast<size_t>(total));
          std::vector<char> xbuf(static_cast<size_t>(total * es));
          for (int64_t i = 0; i < total; ++i) {
            if (dt == DType::F32) {
              std::memcpy(xbuf.data() + i * 4, &xf[static_cast<size_t>(i)], 4);
            } else {
              const uint16_t b = dt == DType::BF16 ? cpu::from_f32<cpu::Bf16>(xf[static_cast<size_t>(i)]).bits
                                                   : cpu::from_f32<cpu::F16>(xf[static_cast<size_t>(i)]).bits;
              std::memcpy(xbuf.data() + i * 2, &b, 2);
            }
          }
          // want: the scalar kernel; out: this ISA, one element of sentinel bytes past i1.
          std::vector<char> want(static_cast<size_t>(total * es)), out(static_cast<size_t>((total + 1) * es), 0x5a);
          cpu::gelu_range(xbuf.data(), want.data(), dt, i0, total, Isa::Scalar);
          if (in_place) std::memcpy(out.data(), xbuf.data(), xbuf.size());
          cpu::gelu_range(in_place ? out.data() : xbuf.data(), out.data(), dt, i0, total, isa);
          CHECK(std::memcmp(out.data() + i0 * es, want.data() + i0 * es, static_cast<size_t>(n * es)) == 0,
                "differs from the scalar kernel's bits");
          bool sentinel = true;
          for (int64_t b = 0; b < es; ++b) sentinel &= out[static_cast<size_t>(total * es + b)] == 0x5a;
          CHECK(sentinel, "wrote past i1");
          if (dt == DType::F32) {
            for (int64_t i = i0; i < total; ++i) {
              const double xv = xf[static_cast<size_t>(i)];
              const double exact = 0.5 * xv * std::erfc(-xv / std::sqrt(2.0));
              float got;
              std::memcpy(&got, want.data() + i * 4, 4);
              // 8 ulp of float32 (normal results; the flushed tail below
              // x ~ -13.2 is within the 1e-37).
              const double tol = 8 * std::ldexp(1.0, std::ilogb(static_cast<float>(exact)) - 23) + 1e-37;
              CHECK(std::fabs(got - exact) <= tol, "x %g: %.9g vs exact %.9g", xv, got, exact);
            }
          }
        }
      }
    }
  }
}

}  // namespace

// Element values of dt (f32 / bf16 / fp16 bit patterns) from floats, and back.
std::vector<char> to_elems(const std::vector<float>& xf, DType dt) {
  const int64_t es = pn::dtype_size(dt);
  std::vector<char> out(xf.size() * static_cast<size_t>(es));
  for (size_t i = 0; i < xf.size(); ++i) {
    if (dt == DType::F32) {
      std::memcpy(out.data() + i * 4, &xf[i], 4);
    } else {
      const uint16_t b = dt == DType::BF16 ? cpu::from_f32<cpu::Bf16>(xf[i]).bits
                                           : cpu::from_f32<cpu::F16>(xf[i]).bits;
      std::memcpy(out.data() + i * 2, &b, 2);
    }
  }
  return out;
}

float elem_f32(const char* p, DType dt, int64_t i) {
  if (dt == DType::F32) {
    float f;
    std::memcpy(&f, p + i * 4, 4);
    return f;
  }
  uint16_t b;
  std::memcpy(&b, p + i * 2, 2);
  return dt == DType::BF16 ? cpu::to_f32(cpu::Bf16{b}) : cpu::to_f32(cpu::F16{b});
}

// layer_norm_rows: every ISA writes the scalar kernel's bits (rows of odd
// lengths, strided rows, in place), the rows it is given and nothing else,
// and float32 results within a few ulp of a float64 LayerNorm -- including
// rows whose mean is 1e4-1e5 times their spread (a residual stream's offset),
// where float32 can do no better than the deviations from a float mean: the
// kernel's mean must be within one ulp of the exact one (a plain float32 sum
// was several ulp off: 1.2e-3 absolute at offset 1e4, std 1, H 768, against
// the 4.9e-4 of the correctly rounded mean).
void test_layer_norm(Isa isa, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const DType dts[] = {DType::F32, DType::BF16, DType::F16};
  for (DType dt : dts) {
    const int64_t es = pn::dtype_size(dt);
    for (int64_t H : {1, 2, 15, 16, 17, 31, 33, 100, 768, 2560}) {
      for (float offset : {0.0f, 300.0f, 1e4f, 1e5f}) {
        if (offset > 300.0f && dt != DType::F32) continue;  // bf16 / fp16 cannot hold the spread
        for (bool in_place : {false, true}) {
          g_ctx = fmt("layer_norm isa %s dt %d H %lld offset %g%s", cpu::isa_name(isa),
                      static_cast<int>(dt), ll(H), offset, in_place ? " in place" : "");
          const int64_t M = 3, ld = H + 5;  // rows 1 .. M - 1 normalized, row 0 left alone
          std::vector<float> xf(static_cast<size_t>(M * ld)), w(static_cast<size_t>(H)),
              b(static_cast<size_t>(H));
          // The spread: 3% of the offset up to 300, then 1 (|mean| / std ~ 1e4 - 1e5).
          const float spread = dt == DType::F16 || offset > 300.0f ? 0.0f : 0.03f * offset;
          for (auto& v : xf) v = offset + spread * nd(rng) + nd(rng);
          for (auto& v : w) v = 1.0f + 0.3f * nd(rng);
          for (auto& v : b) v = 0.1f * nd(rng);
          const std::vector<char> x = to_elems(xf, dt);
          std::vector<char> want(x.size(), 0x5a), out(x.size(), 0x5a);
          if (in_place) out = x;
          cpu::layer_norm_rows(x.data(), dt, ld, H, w.data(), b.data(), 1e-5f, want.data(), ld, 1, M,
                               Isa::Scalar);
          cpu::layer_norm_rows(in_place ? out.data() : x.data(), dt, ld, H, w.data(), b.data(), 1e-5f,
                               out.data(), ld, 1, M, isa);
          // Outside rows [1, M) x [0, H) the output keeps what it held before.
          const std::vector<char> before = in_place ? x : std::vector<char>(x.size(), 0x5a);
          bool same = true, untouched = true;
          for (int64_t m = 0; m < M; ++m) {
            for (int64_t i = 0; i < ld; ++i) {
              const size_t at = static_cast<size_t>((m * ld + i) * es);
              const bool normalized = m >= 1 && i < H;
              const char* ref = normalized ? want.data() + at : before.data() + at;
              const bool eq = std::memcmp(out.data() + at, ref, static_cast<size_t>(es)) == 0;
              (normalized ? same : untouched) &= eq;
            }
          }
          CHECK(same, "differs from the scalar kernel's bits");
          CHECK(untouched, "wrote outside the rows [1, M) x [0, H)");
          // Against float64 from the same (rounded) inputs, per row: 4 ulp of
          // the row's largest |y| in float32 (times 1 + |mean| / std: the
          // float32 mean of an offset row is off by ulps of |mean|), one
          // rounding step in bf16 / fp16. H = 1: var = 0, y = b.
          const double ulp = dt == DType::F32 ? 0x1p-23 : dt == DType::BF16 ? 0x1p-8 : 0x1p-11;
          double worst_ratio = 0.0, mean_worst_ratio = 0.0;
          for (int64_t m = 1; m < M; ++m) {
            double mean = 0.0, var = 0.0;
            for (int64_t i = 0; i < H; ++i) mean += elem_f32(x.data(), dt, m * ld + i);
            mean /= static_cast<double>(H);
            for (int64_t i = 0; i < H; ++i) {
              const double d = elem_f32(x.data(), dt, m * ld + i) - mean;
              var += d * d;
            }
            const double rstd = 1.0 / std::sqrt(var / static_cast<double>(H) + 1e-5);
            double worst = 0.0, top = 0.0;
            for (int64_t i = 0; i < H; ++i) {
              const double exact = (elem_f32(x.data(), dt, m * ld + i) - mean) * rstd * w[i] + b[i];
              worst = std::max(worst, std::fabs(elem_f32(want.data(), dt, m * ld + i) - exact));
              top = std::max(top, std::fabs(exact));
            }
            const double cond = dt == DType::F32 ? 1.0 + std::fabs(mean) * std::min(rstd, 1e3) : 1.0;
            worst_ratio = std::max(worst_ratio, worst / (ulp * top * cond + 1e-30));
            if (dt == DType::F32 && H > 1) {
              // A mean off by one ulp moves every y by ulp(mean) * rstd * |w|.
              double w_max = 0.0;
              for (int64_t i = 0; i < H; ++i) w_max = std::max(w_max, std::fabs(static_cast<double>(w[i])));
              const float mean_f = static_cast<float>(mean);
              const double mean_ulp = mean_f == 0.0f ? 0.0 : std::ldexp(1.0, std::ilogb(mean_f) - 23);
              mean_worst_ratio = std::max(mean_worst_ratio, worst / (4.0 * ulp * top + mean_ulp * rstd * w_max));
            }
          }
          CHECK(worst_ratio <= 4.0, fmt("error %.3g ulp of max|y| (x cond)", worst_ratio).c_str());
          CHECK(mean_worst_ratio <= 1.0,
                fmt("error %.3g of (4 ulp of max|y| + one ulp of the mean's worth)", mean_worst_ratio).c_str());
        }
      }
    }
  }
}

// add_inplace: x + a rounded once, the same bits on every ISA, [i0, i1) only.
void test_add_inplace(Isa isa, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 10.0f);
  const DType dts[] = {DType::F32, DType::BF16, DType::F16};
  for (DType dt : dts) {
    const int64_t es = pn::dtype_size(dt);
    for (int64_t n : {1, 7, 8, 9, 16, 17, 100}) {
      g_ctx = fmt("add_inplace isa %s dt %d n %lld", cpu::isa_name(isa), static_cast<int>(dt), ll(n));
      const int64_t i0 = 2, total = i0 + n + 1;
      std::vector<float> xf(static_cast<size_t>(total)), af(static_cast<size_t>(total));
      for (auto& v : xf) v = nd(rng);
      for (auto& v : af) v = nd(rng);
      const std::vector<char> x = to_elems(xf, dt), a = to_elems(af, dt);
      std::vector<char> out = x;
      cpu::add_inplace(out.data(), a.data(), dt, i0, i0 + n, isa);
      bool ok = std::memcmp(out.data(), x.data(), static_cast<size_t>(i0 * es)) == 0 &&
                std::memcmp(out.data() + (i0 + n) * es, x.data() + (i0 + n) * es, static_cast<size_t>(es)) == 0;
      CHECK(ok, "wrote outside [i0, i1)");
      std::vector<char> want = x;
      for (int64_t i = i0; i < i0 + n; ++i) {
        const float sum = elem_f32(x.data(), dt, i) + elem_f32(a.data(), dt, i);
        const std::vector<char> e = to_elems({sum}, dt);
        std::memcpy(want.data() + i * es, e.data(), static_cast<size_t>(es));
      }
      CHECK(std::memcmp(out.data(), want.data(), out.size()) == 0, "x + a is not rounded once to dt");
    }
  }
}

int main() {
  std::printf("pythia-native CPU kernel tests\n");
  test_isa_control();

  const int64_t sizes[] = {1, 7, 64, 65, 200, 3 * 50, 4096 + 33};
  const int64_t blocksizes[] = {32, 64, 128, 256};
  const QuantType qts[] = {QuantType::NF4, QuantType::FP4};
  // {K, blocksize}: every blocksize of the list that divides K (row-aligned).
  std::vector<std::pair<int64_t, int64_t>> kbs;
  // 2112: three chunks of the tiles (common/tiles.h kChunk = 1024), the last partial;
  // 128 and 384: an odd number of 128-groups (the int16 GEMV pairs them).
  for (int64_t K : {64, 128, 384, 768, 96, 2112}) {
    for (int64_t bs : blocksizes) {
      if (K % bs == 0) kbs.emplace_back(K, bs);
    }
  }

  if (cpu::best_isa() != Isa::AVX512) {
    // Said once, so a run on such a machine is not mistaken for full coverage.
    std::printf("note: this CPU has no AVX-512: its kernels (incl. the M = 1 row pairs of "
                "gemv_4bit_rows) are not exercised here\n");
  }
  {
    bool avx2 = false;
    for (Isa isa : supported_isas()) avx2 = avx2 || isa == Isa::AVX2;
    if (avx2) {
      std::mt19937 rng(777);
      test_avx2_decodes_agree(rng);
      std::printf("AVX2 code lookup chosen for this CPU: %s\n", cpu::avx2_decode_name(cpu::avx2_decode()));
    }
  }
  // The AVX2 pass runs twice, once per code lookup (vpermps, vpshufb).
  std::vector<std::pair<Isa, int>> passes;
  for (Isa isa : supported_isas()) {
    if (isa == Isa::AVX2) {
      passes.emplace_back(isa, static_cast<int>(cpu::Avx2Decode::Perm));
      passes.emplace_back(isa, static_cast<int>(cpu::Avx2Decode::Shuf));
    } else {
      passes.emplace_back(isa, -1);
    }
  }
  for (const auto& [isa, decode] : passes) {
    cpu::set_isa(isa);
    if (decode >= 0) {
      cpu::set_avx2_decode(static_cast<cpu::Avx2Decode>(decode));
      std::printf("isa avx2 with the %s lookup:\n", cpu::avx2_decode_name(static_cast<cpu::Avx2Decode>(decode)));
    } else {
      cpu::reset_avx2_decode();
    }
    const int64_t before_pass = g_passed, before_fail = g_failed;
    std::mt19937 rng(12345);
    g_worst_rel = g_worst_rel_cond = 0.0;

    for (QuantType qt : qts) {
      for (int64_t numel : sizes) {
        for (int64_t bs : blocksizes) test_quant_roundtrip(isa, qt, numel, bs, rng);
      }
    }

    test_permute_k(isa);
    test_narrow_bf16(isa, rng);

    for (QuantType qt : qts) {
      for (const auto& [K, bs] : kbs) {
        if (K % cpu::chunk_elems(isa) != 0) continue;
        for (int64_t N : {1, 3, 17}) {
          const QuantWeight q = make_weight(N, K, bs, qt, rng);
          test_dequantize_rows_permuted(isa, q, rng);
          // M: the tiles kernel's splits into tiles of up to 6 rows (13: 5 +
          // 4 + 4; 17: 6 + 6 + 5; up to 50: 9 tiles) and the GEMV's groups of
          // 4 with each remainder.
          for (const NamedKernel& kernel : kRowsKernels) {
            for (int64_t M : {1, 2, 3, 4, 5, 6, 7, 9, 13, 16, 17, 33, 50}) {
              for (bool with_bias : {false, true}) {
                test_gemv(kernel, isa, q, M, with_bias, 0, 0, rng);  // contiguous x and y
                test_gemv(kernel, isa, q, M, with_bias, 7, 5, rng);  // ldx > K, ldy > N
              }
            }
          }
        }
      }
    }
    for (int64_t K : {1, 7, 8, 15, 16, 17, 100, 768, 2064}) {
      for (int64_t N : {1, 2, 5, 9}) {
        for (const NamedF16wKernel& kernel : kF16wKernels) {
          // K % 16 != 0 runs the scalar tiles (any K); 768 the vector ones.
          for (int64_t M : {1, 2, 3, 4, 5, 7, 13, 16, 20, 40}) {
            test_gemv_f16w(kernel, isa, M, N, K, M % 2 == 1, rng);
          }
        }
      }
    }
    // Each ISA's own int16 kernel (AVX-512 without VNNI takes the AVX2 one).
    if (const cpu::I16Kernel kern = cpu::i16_kernel(isa); kern != cpu::I16Kernel::None) {
      for (QuantType qt : qts) {
        // + K = 4224: 33 groups (a lone last one) and, at M = 4, 33 KiB of
        // int16 x, more than some L1s.
        std::vector<std::pair<int64_t, int64_t>> kbs16 = kbs;
        kbs16.emplace_back(4224, 64);
        kbs16.emplace_back(4224, 128);
        for (const auto& [K, bs] : kbs16) {
          if (!cpu::gemv_i16_ok(1, K, bs, isa)) continue;
          for (int64_t N : {1, 3, 17}) {
            const QuantWeight q = make_weight(N, K, bs, qt, rng);
            for (int64_t M = 1; M <= cpu::kGemvI16MaxM; ++M) {
              test_gemv_i16(kern, q, M, K, M % 2 == 1, rng);
              test_gemv_i16(kern, q, M, K + 7, M % 2 == 0, rng);
            }
          }
        }
      }
    }
    test_gelu(isa, rng);
    test_layer_norm(isa, rng);
    test_add_inplace(isa, rng);
    std::printf("isa %s: %lld passed, %lld failed (gemv / tiles worst error: %.3g of max|y_ref|, "
                "%.3g of max sum|x w|)\n",
                cpu::isa_name(isa), ll(g_passed - before_pass), ll(g_failed - before_fail),
                g_worst_rel, g_worst_rel_cond);
  }
  cpu::set_isa(cpu::best_isa());

  return summary();
}
