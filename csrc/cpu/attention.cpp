// CPU kernels of rotary_kv_cache_ and decode_attention (torch-free; the API
// and the shapes are in common/attention_kernels.h).
//
// rotary_kv_cache_tokens  scalar: it touches each element of qkv once (3*H*D
//     per token) and does ~2 FLOPs per element plus rotary_ndims/2 sincos per
//     token; at decode it is ~1% of the attention's traffic, so no ISA versions.
//
// decode_attention_rows   one (b, t, h) row at a time, one pass over the keys:
//     per block of kKeyBlock keys, scores s_j = (q . k_j) * scale (vectorized
//     over D), then the online-softmax update (running max m, running sum l,
//     rescale of the accumulator by exp(m_old - m_new)), then acc += p_j * v_j
//     (vectorized over D). Versions, chosen by the isa argument:
//       avx512  16 float32 lanes; masked loads for D % 16 == 8, so any
//               D % 8 == 0 needs no tail loop
//       avx2    8 float32 lanes (D % 8 == 0 by contract); F16C for fp16
//       scalar  the portable fallback and the readable definition
//     bf16/fp16 caches are widened to float32 in registers (bf16: a 16-bit
//     shift; fp16: vcvtph2ps), never copied.
//
// Napkin math, pythia-160m decode (H = 12, D = 64, L = 2048, fp32, T = 1):
// K + V are 2 * 12 * 2048 * 64 * 4 B = 12.6 MB per layer and token, ~25 FLOPs
// per 8 bytes: bound by memory bandwidth (or, from L2/L3, by the load ports),
// not by the FMAs. Each K/V byte is read exactly once; the exps (one per key)
// are scalar libm calls, ~2-4% of the time at D = 64.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/attention_kernels.h"

