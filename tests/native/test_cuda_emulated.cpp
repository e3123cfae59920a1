// The CUDA kernels (csrc/cuda/*.cu) run on the CPU through the emulation of
// tests/native/cuda_emu/pn_cuda_emu.h, checked against the CPU kernels (which
// test_cpu_kernels checks against naive references) and double-precision
// sums. Run by ctest; needs no GPU and no CUDA toolkit.
//
// What this proves: the kernels' indexing, bounds, block/warp reductions,
// barriers and the flash-decoding split/combine compute the right values for
// awkward shapes (M = 1..16 through every compiled MT, K with one lane busy or
// several chunks per lane, N not a multiple of the CTA's rows, strided x,
// partial quant blocks and odd numel, head dims 8..256 incl. 80, cache lengths
// around the 128-key split, padding and out-of-cache positions). Under
// PN_SANITIZE=address any out-of-bounds access of a kernel is reported.
// What it does not prove: anything about a real GPU's speed, memory model,
// graph capture, or the torch glue of csrc/ops_cuda.cpp (the CUDA pytest
// cases do that, where a GPU is visible).
//
// The last line is "N passed, M failed"; the exit status is non-zero on any
// failure. An emulation violation (a barrier after a thread returned, a
// misaligned vector load, ...) aborts with a message instead.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>
#include <random>
#include <string>
#include <vector>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "common/attention_kernels.h"
#include "common/elements.h"
#include "common/kernels.h"
#include "pn_cuda_emu.h"  // the emulation itself, for the tests of its strictness

namespace pn = pythia_native;
namespace cpu = pythia_native::cpu;
namespace cuda = pythia_native::cuda;
using cpu::Isa;
using pn::DType;
using pn::QuantType;

using namespace native_test;

namespace {

constexpr int kInvalidValue = 1;  // cudaErrorInvalidValue
constexpr DType kDtypes[] = {DType::F32, DType::F16, DType::BF16};


// Exactly `bytes` bytes, 16-byte aligned (the kernels' vector loads need
// it). Nothing more: under AddressSanitizer a read one byte past the end is
// reported, so no slack may hide an over-read.
class AlignedBytes {
 public:
  explicit AlignedBytes(size_t bytes)
      : p_(static_cast<unsigned char*>(::operator new(bytes, std::align_val_t{16}))) {}
  ~AlignedBytes() { ::operator delete(p_, std::align_val_t{16}); }
  AlignedBytes(const AlignedBytes&) = delete;
  AlignedBytes& operator=(const AlignedBytes&) = delete;
  unsigned char* data() const { return p_; }

 private:
  unsigned char* p_;
};

// n elements of one dtype, in exactly n * dtype_size bytes.
class Buf {
 public:
  Buf(DType dt, int64_t n) : dt_(dt), n_(n), store_(static_cast<size_t>(n * pn::dtype_size(dt))) {}
  DType dtype() const { return dt_; }
  int64_t size() const { return n_; }
  void* data() { return store_.data(); }
  const void* data() const { return store_.data(); }
  float get(int64_t i) const {
    switch (dt_) {
      case DType::F32: return static_cast<const float*>(data())[i];
      case DType::F16: return cpu::to_f32(cpu::F16{static_cast<const uint16_t*>(data())[i]});
      default: return cpu::to_f32(cpu::Bf16{static_cast<const uint16_t*>(data())[i]});
    }
  }
  // Stores v rounded to the dtype; returns the stored value.
  float set(int64_t i, float v) {
    switch (dt_) {
      case DType::F32: static_cast<float*>(data())[i] = v; break;
      case DType::F16: static_cast<uint16_t*>(data())[i] = cpu::from_f32<cpu::F16>(v).bits; break;
      default: static_cast<uint16_t*>(data())[i] = cpu::from_f32<cpu::Bf16>(v).bits; break;
    }
    return get(i);
  }
  bool same_bits(const Buf& o, int64_t i) const {
    const int64_t s = pn::dtype_size(dt_);
    return std::memcmp(static_cast<const char*>(data()) + i * s,
                       static_cast<const char*>(o.data()) + i * s, static_cast<size_t>(s)) == 0;
  }

