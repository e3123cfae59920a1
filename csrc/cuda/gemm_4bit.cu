// Small-M GEMV on 4-bit weights: y[M, N] = x[M, K] @ W^T + bias, M <= 16.
// Torch-free: the launcher takes raw pointers and a stream. W is [N, K] in the
// bitsandbytes format (../../shared/docs/FORMAT.md), row-aligned
// (K % blocksize == 0), so row n is bytes [n*K/2, (n+1)*K/2) and quant blocks
// [n*K/bs, (n+1)*K/bs).
//
// Kernels
//   gemv_4bit_kernel<T, MT>  one warp per output row n, MT = compile-time bound
//                            on M (1, 2, 4, 8, 16). Exists for decoding
//                            (M = 1: one token per step) and small batches,
//                            where the whole cost is streaming W once; larger M
//                            goes through dequantize + a tensor-core matmul.
//
// Napkin math (M = 1, Pythia-12b dense_h_to_4h, N x K = 20480 x 5120, bs 64):
// W is 52 MB of packed bytes + 6.6 MB of float32 absmax (4 bytes per 32
// packed bytes), x is 10 KB (F16). At ~4.8 TB/s (H200 HBM3e) that is ~12 us,
// so every weight byte is read exactly once, with 16-byte loads: one LDG.128
// per lane is 512 contiguous bytes per warp (four full 128-byte lines) and 4x
// fewer load instructions than 4-byte loads. x is re-read by every warp (4x
// the weight bytes for F16 at M = 1, 8x for F32) but stays in L1 (L2 for large
// M*K): it costs on-chip bandwidth, not HBM bandwidth. The code lookups come from shared memory (16
// floats; distinct indices hit distinct banks) and cost 8 bytes of shared
// traffic per weight byte; together with the x re-reads that makes the L1 /
// shared data path, not HBM, the likely limit at M = 1 (napkin: ~50-65% of
// HBM peak). Next step if it matters: several rows per warp sharing one x load.
//
// Numerics: each lane accumulates code[idx] * x over a 32-element chunk in
// float32, multiplies by the chunk's absmax once, and adds into a float32
// accumulator; a warp butterfly sums the lanes. Only the final y is rounded
// to T. The summation order differs from a dense matmul, so results agree
// with the reference to float32 rounding, not bit for bit.
// The code table is held scaled by 2^-5 (kCodeShift) and y scaled back by
// 2^5: powers of two, so every rounding and the bits of y stay as unscaled
// (barring sums below the normal range), but 32 terms of |code * x| <= 2^-5 *
// FLT_MAX cannot overflow. Unscaled, the chunk sum did for |x| above ~1e37
// while the reference's (code * absmax) * x stayed finite.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/codebook.h"
#include "common/kernels.h"
#include "cuda/device_common.cuh"