namespace pythia_native {
namespace cpu {

namespace {

// ---------------------------------------------------- element conversions ---
// Scalar, exact (to float) or round-to-nearest-even (from float), for the
// three storage types; the vector kernels widen in registers instead.

struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

inline float to_f32(float v) { return v; }
inline float to_f32(Bf16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_f32(F16 v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1fu;
  const uint32_t mant = v.bits & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (mant << 13);  // normal: rebias 15 -> 127
  } else {
    // zero or subnormal: mant * 2^-24, exact in float32
    const float f = static_cast<float>(mant) * 5.9604644775390625e-08f;
    std::memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
inline T from_f32(float f);
template <>
inline float from_f32<float>(float f) {
  return f;
}
template <>
inline Bf16 from_f32<Bf16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return Bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return Bf16{static_cast<uint16_t>(u >> 16)};
}
template <>
inline F16 from_f32<F16>(float f) {
  // Round to nearest even (F. Giesen's float_to_half_fast3_rtne).
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  uint16_t o;
  if (u >= (143u << 23)) {  // >= 65536 (or inf / nan): overflows to inf
    o = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < (113u << 23)) {  // below 2^-14: fp16 subnormal or zero
    float a;
    std::memcpy(&a, &u, 4);
    a += 0.5f;  // aligns the 10 mantissa bits at the bottom; the FPU rounds
    uint32_t r;
    std::memcpy(&r, &a, 4);
    o = static_cast<uint16_t>(r - 0x3f000000u);
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mant_odd;
    o = static_cast<uint16_t>(u >> 13);
  }
  return F16{static_cast<uint16_t>(o | sign)};
}

// ------------------------------------------------------------------ rotary ---

template <typename T>
void rotary_tokens(const T* qkv, int64_t T_, int64_t sb, int64_t st, const int64_t* positions,
                   int64_t H, int64_t D, int64_t L, int64_t R, float theta, T* kc, T* vc,
                   T* q_out, int64_t i0, int64_t i1) {
  const int64_t half = R / 2;
  float inv_freq[kAttnMaxHeadDim / 2 + 1];
  float cos_[kAttnMaxHeadDim / 2 + 1], sin_[kAttnMaxHeadDim / 2 + 1];
  // As reference.rope_inv_freq: float32 exponent 2j / R, powf, reciprocal.
  for (int64_t j = 0; j < half; ++j) {
    inv_freq[j] = 1.0f / std::pow(theta, static_cast<float>(2 * j) / static_cast<float>(R));
  }
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / T_, t = i % T_;
    const int64_t pos = positions[i];
    const T* x = qkv + b * sb + t * st;
    T* qo = q_out + i * H * D;
    if (pos < 0) {  // padding: q as it is, nothing written
      for (int64_t h = 0; h < H; ++h) std::copy(x + h * 3 * D, x + h * 3 * D + D, qo + h * D);
      continue;
    }
    for (int64_t j = 0; j < half; ++j) {
      const float ang = static_cast<float>(pos) * inv_freq[j];
      cos_[j] = std::cos(ang);
      sin_[j] = std::sin(ang);
    }
    // rotate-half: out[j] = x[j] cos - x[j + half] sin, out[j + half] =
    // x[j + half] cos + x[j] sin, j < half; dims >= R pass through.
    auto rotate = [&](const T* src, T* dst) {
      for (int64_t j = 0; j < half; ++j) {
        const float x1 = to_f32(src[j]), x2 = to_f32(src[j + half]);
        dst[j] = from_f32<T>(x1 * cos_[j] - x2 * sin_[j]);
        dst[j + half] = from_f32<T>(x2 * cos_[j] + x1 * sin_[j]);
      }
      std::copy(src + R, src + D, dst + R);
    };
    const bool in_cache = pos < L;  // the entry point refuses pos >= L; never write past L
    for (int64_t h = 0; h < H; ++h) {
      const T* xh = x + h * 3 * D;
      rotate(xh, qo + h * D);
      if (in_cache) {
        const int64_t slot = ((b * H + h) * L + pos) * D;
        rotate(xh + D, kc + slot);
        std::copy(xh + 2 * D, xh + 3 * D, vc + slot);
      }
    }
  }
}

// ------------------------------------------------------- decode attention ---

// Keys per online-softmax step. The accumulator (D floats) is loaded, rescaled
// and stored once per block instead of once per key, and the exp/max
// bookkeeping runs on a block of scores in L1; 16 keys of V (<= 16 KB at
// D = 256, fp32) stay in L1 across the accumulate loop's D-chunks.
constexpr int64_t kKeyBlock = 16;

// s[j] = scale * (q . k[j * D : (j + 1) * D]) for j < n; acc = acc * alpha +
// sum_j p[j] * v[j * D : ...]. q and acc are float32 [D].
template <typename T>
void scores_scalar(const float* q, const T* k, int64_t D, int64_t n, float scale, float* s) {
  for (int64_t j = 0; j < n; ++j) {
    float dot = 0.0f;
    for (int64_t d = 0; d < D; ++d) dot += q[d] * to_f32(k[j * D + d]);
    s[j] = dot * scale;
  }
}

template <typename T>
void accumulate_scalar(const float* p, const T* v, int64_t D, int64_t n, float alpha,
                       float* acc) {
  for (int64_t d = 0; d < D; ++d) {
    float a = acc[d] * alpha;
    for (int64_t j = 0; j < n; ++j) a += p[j] * to_f32(v[j * D + d]);
    acc[d] = a;
  }
}

#define PN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

// 16 elements at p -> 16 floats; lanes outside `mask` read nothing and are 0.
PN_AVX512 inline __m512 load16(const float* p, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, p);
}
PN_AVX512 inline __m512 load16(const Bf16* p, __mmask16 mask) {
  // bf16 is the top half of a float32: widen to 32 bits and shift up.
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
PN_AVX512 inline __m512 load16(const F16* p, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
}

// Four keys per pass: four independent FMA chains hide the FMA latency and
// share each q load.
template <typename T>
PN_AVX512 void scores_avx512(const float* q, const T* k, int64_t D, int64_t n, float scale,
                             float* s) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const T* k0 = k + j * D;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = D - d >= 16 ? __mmask16(0xffff) : __mmask16((1u << (D - d)) - 1);
      const __m512 qv = _mm512_maskz_loadu_ps(m, q + d);
      a0 = _mm512_fmadd_ps(qv, load16(k0 + d, m), a0);
      a1 = _mm512_fmadd_ps(qv, load16(k0 + D + d, m), a1);
      a2 = _mm512_fmadd_ps(qv, load16(k0 + 2 * D + d, m), a2);
      a3 = _mm512_fmadd_ps(qv, load16(k0 + 3 * D + d, m), a3);
    }
    s[j] = _mm512_reduce_add_ps(a0) * scale;
    s[j + 1] = _mm512_reduce_add_ps(a1) * scale;
    s[j + 2] = _mm512_reduce_add_ps(a2) * scale;
    s[j + 3] = _mm512_reduce_add_ps(a3) * scale;
  }
  for (; j < n; ++j) {
    const T* kj = k + j * D;
    __m512 a = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = D - d >= 16 ? __mmask16(0xffff) : __mmask16((1u << (D - d)) - 1);
      a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), load16(kj + d, m), a);
    }
    s[j] = _mm512_reduce_add_ps(a) * scale;
  }
}

