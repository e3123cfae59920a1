// CPU kernels of rotary_kv_cache_ and decode_attention (torch-free; the API
// and the shapes are in common/attention_kernels.h).
//
// rotary_kv_cache_tokens  touches each element of qkv once (3*H*D per token)
//     and does ~2 FLOPs per element plus rotary_ndims/2 sincos per token (at
//     decode ~1% of the attention's traffic). The rotation has AVX-512 (16
//     lanes, masked) and AVX2 (8 lanes, scalar tail) versions that round as
//     the scalar loop does (mul, mul, then add / sub: no FMA contraction), so
//     every ISA writes the same bits; the pass-through dims are a copy.
//
// decode_attention_rows   one (b, t, h) row at a time, one pass over the keys
//     (online softmax): per block of keys, the scores s_j = (q . k_j) * scale,
//     the running max m and sum l (the accumulator rescaled by
//     exp(m_old - m_new)), then acc += exp(s_j - m) v_j. Versions, chosen by
//     the isa argument (attend_row_*):
//       avx512  blocks of 16 keys: scores 4 keys at a time (4 FMA chains share
//               each q load), folded by shuffles into one vector of 16 scores,
//               so max / exp / sum are single vector ops; vector exp (Cephes
//               polynomial + vscalefps, ~1 ulp); masked loads, so any
//               D % 8 == 0 needs no tail loop
//       avx2    the same with blocks of 8 keys (hadd folds); F16C for fp16
//       scalar  the portable fallback and the readable definition (libm exp)
//     bf16/fp16 caches are widened to float32 in registers (bf16: a 16-bit
//     shift; fp16: vcvtph2ps), never copied.
//
// Napkin math, pythia-160m decode (H = 12, D = 64, L = 2048, fp32, T = 1):
// K + V are 2 * 12 * 2048 * 64 * 4 B = 12.6 MB per layer and token against
// ~3.1 M FMAs (2 per 8 bytes): bound by memory bandwidth, not by the FMAs.
// Each K/V byte is read exactly once. Measured here (one thread, a shared
// 2-core VM): ~690 us = ~18 GB/s, what torch's x.sum() reads over the same
// bytes on this machine (14-22 GB/s), and on par with torch's SDPA (~720 us).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/attention_kernels.h"
#include "common/elements.h"
#include "common/simd_x86.h"

