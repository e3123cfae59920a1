// CUDA kernels of rotary_kv_cache_ and decode_attention (torch-free; the API
// and the shapes are in common/attention_kernels.h).
//
// Kernels
//   rotary_kv_cache_kernel<T>  CTA (token, c) covers 128 elements of the
//       token's [H, D]: each thread writes one element of q, k and v (reading
//       its rotate-half partner), so every store of a warp is contiguous. A
//       decode step (B = 1) thus spreads over H * D / 128 SMs (6 for
//       pythia-160m, 40 for 12b) instead of looping on one. inv_freq comes
//       from the host (rope_inv_freq, the CPU kernels' values) as a kernel
//       argument, so each element costs one sincosf, no powf. Positions are
//       read on the device; a position >= L skips the cache write (no host
//       check: the op must stay capturable in a CUDA graph).
//   decode_split_kernel<T>     flash-decoding, phase 1: CTA (row, split) with
//       row = (b, t, h) takes keys [split * 128, split * 128 + 128) of its row
//       (cut at the row's position) and writes the partial (max m, sum l,
//       acc = sum_j exp(s_j - m) v_j) of that chunk in float32.
//   decode_combine_kernel<T>   phase 2: one CTA per row merges its splits
//       with log-sum-exp weights exp(m_s - max_s m_s).
// The grid is (B*T*H, ceil(L / 128)): it depends on the cache length, never
// on the positions, so a decode step captured once in a CUDA graph replays
// correctly while the positions advance. A split past the position exits at
// once with m = -inf (a few hundred cycles per empty CTA).
//
// Why split the keys: at decode there is one query per (b, h), i.e. B * H rows
// (12 for pythia-160m at B = 1), far fewer than the 132 SMs of an H100/H200;
// with 128-key splits an L = 2048 cache gives 16x more CTAs, and every CTA
// streams its K and V chunk once.
//
// Memory access in phase 1: scores are one key per thread (128 threads = 128
// keys): each thread walks its K row with 16-byte loads (LDG.128), q is in
// shared memory read as a broadcast (all lanes read one address). A row is
// 64..512 contiguous bytes, consumed whole by one thread through L1, which
// serves any head dim (D = 80: 10 loads of 8 fp16) without cross-lane
// reductions. The V pass is coalesced: threads are (key group, 16-byte slice
// of the row), consecutive lanes read consecutive 16 bytes of one V row.
//
// Napkin math (pythia-12b decode, B = 1, H = 40, D = 128, L = 2048, fp16):
// K + V = 2 * 40 * 2048 * 128 * 2 B = 42 MB per layer and token; ~9 us at
// ~4.8 TB/s (H200). The partials are 40 * 16 * 130 * 4 B = 333 KB, <1% of it.
//
// Alignment: K/V rows start on 16 bytes because D % 8 == 0 (fp16/bf16: 16*k
// bytes; fp32: 32*k bytes) and the caches are 16-byte aligned (checked by the
// entry point). q, out and qkv use element loads (they are tiny).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/attention_kernels.h"
#include "cuda/device_common.cuh"

