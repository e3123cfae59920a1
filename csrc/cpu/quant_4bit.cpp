// CPU quantize / dequantize of the bitsandbytes 4-bit format, and the run-time
// choice of instruction set shared by every CPU kernel.
//
// quantize_4bit_blocks reproduces bitsandbytes' CPU quantizer operation by
// operation (codebook.h says which), so NF4 bytes are identical to it: an
// AVX-512 path for full blocks, the scalar rule for partial / NaN blocks and
// other CPUs; threaded over blocks by the caller. dequantize_4bit_range has
// AVX-512 and AVX2 paths for whole 32-element chunks, bit-identical to its
// scalar loop.
// gcc 12's AVX-512 headers trip -Wmaybe-uninitialized inside their own
// undefined-vector placeholders (as in gemm_4bit.cpp): a known false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <atomic>
#include <cmath>
#include <stdexcept>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/kernels.h"
#include "common/simd_x86.h"

namespace pythia_native {
namespace cpu {

namespace {

Isa detect_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // gcc's checks include the OS (XCR0) support for the wider registers.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Isa::AVX512;
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
    case Isa::AVX512: return "avx512";
    case Isa::AVX2: return "avx2";
    default: return "scalar";
  }
}

int64_t chunk_elems(Isa isa) {
  switch (isa) {
    case Isa::AVX512: return 32;
    case Isa::AVX2: return 32;
    default: return 2;
  }
}

#if defined(__x86_64__)
#define PN_AVX512_Q __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

// One full block, 16 elements a step, with the scalar path's exact arithmetic:
// s = w * recip (one float32 multiply), clamp to [-1, 1] (a NaN s comes only
// from an inf block, inf * (1 / inf = 0); blocks with a NaN input go to the
// scalar path), sorted position p = #{i : bounds[i] < s or s NaN} by 15
// compares, code index = order[p] by vpermd.
// Returns false (nothing written) when the block holds a NaN.
// Why: the scalar loop does 15 dependent compare-adds per element (~25 ns per
// element); loading a 1.4b checkpoint spent ~24 s here.
PN_AVX512_Q bool quantize_block_avx512(const float* w, int64_t bs, const QuantBounds& qb,
                                       uint8_t* packed, float* absmax_out) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  __m512 amax = _mm512_setzero_ps();
  for (int64_t e = 0; e < bs; e += 16) {
    const __m512 v = _mm512_loadu_ps(w + e);
    if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) return false;
    amax = _mm512_max_ps(amax, _mm512_andnot_ps(sign, v));
  }
  const float a = _mm512_reduce_max_ps(amax);
  const float floored = a < kAbsmaxFloor ? kAbsmaxFloor : a;
  *absmax_out = a;
  const __m512 recip = _mm512_set1_ps(1.0f / floored);
  const __m512 lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f);
  __m512 bounds[15];
  for (int i = 0; i < 15; ++i) bounds[i] = _mm512_set1_ps(qb.bounds[i]);
  alignas(64) int32_t order32[16];
  for (int i = 0; i < 16; ++i) order32[i] = qb.order[i];
  const __m512i order = _mm512_load_si512(order32);
  const __m512i one = _mm512_set1_epi32(1);
  for (int64_t e = 0; e < bs; e += 16) {
    __m512 s = _mm512_mul_ps(_mm512_loadu_ps(w + e), recip);
    s = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s, lo, _CMP_LT_OQ), s, lo);
    s = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s, hi, _CMP_GT_OQ), s, hi);
    __m512i p = _mm512_setzero_si512();
    for (int i = 0; i < 15; ++i) {
      // bounds[i] < s, or s NaN (quantize_scaled's rule: an inf block's inf * 0)
      p = _mm512_mask_add_epi32(p, _mm512_cmp_ps_mask(bounds[i], s, _CMP_NGE_UQ), p, one);
    }
    const __m512i idx = _mm512_permutexvar_epi32(p, order);  // 16 code indices
    // Pairs (2j, 2j+1) -> byte j = idx[2j] << 4 | idx[2j+1]: as 16-bit lanes of
    // the 16 bytes, the even element is the low byte.
    const __m128i b = _mm512_cvtepi32_epi8(idx);
    const __m128i pairs = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x0F)), 4),
                                       _mm_srli_epi16(b, 8));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(packed + e / 2), _mm_packus_epi16(pairs, pairs));
  }
  return true;
}
#endif