template <typename T>
PN_AVX512 void accumulate_avx512(const float* p, const T* v, int64_t D, int64_t n, float alpha,
                                 float* acc) {
  const __m512 al = _mm512_set1_ps(alpha);
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 m = D - d >= 16 ? __mmask16(0xffff) : __mmask16((1u << (D - d)) - 1);
    __m512 a = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, acc + d), al);
    __m512 b = _mm512_setzero_ps();  // second chain: odd keys
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) {
      a = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), load16(v + j * D + d, m), a);
      b = _mm512_fmadd_ps(_mm512_set1_ps(p[j + 1]), load16(v + (j + 1) * D + d, m), b);
    }
    if (j < n) a = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), load16(v + j * D + d, m), a);
    _mm512_mask_storeu_ps(acc + d, m, _mm512_add_ps(a, b));
  }
}

#define PN_AVX2 __attribute__((target("avx2,fma,f16c")))

PN_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
PN_AVX2 inline __m256 load8(const Bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
PN_AVX2 inline __m256 load8(const F16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

PN_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename T>
PN_AVX2 void scores_avx2(const float* q, const T* k, int64_t D, int64_t n, float scale,
                         float* s) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const T* k0 = k + j * D;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      a0 = _mm256_fmadd_ps(qv, load8(k0 + d), a0);
      a1 = _mm256_fmadd_ps(qv, load8(k0 + D + d), a1);
      a2 = _mm256_fmadd_ps(qv, load8(k0 + 2 * D + d), a2);
      a3 = _mm256_fmadd_ps(qv, load8(k0 + 3 * D + d), a3);
    }
    s[j] = hsum8(a0) * scale;
    s[j + 1] = hsum8(a1) * scale;
    s[j + 2] = hsum8(a2) * scale;
    s[j + 3] = hsum8(a3) * scale;
  }
  for (; j < n; ++j) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + j * D + d), a);
    }
    s[j] = hsum8(a) * scale;
  }
}

template <typename T>
PN_AVX2 void accumulate_avx2(const float* p, const T* v, int64_t D, int64_t n, float alpha,
                             float* acc) {
  const __m256 al = _mm256_set1_ps(alpha);
  for (int64_t d = 0; d < D; d += 8) {
    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(acc + d), al);
    __m256 b = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) {
      a = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), load8(v + j * D + d), a);
      b = _mm256_fmadd_ps(_mm256_set1_ps(p[j + 1]), load8(v + (j + 1) * D + d), b);
    }
    if (j < n) a = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), load8(v + j * D + d), a);
    _mm256_storeu_ps(acc + d, _mm256_add_ps(a, b));
  }
}

template <typename T>
struct RowKernels {
  void (*scores)(const float*, const T*, int64_t, int64_t, float, float*);
  void (*accumulate)(const float*, const T*, int64_t, int64_t, float, float*);
};

template <typename T>
RowKernels<T> row_kernels(Isa isa) {
  switch (isa) {
    case Isa::AVX512_BF16:
    case Isa::AVX512: return {&scores_avx512<T>, &accumulate_avx512<T>};
    case Isa::AVX2:
      // vcvtph2ps is F16C; every AVX2 CPU we know has it, but ask.
      if (std::is_same<T, F16>::value && !__builtin_cpu_supports("f16c")) break;
      return {&scores_avx2<T>, &accumulate_avx2<T>};
    default: break;
  }
  return {&scores_scalar<T>, &accumulate_scalar<T>};
}