namespace pythia_native {
namespace cpu {

namespace {

// ------------------------------------------------------- decode attention ---

// Keys per online-softmax step. The accumulator (D floats) is loaded, rescaled
// and stored once per block instead of once per key, and the exp/max
// bookkeeping runs on a block of scores in L1; 16 keys of V (<= 16 KB at
// D = 256, fp32) stay in L1 across the accumulate loop's D-chunks.
constexpr int64_t kKeyBlock = 16;

// A block whose every score is -inf (q . k * scale overflowed, or a -inf key)
// is skipped: its weights are exactly 0, and while the running max is still
// -inf, exp(-inf - -inf) would be NaN and poison the row where the blocks that
// follow (and torch's softmax) give finite weights. A NaN score is not -inf:
// its block runs and the NaN reaches the row. A row of -inf scores only ends
// with l = 0, so NaN, as torch's softmax of it.
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

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

// Four per-key partial-sum vectors x0..x3 -> one vector whose 128-bit quarter
// i holds 4 partial sums of key i (two shuffle+add levels instead of four
// full horizontal reductions).
PN_AVX512 inline __m512 fold4(__m512 x0, __m512 x1, __m512 x2, __m512 x3) {
  // [x.q0+x.q2, x.q1+x.q3, y.q0+y.q2, y.q1+y.q3] for the pairs (x0, x1), (x2, x3)
  const __m512 b0 = _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 b1 = _mm512_add_ps(_mm512_shuffle_f32x4(x2, x3, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(x2, x3, _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(b0, b1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(b0, b1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// fold4 results c0..c3 (keys 4g..4g+3 in c_g's quarters) -> lane j = total of
// key j. Within each 128-bit lane: two unpack+add levels leave lane 4q + g =
// key 4g + q; one vpermps puts the keys in order.
PN_AVX512 inline __m512 fold16(__m512 c0, __m512 c1, __m512 c2, __m512 c3) {
  const __m512 e0 = _mm512_add_ps(_mm512_unpacklo_ps(c0, c1), _mm512_unpackhi_ps(c0, c1));
  const __m512 e1 = _mm512_add_ps(_mm512_unpacklo_ps(c2, c3), _mm512_unpackhi_ps(c2, c3));
  const __m512d e0d = _mm512_castps_pd(e0), e1d = _mm512_castps_pd(e1);
  const __m512 g = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(e0d, e1d)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(e0d, e1d)));
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(order, g);
}

// One row: acc[0, D) = sum_j exp(s_j - m) v_j over keys j < n, returns
// l = sum_j exp(s_j - m) (m = max s_j; the caller divides). Blocks of 16 keys:
// scores 4 keys at a time (4 FMA chains share each q load), folded into one
// vector of 16; max, exp and sum on that vector; then acc = acc * alpha +
// sum_j p_j v_j one 16-float slice of D at a time. A partial last block
// repeats its last key (valid memory) and masks the copies out.
template <typename T>
PN_AVX512 float attend_row_avx512(const float* q, const T* k, const T* v, int64_t n, int64_t D,
                                  float scale, float* acc) {
  for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
  float m = -std::numeric_limits<float>::infinity();
  float l = 0.0f;
  alignas(64) float p[16];
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t nb = std::min<int64_t>(16, n - j0);
    __m512 c[4];
    for (int g = 0; g < 4; ++g) {
      const T* k0 = k + (j0 + std::min<int64_t>(4 * g + 0, nb - 1)) * D;
      const T* k1 = k + (j0 + std::min<int64_t>(4 * g + 1, nb - 1)) * D;
      const T* k2 = k + (j0 + std::min<int64_t>(4 * g + 2, nb - 1)) * D;
      const T* k3 = k + (j0 + std::min<int64_t>(4 * g + 3, nb - 1)) * D;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 mk = D - d >= 16 ? __mmask16(0xffff) : __mmask16((1u << (D - d)) - 1);
        const __m512 qv = _mm512_maskz_loadu_ps(mk, q + d);
        a0 = _mm512_fmadd_ps(qv, load16(k0 + d, mk), a0);
        a1 = _mm512_fmadd_ps(qv, load16(k1 + d, mk), a1);
        a2 = _mm512_fmadd_ps(qv, load16(k2 + d, mk), a2);
        a3 = _mm512_fmadd_ps(qv, load16(k3 + d, mk), a3);
      }
      c[g] = fold4(a0, a1, a2, a3);
    }
    const __mmask16 valid = nb == 16 ? __mmask16(0xffff) : __mmask16((1u << nb) - 1);
    const __m512 s = _mm512_mask_mov_ps(
        neg_inf, valid, _mm512_mul_ps(fold16(c[0], c[1], c[2], c[3]), _mm512_set1_ps(scale)));
    if (_mm512_cmp_ps_mask(s, neg_inf, _CMP_EQ_OQ) == __mmask16(0xffff)) continue;  // invalid lanes are -inf
    const float m_new = std::max(m, _mm512_reduce_max_ps(s));
    const float alpha = std::exp(m - m_new);  // 0 on the first block (m = -inf)
    // exp16 clamps its argument at kExpFloor (~1.2e-38 there, not 0): a key
    // scoring further below the max (a -inf key element, or a score ~200
    // below) must weigh 0, as exp gives, or a value ~1e38 in its row shows.
    // NaN lanes compare unordered and are kept (NaN, as torch's softmax).
    const __m512 z = _mm512_sub_ps(s, _mm512_set1_ps(m_new));
    const __mmask16 keep = valid & _mm512_cmp_ps_mask(z, _mm512_set1_ps(kExpFloor), _CMP_NLT_UQ);
    const __m512 pv = _mm512_maskz_mov_ps(keep, exp16(z));
    l = l * alpha + _mm512_reduce_add_ps(pv);
    m = m_new;
    _mm512_store_ps(p, pv);
    const __m512 al = _mm512_set1_ps(alpha);
    const T* vb = v + j0 * D;
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 mk = D - d >= 16 ? __mmask16(0xffff) : __mmask16((1u << (D - d)) - 1);
      __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, acc + d), al);
      __m512 y = _mm512_setzero_ps();  // second FMA chain: odd keys
      int64_t j = 0;
      for (; j + 2 <= nb; j += 2) {
        x = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), load16(vb + j * D + d, mk), x);
        y = _mm512_fmadd_ps(_mm512_set1_ps(p[j + 1]), load16(vb + (j + 1) * D + d, mk), y);
      }
      if (j < nb) x = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), load16(vb + j * D + d, mk), x);
      _mm512_mask_storeu_ps(acc + d, mk, _mm512_add_ps(x, y));
    }
  }
  return l;
}