namespace pythia_native {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRotaryThreads = 128;
// Phase 1: one key per thread in the score pass.
constexpr int kSplitThreads = static_cast<int>(kDecodeSplitKeys);
static_assert(kSplitThreads % kWarp == 0 && kSplitThreads <= 1024, "one key per thread");
constexpr int kCombineThreads = 128;

// ------------------------------------------------------------------ rotary ---

// inv_freq of rope_inv_freq, by value (kernel arguments are captured with the
// launch in a CUDA graph).
struct RopeFreqs {
  float v[kAttnMaxHeadDim / 2];
};

// qkv: row (b, t) at b * sb + t * st, [H, 3, D] within; positions [B * T];
// caches [Bc, H, L, D]; q_out [B * T, H, D]. Grid (B * T, ceil(H * D / 128)).
template <typename T>
__global__ void __launch_bounds__(kRotaryThreads)
    rotary_kv_cache_kernel(const T* __restrict__ qkv, int64_t T_, int64_t sb, int64_t st,
                           const int64_t* __restrict__ positions, int H, int D, int64_t L, int R,
                           RopeFreqs freqs, T* __restrict__ kc, T* __restrict__ vc,
                           T* __restrict__ q_out) {
  const int64_t i = blockIdx.x;  // token (b, t)
  const int e = static_cast<int>(blockIdx.y) * kRotaryThreads + static_cast<int>(threadIdx.x);
  if (e >= H * D) return;  // the last chunk's spare threads (no barrier follows)
  const int64_t b = i / T_, t = i % T_;
  const int64_t pos = positions[i];
  const T* x = qkv + b * sb + t * st;
  T* qo = q_out + i * H * D;
  const bool rotate = pos >= 0;
  const bool write = pos >= 0 && pos < L;  // never past the cache
  const int half = R / 2;
  const int h = e / D, d = e % D;
  const T* xh = x + static_cast<int64_t>(h) * 3 * D;
  const int64_t slot = ((b * H + h) * L + pos) * D + d;
  if (rotate && d < R) {
    // rotate-half: out[j] = x[j] c - x[j + half] s, out[j + half] =
    // x[j + half] c + x[j] s (j < half), in float32.
    const int j = d < half ? d : d - half;
    const int partner = d < half ? d + half : d - half;
    float s, c;
    sincosf(static_cast<float>(pos) * freqs.v[j], &s, &c);
    const float sgn_s = d < half ? -s : s;
    // Each product rounded, then the sum, as the CPU kernels and the
    // reference do: without the _rn intrinsics nvcc contracts them into an FMA.
    qo[e] = from_float<T>(__fadd_rn(__fmul_rn(to_float(xh[d]), c),
                                    __fmul_rn(to_float(xh[partner]), sgn_s)));
    if (write) {
      kc[slot] = from_float<T>(__fadd_rn(__fmul_rn(to_float(xh[D + d]), c),
                                         __fmul_rn(to_float(xh[D + partner]), sgn_s)));
    }
  } else {
    qo[e] = xh[d];
    if (write) kc[slot] = xh[D + d];
  }
  if (write) vc[slot] = xh[2 * D + d];
}

// ------------------------------------------------------- decode attention ---

// 16 bytes at p (16-byte aligned) -> 16 / sizeof(T) floats, exactly.
__device__ __forceinline__ void load16(const float* p, float (&f)[4]) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));
  f[0] = v.x;
  f[1] = v.y;
  f[2] = v.z;
  f[3] = v.w;
}
__device__ __forceinline__ void unpack2(uint32_t u, __half, float* f) {
  f[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(u & 0xffffu)));
  f[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(u >> 16)));
}
__device__ __forceinline__ void unpack2(uint32_t u, __nv_bfloat16, float* f) {
  f[0] = __uint_as_float(u << 16);  // bf16 is the top half of a float32
  f[1] = __uint_as_float(u & 0xffff0000u);
}
template <typename T16>
__device__ __forceinline__ void load16(const T16* p, float (&f)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  unpack2(u.x, T16{}, f);
  unpack2(u.y, T16{}, f + 2);
  unpack2(u.z, T16{}, f + 4);
  unpack2(u.w, T16{}, f + 6);
}

// Block-wide max / sum of one value per thread (kSplitThreads threads). Both
// end with a barrier, so shared writes made before the call are visible after.
__device__ __forceinline__ float block_max(float v, float* warp_s) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  if (threadIdx.x % kWarp == 0) warp_s[threadIdx.x / kWarp] = v;
  __syncthreads();
  float r = warp_s[0];
#pragma unroll
  for (int w = 1; w < kSplitThreads / kWarp; ++w) r = fmaxf(r, warp_s[w]);
  __syncthreads();  // warp_s is reused by the next reduction
  return r;
}
__device__ __forceinline__ float block_sum(float v, float* warp_s) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (threadIdx.x % kWarp == 0) warp_s[threadIdx.x / kWarp] = v;
  __syncthreads();
  float r = warp_s[0];
#pragma unroll
  for (int w = 1; w < kSplitThreads / kWarp; ++w) r += warp_s[w];
  __syncthreads();
  return r;
}