 private:
  DType dt_;
  int64_t n_;
  AlignedBytes store_;
};

// Unit roundoff of a storage dtype: |round(v) - v| <= u * |v|.
double unit_roundoff(DType dt) {
  return dt == DType::F32 ? 0x1p-24 : dt == DType::F16 ? 0x1p-11 : 0x1p-8;
}

std::mt19937 g_rng(1234);
float normal(float sd = 1.0f) { return std::normal_distribution<float>(0.0f, sd)(g_rng); }

// ------------------------------------------------------------ quantize ---

// Bytes and absmax of the CUDA quantizer equal the CPU quantizer's (which
// test_cpu_kernels and the pytest suite hold byte-identical to bitsandbytes),
// for every storage dtype: the CPU sees the same values widened to float32.
void test_quantize() {
  const int64_t numels[] = {1, 2, 31, 33, 64, 65, 255, 1000, 4099};
  const int64_t blocksizes[] = {32, 64, 256, 4096};
  for (DType dt : kDtypes) {
    for (QuantType qt : {QuantType::NF4, QuantType::FP4}) {
      for (int64_t bs : blocksizes) {
        for (int64_t numel : numels) {
          g_ctx = fmt("quantize %s %s bs=%lld numel=%lld", dt_name(dt), qt_name(qt), ll(bs),
                      ll(numel));
          Buf w(dt, numel);
          std::vector<float> wf(static_cast<size_t>(numel));
          const float block_scale[] = {1.0f, 1e-3f, 40.0f, 0.0f};
          for (int64_t i = 0; i < numel; ++i) {
            const float s = block_scale[(i / bs) % 4];  // a zero block too
            wf[static_cast<size_t>(i)] = w.set(i, normal(s));
          }
          const int64_t n_blocks = (numel + bs - 1) / bs;
          const int64_t n_bytes = (numel + 1) / 2;
          std::vector<uint8_t> packed_ref(static_cast<size_t>(n_bytes), 0xAB);
          std::vector<float> absmax_ref(static_cast<size_t>(n_blocks), -1.0f);
          cpu::quantize_4bit_blocks(wf.data(), numel, bs, qt, 0, n_blocks, packed_ref.data(),
                                    absmax_ref.data());
          std::vector<uint8_t> packed(static_cast<size_t>(n_bytes), 0xCD);
          std::vector<float> absmax(static_cast<size_t>(n_blocks), -2.0f);
          const int rc =
              cuda::quantize_4bit(w.data(), dt, numel, bs, qt, packed.data(), absmax.data(), nullptr);
          CHECK(rc == 0, "status %d", rc);
          int64_t bad_bytes = 0, bad_absmax = 0, first = -1;
          for (int64_t j = 0; j < n_bytes; ++j) {
            if (packed[static_cast<size_t>(j)] != packed_ref[static_cast<size_t>(j)]) {
              if (first < 0) first = j;
              ++bad_bytes;
            }
          }
          for (int64_t b = 0; b < n_blocks; ++b) {
            if (!same_bits(absmax[static_cast<size_t>(b)], absmax_ref[static_cast<size_t>(b)])) {
              ++bad_absmax;
            }
          }
          CHECK(bad_bytes == 0, "%lld bytes differ, first %lld: 0x%02x vs cpu 0x%02x",
                ll(bad_bytes), ll(first), first >= 0 ? packed[static_cast<size_t>(first)] : 0,
                first >= 0 ? packed_ref[static_cast<size_t>(first)] : 0);
          CHECK(bad_absmax == 0, "%lld absmax differ", ll(bad_absmax));
        }
      }
    }
  }
  g_ctx = "quantize bad arguments";
  uint8_t p[4];
  float a[1];
  float w1[4] = {1, 2, 3, 4};
  CHECK(cuda::quantize_4bit(w1, DType::F32, 4, 48, QuantType::NF4, p, a, nullptr) == kInvalidValue,
        "blocksize 48 accepted");
  CHECK(cuda::quantize_4bit(w1, DType::F32, 4, 16, QuantType::NF4, p, a, nullptr) == kInvalidValue,
        "blocksize 16 accepted");
  CHECK(cuda::quantize_4bit(w1, DType::F32, -1, 64, QuantType::NF4, p, a, nullptr) == kInvalidValue,
        "numel -1 accepted");
  CHECK(cuda::quantize_4bit(w1, DType::F32, 0, 64, QuantType::NF4, p, a, nullptr) == 0,
        "numel 0 refused");
}

// ---------------------------------------------------------- dequantize ---

// Every element equals the CPU dequantization (float32 code * absmax) rounded
// once to the dtype, bit for bit; nothing is written past numel.
void test_dequantize() {
  const int64_t numels[] = {1, 3, 64, 65, 257, 1000, 4099};
  for (DType dt : kDtypes) {
    for (QuantType qt : {QuantType::NF4, QuantType::FP4}) {
      for (int64_t bs : {32, 64, 128}) {
        for (int64_t numel : numels) {
          g_ctx = fmt("dequantize %s %s bs=%lld numel=%lld", dt_name(dt), qt_name(qt), ll(bs),
                      ll(numel));
          std::vector<float> wf(static_cast<size_t>(numel));
          for (auto& v : wf) v = normal(3.0f);
          const int64_t n_blocks = (numel + bs - 1) / bs;
          std::vector<uint8_t> packed(static_cast<size_t>((numel + 1) / 2));
          std::vector<float> absmax(static_cast<size_t>(n_blocks));
          cpu::quantize_4bit_blocks(wf.data(), numel, bs, qt, 0, n_blocks, packed.data(),
                                    absmax.data());
          std::vector<float> ref(static_cast<size_t>(numel));
          cpu::dequantize_4bit_range(packed.data(), absmax.data(), bs, qt, 0, numel, ref.data());
          // One element past the end holds a sentinel the kernel must not touch.
          Buf out(dt, numel + 1);
          const float sentinel = out.set(numel, 12345.0f);
          const int rc =
              cuda::dequantize_4bit(packed.data(), absmax.data(), numel, bs, qt, out.data(), dt, nullptr);
          CHECK(rc == 0, "status %d", rc);
          Buf want(dt, numel);
          int64_t bad = 0, first = -1;
          for (int64_t i = 0; i < numel; ++i) {
            want.set(i, ref[static_cast<size_t>(i)]);
            if (!out.same_bits(want, i)) {
              if (first < 0) first = i;
              ++bad;
            }
          }
          CHECK(bad == 0, "%lld elements differ, first %lld: %g vs cpu %g", ll(bad), ll(first),
                first >= 0 ? out.get(first) : 0.0, first >= 0 ? want.get(first) : 0.0);
          CHECK(out.get(numel) == sentinel, "wrote past numel: %g", out.get(numel));
        }
      }
    }
  }
  g_ctx = "dequantize bad arguments";
  uint8_t p[1] = {0};
  float a[1] = {1};
  float o[2];
  CHECK(cuda::dequantize_4bit(p, a, 2, 100, QuantType::NF4, o, DType::F32, nullptr) == kInvalidValue,
        "blocksize 100 accepted");
  CHECK(cuda::dequantize_4bit(p, a, 2, 64, static_cast<QuantType>(7), o, DType::F32, nullptr) ==
            kInvalidValue,
        "quant type 7 accepted");
  CHECK(cuda::dequantize_4bit(p, a, 2, 64, QuantType::NF4, o, static_cast<DType>(9), nullptr) ==
            kInvalidValue,
        "dtype 9 accepted");
}

// ---------------------------------------------------------------- gemv ---

struct GemvCase {
  int64_t M, K, N, bs, ldx_pad;
  bool bias;
  // x_huge: every x is +-3e38 and W ~1e-6, so each chunk's unscaled sum
  // overflows while y (~1e34) is finite.
  bool x_huge = false;
};

// y = x @ W^T + bias against a double sum over the dequantized weight:
// |y - ref| <= 1e-6 * sum_k |x w| (float32 accumulation of <= ~1100 terms,
// with a wide margin) + the output's own rounding. The row after the last
// row of y holds sentinels that must stay.
void check_gemv(DType dt, QuantType qt, const GemvCase& c) {
  g_ctx = fmt("gemv %s %s M=%lld K=%lld N=%lld bs=%lld ldx=K+%lld bias=%d%s", dt_name(dt),
              qt_name(qt), ll(c.M), ll(c.K), ll(c.N), ll(c.bs), ll(c.ldx_pad), c.bias ? 1 : 0,
              c.x_huge ? " x=+-3e38" : "");
  const int64_t ldx = c.K + c.ldx_pad;
  std::vector<float> wf(static_cast<size_t>(c.N * c.K));
  for (auto& v : wf) v = normal(c.x_huge ? 1e-6f : 0.05f);
  const int64_t n_blocks = (c.N * c.K + c.bs - 1) / c.bs;
  // Packed rows must start 16-byte aligned (K / 2 is a multiple of 16).
  AlignedBytes packed(static_cast<size_t>((c.N * c.K + 1) / 2));
  std::vector<float> absmax(static_cast<size_t>(n_blocks));
  cpu::quantize_4bit_blocks(wf.data(), c.N * c.K, c.bs, qt, 0, n_blocks, packed.data(),
                            absmax.data());
  std::vector<float> wd(static_cast<size_t>(c.N * c.K));
  cpu::dequantize_4bit_range(packed.data(), absmax.data(), c.bs, qt, 0, c.N * c.K, wd.data());

  Buf x(dt, c.M * ldx);
  for (int64_t m = 0; m < c.M; ++m) {
    for (int64_t k = 0; k < ldx; ++k) {
      const float v = c.x_huge ? (normal() < 0 ? -3e38f : 3e38f) : normal();
      x.set(m * ldx + k, k < c.K ? v : NAN);  // pads: NaN
    }
  }
  Buf bias(dt, c.N);
  for (int64_t n = 0; n < c.N; ++n) bias.set(n, normal(0.5f));
  Buf y(dt, (c.M + 1) * c.N);
  float sentinel = 0.0f;
  for (int64_t i = 0; i < (c.M + 1) * c.N; ++i) sentinel = y.set(i, -777.0f);

  const int rc = cuda::gemv_4bit(x.data(), c.M, c.K, ldx, packed.data(), absmax.data(), c.N, c.bs,
                                 qt, c.bias ? bias.data() : nullptr, y.data(), dt, nullptr);
  CHECK(rc == 0, "status %d", rc);
  if (rc != 0) return;
  int64_t bad = 0;
  for (int64_t m = 0; m < c.M; ++m) {
    for (int64_t n = 0; n < c.N; ++n) {
      double ref = c.bias ? bias.get(n) : 0.0, mag = std::fabs(ref);
      for (int64_t k = 0; k < c.K; ++k) {
        const double t = static_cast<double>(x.get(m * ldx + k)) * wd[static_cast<size_t>(n * c.K + k)];
        ref += t;
        mag += std::fabs(t);
      }
      const double got = y.get(m * c.N + n);
      const double tol = 1e-6 * mag + unit_roundoff(dt) * std::fabs(ref) * 1.0001;
      if (!(std::fabs(got - ref) <= tol)) {
        if (++bad <= 3) CHECK(false, "y[%lld, %lld] = %.9g, ref %.9g (tol %.3g)", ll(m), ll(n), got, ref, tol);
      }
    }
  }
  CHECK(bad == 0, "%lld outputs off", ll(bad));
  int64_t touched = 0;
  for (int64_t n = 0; n < c.N; ++n) touched += y.get(c.M * c.N + n) != sentinel;
  CHECK(touched == 0, "%lld elements written past row M", ll(touched));
}

void test_gemv() {
  // K: one chunk (32) with 31 lanes idle; 24 of 32 lanes busy (768); 34
  // chunks, so lanes 0-1 take a second chunk (1088); 2 full rounds (2048).
  // N: 1 (3 warps of the CTA leave at once), 5 (a partial last CTA), 8.
  const GemvCase shapes[] = {
      {1, 32, 5, 32, 0, true},     {1, 768, 8, 64, 0, false},  {1, 1088, 5, 64, 8, true},
      {1, 2048, 3, 128, 0, true},  {2, 96, 5, 32, 0, true},    {3, 1088, 5, 64, 0, false},
      {4, 768, 1, 64, 8, true},    {5, 64, 8, 64, 16, true},   {8, 1088, 5, 64, 0, true},
      {9, 256, 5, 256, 0, false},  {13, 64, 6, 32, 8, true},   {16, 1088, 5, 64, 0, true},
      {16, 32, 1, 32, 0, false},   {7, 0, 5, 64, 0, true},
  };
  for (DType dt : kDtypes) {
    for (const GemvCase& c : shapes) check_gemv(dt, QuantType::NF4, c);
  }
  check_gemv(DType::F32, QuantType::FP4, {3, 1088, 5, 64, 0, true});
  check_gemv(DType::BF16, QuantType::FP4, {1, 768, 8, 64, 0, false});
  for (DType dt : {DType::F32, DType::BF16}) {  // fp16 cannot hold 3e38
    check_gemv(dt, QuantType::NF4, {1, 768, 8, 64, 0, true, true});
    check_gemv(dt, QuantType::NF4, {5, 1088, 5, 64, 0, false, true});
  }

  g_ctx = "gemv bad arguments";
  std::vector<float> x(64, 1.0f), y(64), absmax(8, 1.0f);
  std::vector<uint8_t> packed(64);
  auto call = [&](int64_t M, int64_t K, int64_t N, int64_t bs) {
    return cuda::gemv_4bit(x.data(), M, K, K, packed.data(), absmax.data(), N, bs, QuantType::NF4,
                           nullptr, y.data(), DType::F32, nullptr);
  };
  CHECK(call(17, 32, 1, 32) == kInvalidValue, "M = 17 accepted (kGemvMaxM = 16)");
  CHECK(call(1, 48, 1, 32) == kInvalidValue, "K = 48 accepted (K %% 32 != 0)");
  CHECK(call(1, 64, 1, 128) == kInvalidValue, "K %% blocksize != 0 accepted");
  CHECK(call(0, 64, 1, 64) == 0, "M = 0 refused");
}

// ------------------------------------------------------------- attention ---

// Rotary + cache write: q_out, k_cache and v_cache against the CPU kernel's
// scalar path (the readable definition). v is a copy: equal bits. q and k
// are float32 products of the same sin/cos: equal to a few float32 ulps, then
// rounded to the dtype (so at most one dtype ulp apart). Cache slots that no
// token writes keep their sentinel.
void check_rotary(DType dt, int64_t B, int64_t T, int64_t H, int64_t D, int64_t R, int64_t L,
                  int64_t row_pad, const std::vector<int64_t>& positions) {
  g_ctx = fmt("rotary %s B=%lld T=%lld H=%lld D=%lld R=%lld L=%lld pad=%lld", dt_name(dt), ll(B),
              ll(T), ll(H), ll(D), ll(R), ll(L), ll(row_pad));
  const float theta = 10000.0f;
  const int64_t st = H * 3 * D + row_pad, sb = T * st;
  Buf qkv(dt, B * sb);
  for (int64_t i = 0; i < B * sb; ++i) qkv.set(i, normal());
  const int64_t cache_n = B * H * L * D;
  Buf kc(dt, cache_n), vc(dt, cache_n), kc_ref(dt, cache_n), vc_ref(dt, cache_n);
  for (int64_t i = 0; i < cache_n; ++i) {
    kc.set(i, -5.0f);
    vc.set(i, -6.0f);
    kc_ref.set(i, -5.0f);
    vc_ref.set(i, -6.0f);
  }
  Buf q(dt, B * T * H * D), q_ref(dt, B * T * H * D);
  cpu::rotary_kv_cache_tokens(qkv.data(), dt, T, sb, st, positions.data(), H, D, L, R, theta,
                              kc_ref.data(), vc_ref.data(), q_ref.data(), 0, B * T, Isa::Scalar);
  const int rc = cuda::rotary_kv_cache(qkv.data(), dt, B, T, sb, st, positions.data(), H, D, L, R,
                                       theta, kc.data(), vc.data(), q.data(), nullptr);
  CHECK(rc == 0, "status %d", rc);
  // Within one ulp of the dtype (float32: 4 ulps) of the CPU's value.
  auto close = [&](float a, float b) {
    const double tol = (dt == DType::F32 ? 4.0 : 2.0) * unit_roundoff(dt) * std::max(std::fabs(a), 1e-3f);
    return std::fabs(static_cast<double>(a) - b) <= tol;
  };
  int64_t bad_q = 0, bad_k = 0, bad_v = 0;
  for (int64_t i = 0; i < B * T * H * D; ++i) bad_q += !close(q.get(i), q_ref.get(i));
  for (int64_t i = 0; i < cache_n; ++i) {
    bad_k += !close(kc.get(i), kc_ref.get(i));
    bad_v += !vc.same_bits(vc_ref, i);
  }
  CHECK(bad_q == 0, "%lld of q differ", ll(bad_q));
  CHECK(bad_k == 0, "%lld of k_cache differ (incl. slots that must stay unwritten)", ll(bad_k));
  CHECK(bad_v == 0, "%lld of v_cache differ (incl. slots that must stay unwritten)", ll(bad_v));
}

void test_rotary() {
  for (DType dt : kDtypes) {
    // Left padding (-1), positions at 0 and L - 1, one past the cache (q
    // rotated, nothing written).
    check_rotary(dt, 2, 3, 2, 8, 8, 6, 0, {-1, 0, 1, 4, 5, 6});
    check_rotary(dt, 1, 2, 3, 80, 20, 40, 5, {17, 39});  // head_dim 80, rotary 20
    check_rotary(dt, 2, 1, 2, 64, 16, 9, 3, {8, 2});
    check_rotary(dt, 1, 1, 1, 256, 64, 3000, 0, {2047});
    check_rotary(dt, 1, 2, 2, 6, 0, 4, 0, {0, 3});  // no rotary at all, D not a multiple of 8
    check_rotary(dt, 1, 1, 1, 200, 200, 2, 1, {1});  // H * D > threads of the CTA
  }
  g_ctx = "rotary bad arguments";
  float buf[64] = {};
  int64_t pos[1] = {0};
  CHECK(cuda::rotary_kv_cache(buf, DType::F32, 1, 1, 24, 24, pos, 1, 8, 4, 9, 10000.0f, buf, buf,
                              buf, nullptr) == kInvalidValue,
        "rotary_ndims > D accepted");
  CHECK(cuda::rotary_kv_cache(buf, DType::F32, 1, 1, 24, 24, pos, 1, 8, 4, 3, 10000.0f, buf, buf,
                              buf, nullptr) == kInvalidValue,
        "odd rotary_ndims accepted");
  std::vector<float> big(3 * 300);
  CHECK(cuda::rotary_kv_cache(big.data(), DType::F32, 1, 1, 900, 900, pos, 1, 300, 1, 258,
                              10000.0f, big.data(), big.data(), big.data(), nullptr) == kInvalidValue,
        "rotary_ndims > kAttnMaxHeadDim accepted (its inv_freq would not fit the kernel argument)");
}

// Decode attention: against the CPU kernel's scalar path (one pass, online
// softmax) and so, through it, against its naive references. Both sum in
// float32 in different orders: |out - cpu| <= 1e-5 * max |v| + the output's
// rounding (one dtype ulp).
// poison_unseen: the slots of sequence b past all its positions hold NaN, as
// an earlier request may have left them; no query may read them (the CPU
// twin does not, and 0 * NaN in the kernel would show in the comparison).
// neg_inf_prefix > 0: every query's score is -inf for slots 0 .. neg_inf_prefix - 1
// (q[0] = 1, k[0] = -inf there): a query that sees only those is NaN (torch's
// softmax of all -inf), one that sees more attends to the rest alone.
void check_decode(DType dt, int64_t B, int64_t T, int64_t H, int64_t D, int64_t L,
                  const std::vector<int64_t>& positions, bool poison_unseen = false,
                  int64_t neg_inf_prefix = 0) {
  g_ctx = fmt("decode %s B=%lld T=%lld H=%lld D=%lld L=%lld%s%s", dt_name(dt), ll(B), ll(T), ll(H),
              ll(D), ll(L), poison_unseen ? " NaN past the positions" : "",
              neg_inf_prefix ? " -inf scores first" : "");
  const int64_t rows = B * T * H, cache_n = B * H * L * D;
  Buf q(dt, rows * D), kc(dt, cache_n), vc(dt, cache_n);
  for (int64_t i = 0; i < rows * D; ++i) q.set(i, normal());
  float vmax = 0.0f;
  for (int64_t i = 0; i < cache_n; ++i) {
    kc.set(i, normal());
    vmax = std::max(vmax, std::fabs(vc.set(i, normal())));
  }
  if (poison_unseen) {
    for (int64_t b = 0; b < B; ++b) {
      int64_t last = -1;
      for (int64_t t = 0; t < T; ++t) last = std::max(last, positions[b * T + t]);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t j = last + 1; j < L; ++j)
          for (int64_t d = 0; d < D; ++d) {
            kc.set(((b * H + h) * L + j) * D + d, NAN);
            vc.set(((b * H + h) * L + j) * D + d, NAN);
          }
    }
  }
  for (int64_t r = 0; r < rows && neg_inf_prefix > 0; ++r) q.set(r * D, 1.0f);
  for (int64_t bh = 0; bh < B * H; ++bh)
    for (int64_t j = 0; j < std::min(neg_inf_prefix, L); ++j) kc.set((bh * L + j) * D, -INFINITY);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  Buf out(dt, rows * D + 1), ref(dt, rows * D);
  const float sentinel = out.set(rows * D, 4321.0f);
  cpu::decode_attention_rows(q.data(), kc.data(), vc.data(), dt, positions.data(), T, H, L, D,
                             scale, ref.data(), 0, rows, Isa::Scalar);
  std::vector<float> workspace(static_cast<size_t>(cuda::decode_attention_workspace(rows, L, D)));
  const int rc = cuda::decode_attention(q.data(), kc.data(), vc.data(), dt, positions.data(), B, T,
                                        H, L, D, scale, workspace.data(), out.data(), nullptr);
  CHECK(rc == 0, "status %d", rc);
  int64_t bad = 0;
  for (int64_t i = 0; i < rows * D; ++i) {
    const double a = out.get(i), b = ref.get(i);
    if (neg_inf_prefix > 0) {
      const int64_t pos = positions[i / (H * D)];
      const bool all_neg_inf = pos >= 0 && pos < neg_inf_prefix;
      CHECK(std::isnan(b) == all_neg_inf, "cpu out[%lld] = %g at position %lld", ll(i), b, ll(pos));
      if (all_neg_inf && std::isnan(a)) continue;
    }
    const double tol = 1e-5 * vmax + 2.0 * unit_roundoff(dt) * std::fabs(b);
    if (!(std::fabs(a - b) <= tol)) {
      if (++bad <= 3) CHECK(false, "out[%lld] = %.8g, cpu %.8g", ll(i), a, b);
    }
  }
  CHECK(bad == 0, "%lld of out differ", ll(bad));
  CHECK(out.get(rows * D) == sentinel, "wrote past out");
}