#define PN_AVX2 __attribute__((target("avx2,fma,f16c")))

PN_AVX2 inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Four per-key partial-sum vectors -> their four totals, in order.
PN_AVX2 inline __m128 fold4_avx2(__m256 x0, __m256 x1, __m256 x2, __m256 x3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(x0, x1), _mm256_hadd_ps(x2, x3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// As attend_row_avx512, blocks of 8 keys (D % 8 == 0: no masks).
template <typename T>
PN_AVX2 float attend_row_avx2(const float* q, const T* k, const T* v, int64_t n, int64_t D,
                              float scale, float* acc) {
  for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
  float m = -std::numeric_limits<float>::infinity();
  float l = 0.0f;
  alignas(32) float p[8];
  alignas(32) static const int32_t lane[8] = {0, 1, 2, 3, 4, 5, 6, 7};
  const __m256i lanes = _mm256_load_si256(reinterpret_cast<const __m256i*>(lane));
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    const int64_t nb = std::min<int64_t>(8, n - j0);
    __m128 c[2];
    for (int g = 0; g < 2; ++g) {
      const T* k0 = k + (j0 + std::min<int64_t>(4 * g + 0, nb - 1)) * D;
      const T* k1 = k + (j0 + std::min<int64_t>(4 * g + 1, nb - 1)) * D;
      const T* k2 = k + (j0 + std::min<int64_t>(4 * g + 2, nb - 1)) * D;
      const T* k3 = k + (j0 + std::min<int64_t>(4 * g + 3, nb - 1)) * D;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(qv, load8(k0 + d), a0);
        a1 = _mm256_fmadd_ps(qv, load8(k1 + d), a1);
        a2 = _mm256_fmadd_ps(qv, load8(k2 + d), a2);
        a3 = _mm256_fmadd_ps(qv, load8(k3 + d), a3);
      }
      c[g] = fold4_avx2(a0, a1, a2, a3);
    }
    const __m256 valid = _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(nb)), lanes));
    const __m256 s = _mm256_blendv_ps(
        _mm256_set1_ps(-std::numeric_limits<float>::infinity()),
        _mm256_mul_ps(_mm256_set_m128(c[1], c[0]), _mm256_set1_ps(scale)), valid);
    if (_mm256_movemask_ps(_mm256_cmp_ps(s, _mm256_set1_ps(kNegInf), _CMP_EQ_OQ)) == 0xff) continue;
    const float m_new = std::max(m, hmax8(s));
    const float alpha = std::exp(m - m_new);
    const __m256 z = _mm256_sub_ps(s, _mm256_set1_ps(m_new));  // as in attend_row_avx512
    const __m256 keep = _mm256_and_ps(valid, _mm256_cmp_ps(z, _mm256_set1_ps(kExpFloor), _CMP_NLT_UQ));
    const __m256 pv = _mm256_and_ps(exp8(z), keep);
    l = l * alpha + hsum8(pv);
    m = m_new;
    _mm256_store_ps(p, pv);
    const __m256 al = _mm256_set1_ps(alpha);
    const T* vb = v + j0 * D;
    for (int64_t d = 0; d < D; d += 8) {
      __m256 x = _mm256_mul_ps(_mm256_loadu_ps(acc + d), al);
      __m256 y = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 2 <= nb; j += 2) {
        x = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), load8(vb + j * D + d), x);
        y = _mm256_fmadd_ps(_mm256_set1_ps(p[j + 1]), load8(vb + (j + 1) * D + d), y);
      }
      if (j < nb) x = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), load8(vb + j * D + d), x);
      _mm256_storeu_ps(acc + d, _mm256_add_ps(x, y));
    }
  }
  return l;
}