namespace pythia_native {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kGemvWarpsPerCta = 4;  // 4 rows per 128-thread CTA
constexpr int kChunk = 32;           // elements per lane per step = 16 packed bytes

// Two consecutive 16-bit elements packed little-endian in a 32-bit word (the
// lower address in the low half) to two floats, exactly.
__device__ __forceinline__ void unpack2(uint32_t u, __half, float& lo, float& hi) {
  lo = __half2float(__ushort_as_half(static_cast<unsigned short>(u & 0xffffu)));
  hi = __half2float(__ushort_as_half(static_cast<unsigned short>(u >> 16)));
}
__device__ __forceinline__ void unpack2(uint32_t u, __nv_bfloat16, float& lo, float& hi) {
  // bf16 is the top half of a float32: shifting the bits up is the exact cast.
  lo = __uint_as_float(u << 16);
  hi = __uint_as_float(u & 0xffff0000u);
}

// xv[0..31] = float(xs[0..31]); xs 16-byte aligned (K % 32 == 0, x and ldx
// aligned by contract). 16-byte loads: 8 for F32, 4 for F16/BF16.
__device__ __forceinline__ void load_x_chunk(const float* __restrict__ xs, float (&xv)[kChunk]) {
  const float4* p = reinterpret_cast<const float4*>(xs);
#pragma unroll
  for (int q = 0; q < kChunk / 4; ++q) {
    const float4 f = __ldg(p + q);
    xv[4 * q + 0] = f.x;
    xv[4 * q + 1] = f.y;
    xv[4 * q + 2] = f.z;
    xv[4 * q + 3] = f.w;
  }
}
template <typename T16>
__device__ __forceinline__ void load_x_chunk(const T16* __restrict__ xs, float (&xv)[kChunk]) {
  const uint4* p = reinterpret_cast<const uint4*>(xs);
#pragma unroll
  for (int q = 0; q < kChunk / 8; ++q) {
    const uint4 u = __ldg(p + q);
    unpack2(u.x, T16{}, xv[8 * q + 0], xv[8 * q + 1]);
    unpack2(u.y, T16{}, xv[8 * q + 2], xv[8 * q + 3]);
    unpack2(u.z, T16{}, xv[8 * q + 4], xv[8 * q + 5]);
    unpack2(u.w, T16{}, xv[8 * q + 6], xv[8 * q + 7]);
  }
}

// x: [M, K] row stride ldx; packed: [N*K/2] bytes; absmax: [N*K/bs];
// bias: [N] or null; y: [M, N] contiguous. Requires M <= MT.
//
// Warp w of the grid computes row n = w for all m. Lane l handles chunks
// c = l, l+32, ... of the row (chunk c = elements [32c, 32c+32) = packed bytes
// [16c, 16c+16) of the row); a chunk never straddles a quant block because
// bs >= 32 and both are powers of two, so one absmax per chunk. Rows with
// K < 1024 leave lanes idle (K = 768: 24 of 32 lanes busy).
//
// Per chunk: one 16-byte weight load (prefetched one step ahead: the next
// weight load is in flight while this chunk computes), 32 shared-memory code
// lookups decoded once, then for each m a 32-element x load and 32 FMAs.
// Codes scaled by 2^-kCodeShift: 2^kCodeShift >= the kChunk terms of a chunk sum.
constexpr int kCodeShift = 5;
static_assert((1 << kCodeShift) >= kChunk, "a chunk's unscaled sum could overflow");

template <typename T, int MT>
__global__ void __launch_bounds__(kGemvWarpsPerCta * kWarp)
    gemv_4bit_kernel(const T* __restrict__ x, int M, int64_t K, int64_t ldx,
                     const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                     int64_t N, int log2_bs, CodeTable tab, const T* __restrict__ bias,
                     T* __restrict__ y) {
  __shared__ float s_code[16];
  // One thread, constant indices: indexing a kernel argument by threadIdx
  // would make nvcc copy the whole argument to local memory first.
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < 16; ++i) s_code[i] = tab.v[i] * (1.0f / (1 << kCodeShift));
  }
  __syncthreads();  // before any early exit: every thread reaches it

  const int lane = threadIdx.x % kWarp;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarpsPerCta + threadIdx.x / kWarp;
  if (n >= N) return;  // whole warp leaves together: the final shuffles stay full

  const int64_t n_chunks = K / kChunk;
  const uint4* wrow = reinterpret_cast<const uint4*>(packed + n * (K / 2));  // 16B aligned
  const float* arow = absmax + n * (K >> log2_bs);

  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.0f;

  int64_t c = lane;
  uint4 wq = make_uint4(0, 0, 0, 0);
  float scale = 0.0f;
  if (c < n_chunks) {
    wq = __ldg(wrow + c);
    scale = __ldg(arow + ((c * kChunk) >> log2_bs));
  }
  for (; c < n_chunks; c += kWarp) {
    const uint4 cur = wq;
    const float cur_scale = scale;
    const int64_t next = c + kWarp;
    if (next < n_chunks) {
      wq = __ldg(wrow + next);
      scale = __ldg(arow + ((next * kChunk) >> log2_bs));
    }

    // Byte p of the 16 (word p/4, bits 8*(p%4)..) holds element 2p in its
    // high nibble and element 2p+1 in its low nibble.
    const uint32_t words[4] = {cur.x, cur.y, cur.z, cur.w};
    float wv[kChunk];
#pragma unroll
    for (int p = 0; p < kChunk / 2; ++p) {
      const uint32_t byte = (words[p / 4] >> (8 * (p % 4))) & 0xffu;
      wv[2 * p] = s_code[byte >> 4];
      wv[2 * p + 1] = s_code[byte & 0xfu];
    }

    const int64_t k0 = c * kChunk;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {
        float xv[kChunk];
        load_x_chunk(x + m * ldx + k0, xv);
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < kChunk; ++e) dot = fmaf(wv[e], xv[e], dot);
        acc[m] = fmaf(dot, cur_scale, acc[m]);
      }
    }
  }