// q, out: [rows, D] with row = (b * T + t) * H + h; caches [Bc, H, L, D];
// positions [B * T]. part_acc: [rows, S, D]; part_ml: [rows, S, 2] (m, l).
template <typename T>
__global__ void __launch_bounds__(kSplitThreads)
    decode_split_kernel(const T* __restrict__ q, const T* __restrict__ kc,
                        const T* __restrict__ vc, const int64_t* __restrict__ positions,
                        int64_t T_, int64_t H, int64_t L, int D, float scale, int S,
                        float* __restrict__ part_acc, float* __restrict__ part_ml) {
  constexpr int VE = 16 / sizeof(T);  // elements per 16-byte load
  __shared__ float q_s[kAttnMaxHeadDim];
  __shared__ float p_s[kSplitThreads];
  // V partial sums of the key groups: groups * D <= kSplitThreads * VE floats.
  __shared__ float red_s[kSplitThreads * VE];
  __shared__ float warp_s[kSplitThreads / kWarp];

  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const int tid = threadIdx.x;
  const int64_t h = row % H, bt = row / H, b = bt / T_;
  const int64_t pos = positions[bt];
  const int64_t n = pos < 0 ? 0 : (pos < L ? pos + 1 : L);  // visible slots (no pos + 1 overflow)
  const int64_t j0 = static_cast<int64_t>(split) * kSplitThreads;
  float* ml = part_ml + (row * S + split) * 2;
  if (j0 >= n) {
    // Empty chunk (past the position, or padding): the whole CTA leaves before
    // any barrier; the combine skips m = -inf.
    if (tid == 0) {
      ml[0] = -INFINITY;
      ml[1] = 0.0f;
    }
    return;
  }
  const int nk = static_cast<int>(n - j0 < kSplitThreads ? n - j0 : kSplitThreads);
  for (int d = tid; d < D; d += kSplitThreads) q_s[d] = to_float(q[row * D + d]);
  __syncthreads();

  const int64_t head = (b * H + h) * L;  // slot 0 of this (b, h)
  float sc = -INFINITY;
  if (tid < nk) {
    const T* krow = kc + (head + j0 + tid) * D;
    float dot = 0.0f;
    for (int d = 0; d < D; d += VE) {
      float kv[VE];
      load16(krow + d, kv);
#pragma unroll
      for (int e = 0; e < VE; ++e) dot = fmaf(q_s[d + e], kv[e], dot);
    }
    sc = dot * scale;
  }
  const float m = block_max(sc, warp_s);
  const float p = tid < nk ? expf(sc - m) : 0.0f;
  p_s[tid] = p;
  const float l = block_sum(p, warp_s);  // its barriers publish p_s

  // acc[d] = sum_j p_j v_j[d]: thread = (group g, slice vi) handles keys g,
  // g + groups, ... of slice vi (VE elements); D <= 256 keeps groups >= 2.
  const int nv = D / VE;
  const int groups = kSplitThreads / nv;
  const int g = tid / nv, vi = tid % nv;
  if (g < groups) {
    float acc[VE];
#pragma unroll
    for (int e = 0; e < VE; ++e) acc[e] = 0.0f;
    const T* vbase = vc + (head + j0) * D + vi * VE;
    for (int j = g; j < nk; j += groups) {
      float vv[VE];
      load16(vbase + static_cast<int64_t>(j) * D, vv);
      const float pj = p_s[j];
#pragma unroll
      for (int e = 0; e < VE; ++e) acc[e] = fmaf(pj, vv[e], acc[e]);
    }
#pragma unroll
    for (int e = 0; e < VE; ++e) red_s[g * D + vi * VE + e] = acc[e];
  }
  __syncthreads();
  float* out = part_acc + (row * S + split) * D;
  for (int d = tid; d < D; d += kSplitThreads) {
    float a = 0.0f;
    for (int gg = 0; gg < groups; ++gg) a += red_s[gg * D + d];
    out[d] = a;
  }
  if (tid == 0) {
    ml[0] = m;
    ml[1] = l;
  }
}

// out[row] = sum_s w_s acc_s / sum_s w_s l_s, w_s = exp(m_s - max m); all
// splits empty (padding query) -> zeros. S is small (L / 128): each thread
// recomputes the weights from L1 rather than staging them.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
    decode_combine_kernel(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                          const int64_t* __restrict__ positions, int64_t H, int S, int D,
                          T* __restrict__ out) {
  const int64_t row = blockIdx.x;
  const float* ml = part_ml + row * S * 2;
  T* o = out + row * D;
  float M = -INFINITY;
  for (int s = 0; s < S; ++s) M = fmaxf(M, ml[2 * s]);
  if (M == -INFINITY) {
    // No split saw a finite score: a padding query (zeros), or one whose every
    // visible score is -inf, whose softmax is NaN (torch's, the CPU kernel's).
    const float fill = positions[row / H] < 0 ? 0.0f : NAN;
    for (int d = threadIdx.x; d < D; d += kCombineThreads) o[d] = from_float<T>(fill);
    return;
  }
  float total = 0.0f;
  for (int s = 0; s < S; ++s) {
    if (ml[2 * s] != -INFINITY) total += expf(ml[2 * s] - M) * ml[2 * s + 1];
  }
  const float inv_total = 1.0f / total;
  const float* acc = part_acc + row * S * D;
  for (int d = threadIdx.x; d < D; d += kCombineThreads) {
    float a = 0.0f;
    for (int s = 0; s < S; ++s) {
      if (ml[2 * s] != -INFINITY) a += expf(ml[2 * s] - M) * acc[static_cast<int64_t>(s) * D + d];
    }
    o[d] = from_float<T>(a * inv_total);
  }
}