void test_decode() {
  for (DType dt : kDtypes) {
    // Every head dim of the suite (and 8), a cache shorter than one split.
    for (int64_t D : {8, 32, 64, 80, 128, 256}) check_decode(dt, 1, 1, 2, D, 5, {4});
    // Around the 128-key split: positions ending on, just past and just
    // before a split; padding (-1) rows give zeros; a position past the cache
    // attends to all L slots.
    check_decode(dt, 2, 2, 2, 64, 300, {127, 128, -1, 299});
    check_decode(dt, 3, 1, 1, 80, 129, {0, 128, 500});
    check_decode(dt, 2, 1, 1, 32, 40, {INT64_MAX, 39});  // pos + 1 would overflow
    check_decode(dt, 1, 3, 2, 128, 256, {126, 255, 129});
    // Stale NaN past the positions: inside a split and in splits past it.
    check_decode(dt, 2, 2, 2, 64, 300, {3, 130, -1, 0}, true);
    check_decode(dt, 1, 1, 1, 80, 129, {127}, true);
    // -inf scores in the first split (128 keys) and into the second: a split
    // of only -inf scores drops out, a query seeing nothing else is NaN, a
    // padding query still zeros.
    check_decode(dt, 2, 2, 2, 64, 300, {100, 139, -1, 250}, false, 140);
  }
  g_ctx = "decode bad arguments";
  std::vector<float> buf(4096, 0.0f);
  std::vector<float> ws(4096);
  int64_t pos[1] = {0};
  auto call = [&](int64_t D, const float* cache) {
    return cuda::decode_attention(buf.data(), cache, cache, DType::F32, pos, 1, 1, 1, 4, D, 1.0f,
                                  ws.data(), buf.data(), nullptr);
  };
  CHECK(call(12, buf.data()) == kInvalidValue, "D = 12 accepted (D %% 8 != 0)");
  CHECK(call(264, buf.data()) == kInvalidValue, "D = 264 accepted (> 256)");
  CHECK(call(8, buf.data() + 1) == kInvalidValue, "a cache off 16-byte alignment accepted");
}