void quantize_4bit_blocks(const float* w, int64_t numel, int64_t blocksize, QuantType qt,
                          int64_t b0, int64_t b1, uint8_t* packed, float* absmax) {
  const QuantBounds qb = make_quant_bounds(qt);
#if defined(__x86_64__)
  const bool vec = active_isa() >= Isa::AVX512 && blocksize % 16 == 0;
#endif
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * blocksize;
    const int64_t end = std::min(numel, start + blocksize);
    const bool full = (end - start) == blocksize;
#if defined(__x86_64__)
    if (vec && full && quantize_block_avx512(w + start, blocksize, qb, packed + start / 2, absmax + b)) continue;
#endif
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

namespace {

// out[e - e0] = code[index of e] * absmax[e / blocksize], one element at a time.
void dequantize_scalar(const uint8_t* packed, const float* absmax, int64_t blocksize,
                       QuantType qt, int64_t e0, int64_t e1, float* out) {
  const float* code = code_table(qt);
  for (int64_t e = e0; e < e1; ++e) {
    const uint8_t byte = packed[e >> 1];
    const uint8_t idx = (e & 1) ? (byte & 0xF) : (byte >> 4);
    out[e - e0] = code[idx] * absmax[e / blocksize];
  }
}

// The vector versions take whole chunks of 32 elements starting at a multiple
// of 32 (so one block each: blocksize >= 32 is a power of two) and compute
// the same float32 product, so their output is bit-identical to the scalar
// loop's. 16 bytes -> 16 high and 16 low nibbles looked up in the code table,
// then interleaved back into element order.
#if defined(__x86_64__)
PN_AVX512_Q void dequantize_chunks_avx512(const uint8_t* packed, const float* absmax,
                                          int64_t blocksize, QuantType qt, int64_t c0,
                                          int64_t c1, float* out) {
  const __m512 table = _mm512_loadu_ps(code_table(qt));
  // Outputs 0-15 take hi[0], lo[0], hi[1], lo[1], ...; 16-31 the same from 8.
  const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second =
      _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int64_t e = c0; e < c1; e += 32) {
    const __m512i bytes =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + e / 2)));
    // vpermps reads the low 4 bits of each index: the low nibble needs no mask.
    const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
    const __m512 lo = _mm512_permutexvar_ps(bytes, table);
    const __m512 scale = _mm512_set1_ps(absmax[e / blocksize]);
    _mm512_storeu_ps(out + (e - c0), _mm512_mul_ps(_mm512_permutex2var_ps(hi, first, lo), scale));
    _mm512_storeu_ps(out + (e - c0) + 16,
                     _mm512_mul_ps(_mm512_permutex2var_ps(hi, second, lo), scale));
  }
}

#define PN_AVX2_Q __attribute__((target("avx2,fma")))

PN_AVX2_Q void dequantize_chunks_avx2(const uint8_t* packed, const float* absmax,
                                      int64_t blocksize, QuantType qt, int64_t c0, int64_t c1,
                                      float* out) {
  const __m256 tlo = _mm256_loadu_ps(code_table(qt));
  const __m256 thi = _mm256_loadu_ps(code_table(qt) + 8);
  const __m256i low4 = _mm256_set1_epi32(0xF);
  for (int64_t e = c0; e < c1; e += 16) {
    const __m256i bytes =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + e / 2)));
    // lookup8 reads bit 3 through the sign: both nibbles need their bits above cleared.
    const __m256 hi = lookup8(_mm256_srli_epi32(bytes, 4), tlo, thi);
    const __m256 lo = lookup8(_mm256_and_si256(bytes, low4), tlo, thi);
    const __m256 scale = _mm256_set1_ps(absmax[e / blocksize]);
    const __m256 a = _mm256_unpacklo_ps(hi, lo);  // h0 l0 h1 l1 | h4 l4 h5 l5
    const __m256 b = _mm256_unpackhi_ps(hi, lo);  // h2 l2 h3 l3 | h6 l6 h7 l7
    _mm256_storeu_ps(out + (e - c0), _mm256_mul_ps(_mm256_permute2f128_ps(a, b, 0x20), scale));
    _mm256_storeu_ps(out + (e - c0) + 8, _mm256_mul_ps(_mm256_permute2f128_ps(a, b, 0x31), scale));
  }
}
#endif

}  // namespace

void dequantize_4bit_range(const uint8_t* packed, const float* absmax, int64_t blocksize,
                           QuantType qt, int64_t e0, int64_t e1, float* out) {
  // Scalar up to the first multiple of 32, whole chunks vectorized, scalar tail.
  const int64_t c0 = std::min(e1, (e0 + 31) / 32 * 32);
  const int64_t c1 = c0 + (e1 - c0) / 32 * 32;
  dequantize_scalar(packed, absmax, blocksize, qt, e0, c0, out);
  const Isa isa = active_isa();
#if defined(__x86_64__)
  if (isa == Isa::AVX512) {
    dequantize_chunks_avx512(packed, absmax, blocksize, qt, c0, c1, out + (c0 - e0));
  } else if (isa == Isa::AVX2) {
    dequantize_chunks_avx2(packed, absmax, blocksize, qt, c0, c1, out + (c0 - e0));
  } else {
    dequantize_scalar(packed, absmax, blocksize, qt, c0, c1, out + (c0 - e0));
  }
#else
  (void)isa;
  dequantize_scalar(packed, absmax, blocksize, qt, c0, c1, out + (c0 - e0));
#endif
  dequantize_scalar(packed, absmax, blocksize, qt, c1, e1, out + (c1 - e0));
}

}  // namespace cpu
}  // namespace pythia_native