template <typename T>
void launch_rotary(const void* qkv, int64_t B, int64_t T_, int64_t sb, int64_t st,
                   const int64_t* positions, int64_t H, int64_t D, int64_t L, int64_t R,
                   float theta, void* kc, void* vc, void* q_out, cudaStream_t stream) {
  RopeFreqs freqs{};
  rope_inv_freq(R, theta, freqs.v);
  const dim3 grid(static_cast<unsigned>(B * T_),
                  static_cast<unsigned>((H * D + kRotaryThreads - 1) / kRotaryThreads));
  rotary_kv_cache_kernel<T><<<grid, kRotaryThreads, 0, stream>>>(
      static_cast<const T*>(qkv), T_, sb, st, positions, static_cast<int>(H),
      static_cast<int>(D), L, static_cast<int>(R), freqs, static_cast<T*>(kc),
      static_cast<T*>(vc), static_cast<T*>(q_out));
}

template <typename T>
void launch_decode(const void* q, const void* kc, const void* vc, const int64_t* positions,
                   int64_t rows, int64_t T_, int64_t H, int64_t L, int64_t D, float scale,
                   float* workspace, void* out, cudaStream_t stream) {
  const int64_t S = decode_attention_splits(L);
  float* part_acc = workspace;
  float* part_ml = workspace + rows * S * D;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(S));
  decode_split_kernel<T><<<grid, kSplitThreads, 0, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(kc), static_cast<const T*>(vc), positions,
      T_, H, L, static_cast<int>(D), scale, static_cast<int>(S), part_acc, part_ml);
  decode_combine_kernel<T><<<static_cast<unsigned>(rows), kCombineThreads, 0, stream>>>(
      part_acc, part_ml, positions, H, static_cast<int>(S), static_cast<int>(D),
      static_cast<T*>(out));
}

constexpr int64_t kMaxGridX = 2147483647;  // gridDim.x limit
constexpr int64_t kMaxGridY = 65535;       // gridDim.y limit

}  // namespace

int rotary_kv_cache(const void* qkv, DType dt, int64_t B, int64_t T, int64_t stride_b,
                    int64_t stride_t, const int64_t* positions, int64_t H, int64_t D, int64_t L,
                    int64_t rotary_ndims, float rope_theta, void* k_cache, void* v_cache,
                    void* q_out, void* stream) {
  if (B < 0 || T < 0 || H < 1 || D < 1 || L < 0 || rotary_ndims < 0 || rotary_ndims > D ||
      rotary_ndims % 2 != 0 || rotary_ndims > kAttnMaxHeadDim || B * T > kMaxGridX ||
      H * D > kMaxGridY * kRotaryThreads) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (B * T == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return launch_for_dtype(dt, [&](auto t) {
    launch_rotary<decltype(t)>(qkv, B, T, stride_b, stride_t, positions, H, D, L, rotary_ndims,
                               rope_theta, k_cache, v_cache, q_out, s);
  });
}

int decode_attention(const void* q, const void* k_cache, const void* v_cache, DType dt,
                     const int64_t* positions, int64_t B, int64_t T, int64_t H, int64_t L,
                     int64_t D, float scale, float* workspace, void* out, void* stream) {
  const int64_t rows = B * T * H;
  const bool aligned = (reinterpret_cast<uintptr_t>(k_cache) % 16 == 0) &&
                       (reinterpret_cast<uintptr_t>(v_cache) % 16 == 0);
  if (B < 0 || T < 0 || H < 1 || L < 1 || D < 1 || D > kAttnMaxHeadDim ||
      D % kAttnHeadDimMultiple != 0 || rows > kMaxGridX ||
      decode_attention_splits(L) > kMaxGridY || !aligned) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (rows == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return launch_for_dtype(dt, [&](auto t) {
    launch_decode<decltype(t)>(q, k_cache, v_cache, positions, rows, T, H, L, D, scale,
                               workspace, out, s);
  });
}

}  // namespace cuda
}  // namespace pythia_native