template <typename T>
void attention_rows(const T* q, const T* kc, const T* vc, const int64_t* positions, int64_t T_,
                    int64_t H, int64_t L, int64_t D, float scale, T* out, int64_t r0, int64_t r1,
                    Isa isa) {
  const RowKernels<T> kern = row_kernels<T>(isa);
  alignas(64) float qf[kAttnMaxHeadDim];
  alignas(64) float acc[kAttnMaxHeadDim];
  alignas(64) float s[kKeyBlock];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t h = r % H;
    const int64_t bt = r / H;  // b * T + t
    const int64_t b = bt / T_;
    const int64_t pos = positions[bt];
    T* o = out + r * D;
    if (pos < 0) {  // padding query: zeros
      std::fill(o, o + D, from_f32<T>(0.0f));
      continue;
    }
    const int64_t n = std::min(pos + 1, L);  // slots 0..pos, inclusive
    for (int64_t d = 0; d < D; ++d) qf[d] = to_f32(q[r * D + d]);
    std::fill(acc, acc + D, 0.0f);
    const T* k = kc + (b * H + h) * L * D;
    const T* v = vc + (b * H + h) * L * D;
    float m = -std::numeric_limits<float>::infinity();
    float l = 0.0f;
    for (int64_t j0 = 0; j0 < n; j0 += kKeyBlock) {
      const int64_t nb = std::min(kKeyBlock, n - j0);
      kern.scores(qf, k + j0 * D, D, nb, scale, s);
      float bm = s[0];
      for (int64_t j = 1; j < nb; ++j) bm = std::max(bm, s[j]);
      const float m_new = std::max(m, bm);
      const float alpha = std::exp(m - m_new);  // 0 on the first block (m = -inf)
      float bl = 0.0f;
      for (int64_t j = 0; j < nb; ++j) {
        s[j] = std::exp(s[j] - m_new);
        bl += s[j];
      }
      l = l * alpha + bl;
      kern.accumulate(s, v + j0 * D, D, nb, alpha, acc);
      m = m_new;
    }
    const float inv_l = 1.0f / l;
    for (int64_t d = 0; d < D; ++d) o[d] = from_f32<T>(acc[d] * inv_l);
  }
}

}  // namespace

void rotary_kv_cache_tokens(const void* qkv, DType dt, int64_t T, int64_t stride_b,
                            int64_t stride_t, const int64_t* positions, int64_t H, int64_t D,
                            int64_t L, int64_t rotary_ndims, float rope_theta, void* k_cache,
                            void* v_cache, void* q_out, int64_t i0, int64_t i1) {
  if (rotary_ndims < 0 || rotary_ndims > D || rotary_ndims % 2 != 0 ||
      rotary_ndims > kAttnMaxHeadDim || T <= 0) {
    return;
  }
  switch (dt) {
    case DType::F32:
      rotary_tokens(static_cast<const float*>(qkv), T, stride_b, stride_t, positions, H, D, L,
                    rotary_ndims, rope_theta, static_cast<float*>(k_cache),
                    static_cast<float*>(v_cache), static_cast<float*>(q_out), i0, i1);
      break;
    case DType::BF16:
      rotary_tokens(static_cast<const Bf16*>(qkv), T, stride_b, stride_t, positions, H, D, L,
                    rotary_ndims, rope_theta, static_cast<Bf16*>(k_cache),
                    static_cast<Bf16*>(v_cache), static_cast<Bf16*>(q_out), i0, i1);
      break;
    case DType::F16:
      rotary_tokens(static_cast<const F16*>(qkv), T, stride_b, stride_t, positions, H, D, L,
                    rotary_ndims, rope_theta, static_cast<F16*>(k_cache),
                    static_cast<F16*>(v_cache), static_cast<F16*>(q_out), i0, i1);
      break;
  }
}

void decode_attention_rows(const void* q, const void* k_cache, const void* v_cache, DType dt,
                           const int64_t* positions, int64_t T, int64_t H, int64_t L, int64_t D,
                           float scale, void* out, int64_t r0, int64_t r1, Isa isa) {
  if (D <= 0 || D > kAttnMaxHeadDim || D % kAttnHeadDimMultiple != 0 || T <= 0 || H <= 0 ||
      L <= 0) {
    return;
  }
  switch (dt) {
    case DType::F32:
      attention_rows(static_cast<const float*>(q), static_cast<const float*>(k_cache),
                     static_cast<const float*>(v_cache), positions, T, H, L, D, scale,
                     static_cast<float*>(out), r0, r1, isa);
      break;
    case DType::BF16:
      attention_rows(static_cast<const Bf16*>(q), static_cast<const Bf16*>(k_cache),
                     static_cast<const Bf16*>(v_cache), positions, T, H, L, D, scale,
                     static_cast<Bf16*>(out), r0, r1, isa);
      break;
    case DType::F16:
      attention_rows(static_cast<const F16*>(q), static_cast<const F16*>(k_cache),
                     static_cast<const F16*>(v_cache), positions, T, H, L, D, scale,
                     static_cast<F16*>(out), r0, r1, isa);
      break;
  }
}

}  // namespace cpu
}  // namespace pythia_native