// ------------------------------------------------------------ emulation ---
// The emulation must refuse what a GPU would not run correctly, or the
// kernel tests above prove less than they say: each broken kernel below has
// to abort (in a child process), each bad launch configuration has to be
// refused without running the kernel.

namespace broken {
__global__ void sync_after_return(int* out) {
  if (threadIdx.x == 5) return;  // thread 5 never reaches the barrier
  __syncthreads();
  out[threadIdx.x] = 1;
}
__global__ void shuffle_after_lane_return(float* out) {
  if (threadIdx.x % 32 == 3) return;  // lane 3 is missing from the shuffle
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}
__global__ void shuffle_in_partial_warp(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);  // launched with 48 threads
}
__global__ void misaligned_vector_load(const float* p, float* out) {
  out[threadIdx.x] = __ldg(reinterpret_cast<const float4*>(p + 1)).x;  // p + 4 bytes
}
__global__ void different_barriers(float* out) {
  // Lanes 0-15 wait at the block barrier, lanes 16-31 of the same warp at a
  // shuffle that needs lanes 0-15 too: neither barrier completes.
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
    __syncthreads();
  }
}
__global__ void writes_one(int* out) { out[threadIdx.x + blockIdx.x * blockDim.x] = 1; }
}  // namespace broken

// Runs f in a child process; true if the child died of SIGABRT.
bool aborts(void (*f)()) {
  std::fflush(nullptr);
  const pid_t pid = fork();
  if (pid == 0) {
    const int devnull = open("/dev/null", O_WRONLY);  // the child's message is expected
    if (devnull >= 0) dup2(devnull, 2);
    pn_emu::g_barrier_timeout_s = 1;
    f();
    _exit(0);
  }
  int status = 0;
  if (pid < 0 || waitpid(pid, &status, 0) != pid) return false;
  return WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT;
}