#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) {
      acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], off);
    }
  }
  if (lane == 0) {
    const float b = bias != nullptr ? to_float(bias[n]) : 0.0f;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) y[m * N + n] = from_float<T>(acc[m] * static_cast<float>(1 << kCodeShift) + b);
    }
  }
}

template <typename T, int MT>
void launch_gemv_mt(const void* x, int M, int64_t K, int64_t ldx, const uint8_t* packed,
                    const float* absmax, int64_t N, int log2_bs, const CodeTable& tab,
                    const void* bias, void* y, cudaStream_t stream) {
  const int64_t ctas = (N + kGemvWarpsPerCta - 1) / kGemvWarpsPerCta;
  gemv_4bit_kernel<T, MT><<<static_cast<unsigned>(ctas), kGemvWarpsPerCta * kWarp, 0, stream>>>(
      static_cast<const T*>(x), M, K, ldx, packed, absmax, N, log2_bs, tab,
      static_cast<const T*>(bias), static_cast<T*>(y));
}

// Runtime M -> the smallest compiled MT >= M (padding rows are skipped by the
// m < M guards, not computed).
template <typename T>
void launch_gemv(const void* x, int M, int64_t K, int64_t ldx, const uint8_t* packed,
                 const float* absmax, int64_t N, int log2_bs, const CodeTable& tab,
                 const void* bias, void* y, cudaStream_t stream) {
  if (M <= 1) {
    launch_gemv_mt<T, 1>(x, M, K, ldx, packed, absmax, N, log2_bs, tab, bias, y, stream);
  } else if (M <= 2) {
    launch_gemv_mt<T, 2>(x, M, K, ldx, packed, absmax, N, log2_bs, tab, bias, y, stream);
  } else if (M <= 4) {
    launch_gemv_mt<T, 4>(x, M, K, ldx, packed, absmax, N, log2_bs, tab, bias, y, stream);
  } else if (M <= 8) {
    launch_gemv_mt<T, 8>(x, M, K, ldx, packed, absmax, N, log2_bs, tab, bias, y, stream);
  } else {
    launch_gemv_mt<T, 16>(x, M, K, ldx, packed, absmax, N, log2_bs, tab, bias, y, stream);
  }
}

}  // namespace

int gemv_4bit(const void* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* packed,
              const float* absmax, int64_t N, int64_t blocksize, QuantType qt, const void* bias,
              void* y, DType dt, void* stream) {
  // The caller checks the full contract (gemm_4bit_cuda, ops_cuda.cpp); these guards
  // only keep a broken call from indexing out of bounds.
  if (M < 0 || M > kGemvMaxM || K < 0 || N < 0 || !valid_blocksize(blocksize) ||
      K % blocksize != 0 || K % kChunk != 0 || (qt != QuantType::NF4 && qt != QuantType::FP4)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (M == 0 || N == 0) return 0;
  // K == 0 is a valid empty reduction: y = bias (or 0), the kernel handles it.
  const CodeTable tab = make_code_table(qt);
  const int log2_bs = log2_exact(blocksize);
  const int m = static_cast<int>(M);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return launch_for_dtype(dt, [&](auto t) {
    launch_gemv<decltype(t)>(x, m, K, ldx, packed, absmax, N, log2_bs, tab, bias, y, s);
  });
}

}  // namespace cuda
}  // namespace pythia_native