// The portable version: blocks of kKeyBlock keys, scalar libm exp.
template <typename T>
float attend_row_scalar(const float* q, const T* k, const T* v, int64_t n, int64_t D,
                        float scale, float* acc) {
  for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
  float m = -std::numeric_limits<float>::infinity();
  float l = 0.0f;
  float s[kKeyBlock];
  for (int64_t j0 = 0; j0 < n; j0 += kKeyBlock) {
    const int64_t nb = std::min(kKeyBlock, n - j0);
    scores_scalar(q, k + j0 * D, D, nb, scale, s);
    bool all_neg_inf = true;
    for (int64_t j = 0; j < nb; ++j) all_neg_inf = all_neg_inf && s[j] == kNegInf;
    if (all_neg_inf) continue;
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
    accumulate_scalar(s, v + j0 * D, D, nb, alpha, acc);
    m = m_new;
  }
  return l;
}

template <typename T>
using AttendRow = float (*)(const float*, const T*, const T*, int64_t, int64_t, float, float*);

template <typename T>
AttendRow<T> attend_row_for(Isa isa) {
  switch (isa) {
    case Isa::AVX512: return &attend_row_avx512<T>;
    case Isa::AVX2:
      // vcvtph2ps is F16C; every AVX2 CPU we know has it, but ask.
      if (std::is_same<T, F16>::value && !__builtin_cpu_supports("f16c")) break;
      return &attend_row_avx2<T>;
    default: break;
  }
  return &attend_row_scalar<T>;
}

template <typename T>
void attention_rows(const T* q, const T* kc, const T* vc, const int64_t* positions, int64_t T_,
                    int64_t H, int64_t L, int64_t D, float scale, T* out, int64_t r0, int64_t r1,
                    Isa isa) {
  const AttendRow<T> attend = attend_row_for<T>(isa);
  alignas(64) float qf[kAttnMaxHeadDim];
  alignas(64) float acc[kAttnMaxHeadDim];
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
    const int64_t n = pos < L ? pos + 1 : L;  // slots 0..pos, inclusive (no pos + 1 overflow)
    for (int64_t d = 0; d < D; ++d) qf[d] = to_f32(q[r * D + d]);
    const int64_t head = (b * H + h) * L * D;
    const float l = attend(qf, kc + head, vc + head, n, D, scale, acc);
    const float inv_l = 1.0f / l;
    for (int64_t d = 0; d < D; ++d) o[d] = from_f32<T>(acc[d] * inv_l);
  }
}

// ------------------------------------------------------- rotary, vector ---
// load16/store16, load8/store8 and rounded() are in common/simd_x86.h: the
// products go through rounded() so that, as in the scalar loop, each is
// rounded before the sum (no FMA contraction).

template <typename T>
PN_AVX512 void rotate_avx512(const T* src, T* dst, int64_t half, const float* c, const float* sn) {
  for (int64_t j = 0; j < half; j += 16) {
    const int64_t n = std::min<int64_t>(16, half - j);
    const __mmask16 mk = static_cast<__mmask16>((1u << n) - 1);
    const __m512 x1 = load16(src + j, mk), x2 = load16(src + j + half, mk);
    const __m512 cv = _mm512_maskz_loadu_ps(mk, c + j), sv = _mm512_maskz_loadu_ps(mk, sn + j);
    store16(dst + j, _mm512_sub_ps(rounded(_mm512_mul_ps(x1, cv)), rounded(_mm512_mul_ps(x2, sv))), mk);
    store16(dst + j + half,
            _mm512_add_ps(rounded(_mm512_mul_ps(x2, cv)), rounded(_mm512_mul_ps(x1, sv))), mk);
  }
}