void test_emulation_is_strict() {
  g_ctx = "emulation";
  CHECK(aborts([] {
          std::vector<int> out(64);
          pn_emu::Launch(1, 64).run(broken::sync_after_return, out.data());
        }),
        "__syncthreads after a thread returned did not abort");
  CHECK(aborts([] {
          std::vector<float> out(64);
          pn_emu::Launch(1, 64).run(broken::shuffle_after_lane_return, out.data());
        }),
        "a shuffle missing a returned lane did not abort");
  CHECK(aborts([] {
          std::vector<float> out(48);
          pn_emu::Launch(1, 48).run(broken::shuffle_in_partial_warp, out.data());
        }),
        "a full-mask shuffle in a partial warp did not abort");
  CHECK(aborts([] {
          std::vector<float> in(16), out(32);
          pn_emu::Launch(1, 32).run(broken::misaligned_vector_load, in.data(), out.data());
        }),
        "a misaligned 16-byte load did not abort");
  CHECK(aborts([] {
          std::vector<float> out(64);
          pn_emu::Launch(1, 64).run(broken::different_barriers, out.data());
        }),
        "threads waiting at different barriers did not abort");
  // Launch configurations the runtime refuses: the kernel must not run.
  std::vector<int> out(4096, 0);
  const dim3 bad[][2] = {{dim3(1), dim3(1025)}, {dim3(0), dim3(32)}, {dim3(1, 65536), dim3(32)},
                         {dim3(1), dim3(0)}};
  for (const auto& cfg : bad) {
    pn_emu::Launch(cfg[0], cfg[1]).run(broken::writes_one, out.data());
    CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration,
          "grid (%u, %u) block (%u) was not refused", cfg[0].x, cfg[0].y, cfg[1].x);
  }
  CHECK(std::count(out.begin(), out.end(), 1) == 0, "a refused launch ran its kernel");
  pn_emu::Launch(3, 7).run(broken::writes_one, out.data());  // a valid one runs every thread
  CHECK(cudaGetLastError() == cudaSuccess && std::count(out.begin(), out.end(), 1) == 21,
        "a 3 x 7 launch wrote %lld elements", ll(std::count(out.begin(), out.end(), 1)));
}

