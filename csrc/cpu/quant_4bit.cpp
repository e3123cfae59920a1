// CPU quantize / dequantize of the bitsandbytes 4-bit format, and the run-time
// choice of instruction set shared by every CPU kernel.
//
// quantize_4bit_blocks reproduces bitsandbytes' CPU quantizer operation by
// operation (codebook.h says which), so NF4 bytes are identical to it. It is a
// load-time op: scalar code, threaded over blocks by the caller.
#include <atomic>
#include <cmath>
#include <stdexcept>

#include "common/kernels.h"

namespace pythia_native {
namespace cpu {

namespace {

Isa detect_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // gcc's checks include the OS (XCR0) support for the wider registers.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return __builtin_cpu_supports("avx512bf16") ? Isa::AVX512_BF16 : Isa::AVX512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::AVX2;
#endif
  return Isa::Scalar;
}

std::atomic<int32_t>& active_isa_slot() {
  static std::atomic<int32_t> slot{static_cast<int32_t>(detect_isa())};
  return slot;
}

}  // namespace

Isa best_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

Isa active_isa() { return static_cast<Isa>(active_isa_slot().load(std::memory_order_relaxed)); }

void set_isa(Isa isa) {
  if (static_cast<int32_t>(isa) > static_cast<int32_t>(best_isa())) {
    throw std::invalid_argument(std::string("this CPU does not support ") + isa_name(isa) +
                                " (best available: " + isa_name(best_isa()) + ")");
  }
  active_isa_slot().store(static_cast<int32_t>(isa), std::memory_order_relaxed);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::AVX512_BF16: return "avx512_bf16";
    case Isa::AVX512: return "avx512";
    case Isa::AVX2: return "avx2";
    default: return "scalar";
  }
}

int64_t chunk_elems(Isa isa) {
  switch (isa) {
    case Isa::AVX512_BF16:
    case Isa::AVX512: return 32;
    case Isa::AVX2: return 16;
    default: return 2;
  }
}

void quantize_4bit_blocks(const float* w, int64_t numel, int64_t blocksize, QuantType qt,
                          int64_t b0, int64_t b1, uint8_t* packed, float* absmax) {
  const QuantBounds qb = make_quant_bounds(qt);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * blocksize;
    const int64_t end = std::min(numel, start + blocksize);
    const bool full = (end - start) == blocksize;
    // max |w| over the block; NaN propagates as in torch.max.
    float a = 0.0f;
    for (int64_t e = start; e < end; ++e) {
      const float v = std::fabs(w[e]);
      if (v > a || v != v) a = v;
      if (a != a) break;
    }
    // `a < floor ? floor : a` rather than fmaxf, which would drop a NaN.
    const float floored = a < kAbsmaxFloor ? kAbsmaxFloor : a;
    float recip = 0.0f;
    if (full) {
      absmax[b] = a;
      recip = 1.0f / floored;
    } else {
      absmax[b] = floored;
    }
    auto index_of = [&](int64_t e) -> uint8_t {
      const float s = full ? clamp_unit(w[e] * recip) : clamp_unit(w[e] / floored);
      return quantize_scaled(s, qb);
    };
    // Blocks start on even elements (blocksize is even), so byte e/2 is ours.
    // An odd numel pads the last low nibble with the code of 0.0 (bitsandbytes
    // pads the scaled values with zeros before rounding): 7 in NF4, 0 in FP4.
    const uint8_t pad = quantize_scaled(0.0f, qb);
    for (int64_t e = start; e < end; e += 2) {
      const uint8_t hi = index_of(e);
      const uint8_t lo = (e + 1 < end) ? index_of(e + 1) : pad;
      packed[e >> 1] = static_cast<uint8_t>((hi << 4) | lo);
    }
  }
}

void dequantize_4bit_range(const uint8_t* packed, const float* absmax, int64_t blocksize,
                           QuantType qt, int64_t e0, int64_t e1, float* out) {
  const float* code = code_table(qt);
  for (int64_t e = e0; e < e1; ++e) {
    const uint8_t byte = packed[e >> 1];
    const uint8_t idx = (e & 1) ? (byte & 0xF) : (byte >> 4);
    out[e - e0] = code[idx] * absmax[e / blocksize];
  }
}

}  // namespace cpu
}  // namespace pythia_native