template <typename T>
PN_AVX2 void rotate_avx2(const T* src, T* dst, int64_t half, const float* c, const float* sn) {
  int64_t j = 0;
  for (; j + 8 <= half; j += 8) {
    const __m256 x1 = load8(src + j), x2 = load8(src + j + half);
    const __m256 cv = _mm256_loadu_ps(c + j), sv = _mm256_loadu_ps(sn + j);
    store8(dst + j, _mm256_sub_ps(rounded(_mm256_mul_ps(x1, cv)), rounded(_mm256_mul_ps(x2, sv))));
    store8(dst + j + half,
           _mm256_add_ps(rounded(_mm256_mul_ps(x2, cv)), rounded(_mm256_mul_ps(x1, sv))));
  }
  for (; j < half; ++j) {
    const float x1 = to_f32(src[j]), x2 = to_f32(src[j + half]);
    float a = x1 * c[j], b = x2 * sn[j], e = x2 * c[j], f = x1 * sn[j];
    __asm__("" : "+x"(a), "+x"(b), "+x"(e), "+x"(f));  // no FMA here either
    dst[j] = from_f32<T>(a - b);
    dst[j + half] = from_f32<T>(e + f);
  }
}

// ------------------------------------------------------------------ rotary ---

template <typename T>
void rotary_tokens(const T* qkv, int64_t T_, int64_t sb, int64_t st, const int64_t* positions,
                   int64_t H, int64_t D, int64_t L, int64_t R, float theta, T* kc, T* vc,
                   T* q_out, int64_t i0, int64_t i1, Isa isa) {
  const int64_t half = R / 2;
  float inv_freq[kAttnMaxHeadDim / 2 + 1];
  float cos_[kAttnMaxHeadDim / 2 + 1], sin_[kAttnMaxHeadDim / 2 + 1];
  rope_inv_freq(R, theta, inv_freq);
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
      if (isa == Isa::AVX512) {
        rotate_avx512(src, dst, half, cos_, sin_);
      } else if (isa == Isa::AVX2) {
        rotate_avx2(src, dst, half, cos_, sin_);
      } else {
        for (int64_t j = 0; j < half; ++j) {
          const float x1 = to_f32(src[j]), x2 = to_f32(src[j + half]);
          dst[j] = from_f32<T>(x1 * cos_[j] - x2 * sin_[j]);
          dst[j + half] = from_f32<T>(x2 * cos_[j] + x1 * sin_[j]);
        }
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

}  // namespace

void rotary_kv_cache_tokens(const void* qkv, DType dt, int64_t T, int64_t stride_b,
                            int64_t stride_t, const int64_t* positions, int64_t H, int64_t D,
                            int64_t L, int64_t rotary_ndims, float rope_theta, void* k_cache,
                            void* v_cache, void* q_out, int64_t i0, int64_t i1, Isa isa) {
  // fp16 on AVX2 needs F16C (every AVX2 CPU we know has it, but ask).
  if (isa == Isa::AVX2 && dt == DType::F16 && !__builtin_cpu_supports("f16c")) isa = Isa::Scalar;
  if (rotary_ndims < 0 || rotary_ndims > D || rotary_ndims % 2 != 0 ||
      rotary_ndims > kAttnMaxHeadDim || T <= 0) {
    return;
  }
  switch (dt) {
    case DType::F32:
      rotary_tokens(static_cast<const float*>(qkv), T, stride_b, stride_t, positions, H, D, L,
                    rotary_ndims, rope_theta, static_cast<float*>(k_cache),
                    static_cast<float*>(v_cache), static_cast<float*>(q_out), i0, i1, isa);
      break;
    case DType::BF16:
      rotary_tokens(static_cast<const Bf16*>(qkv), T, stride_b, stride_t, positions, H, D, L,
                    rotary_ndims, rope_theta, static_cast<Bf16*>(k_cache),
                    static_cast<Bf16*>(v_cache), static_cast<Bf16*>(q_out), i0, i1, isa);
      break;
    case DType::F16:
      rotary_tokens(static_cast<const F16*>(qkv), T, stride_b, stride_t, positions, H, D, L,
                    rotary_ndims, rope_theta, static_cast<F16*>(k_cache),
                    static_cast<F16*>(v_cache), static_cast<F16*>(q_out), i0, i1, isa);
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