// ---------------------------------------------------------------- gelu ---

// The CUDA GELU (x * normcdff(x)) against the CPU kernel (the erf-series /
// erfc formulas of cpu/activation.cpp, within a few ulp of float64 for
// x > -3 and 1e-5 relative below): per element |gpu - cpu| <= 2e-5 |cpu|
// plus two roundings of the storage dtype, + 1e-37 for the flushed tail;
// specials exactly (+inf, -inf -> NaN, NaN). In place (y == x) too; nothing
// written past n.
void test_gelu() {
  for (DType dt : kDtypes) {
    for (int64_t n : {1, 7, 256, 257, 5000}) {
      for (bool in_place : {false, true}) {
        g_ctx = fmt("gelu %s n=%lld%s", dt_name(dt), ll(n), in_place ? " in place" : "");
        Buf x(dt, n);
        for (int64_t i = 0; i < n; ++i) x.set(i, normal(4.0f));
        if (n >= 256) {
          const float specials[] = {INFINITY, -INFINITY, NAN, 0.0f, -20.0f, 20.0f, -5.5f, 1e-30f};
          for (int i = 0; i < 8; ++i) x.set(100 + i, specials[i]);
        }
        Buf want(dt, n);
        cpu::gelu_range(x.data(), want.data(), dt, 0, n, Isa::Scalar);
        Buf out(dt, n + 1);
        const float sentinel = out.set(n, 12345.0f);
        if (in_place) std::memcpy(out.data(), x.data(), static_cast<size_t>(n * pn::dtype_size(dt)));
        const int rc = cuda::gelu(in_place ? out.data() : x.data(), out.data(), dt, n, nullptr);
        CHECK(rc == 0, "status %d", rc);
        int64_t bad = 0, first = -1;
        for (int64_t i = 0; i < n; ++i) {
          const double g = out.get(i), c = want.get(i);
          const bool ok = std::isnan(c) ? std::isnan(g)
                          : std::isinf(c) ? g == c
                                          : std::fabs(g - c) <= (2e-5 + 2 * unit_roundoff(dt)) *
                                                                        std::fabs(c) + 1e-37;
          if (!ok) {
            if (first < 0) first = i;
            ++bad;
          }
        }
        CHECK(bad == 0, "%lld elements differ, first %lld: x %g, gpu %g vs cpu %g", ll(bad),
              ll(first), first >= 0 ? x.get(first) : 0.0, first >= 0 ? out.get(first) : 0.0,
              first >= 0 ? want.get(first) : 0.0);
        CHECK(out.get(n) == sentinel, "wrote past n: %g", out.get(n));
      }
    }
  }
  g_ctx = "gelu bad arguments";
  float o[1];
  CHECK(cuda::gelu(o, o, DType::F32, 0, nullptr) == 0, "n = 0 is not a no-op");
  CHECK(cuda::gelu(o, o, DType::F32, -1, nullptr) == kInvalidValue, "n = -1 accepted");
  CHECK(cuda::gelu(o, o, static_cast<DType>(9), 1, nullptr) == kInvalidValue, "dtype 9 accepted");
}

}  // namespace

int main() {
  test_emulation_is_strict();
  test_quantize();
  test_dequantize();
  test_gemv();
  test_rotary();
  test_decode();
  test_gelu();
  return summary();
}
