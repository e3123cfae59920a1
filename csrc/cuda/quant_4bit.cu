// 4-bit blockwise quantize / dequantize in the bitsandbytes format
// (../../shared/docs/FORMAT.md; code tables and rounding rule in
// common/codebook.h). Torch-free: the launchers take raw pointers and a stream.
//
// Kernels
//   quantize_4bit_kernel<T>    one warp per quant block. Exists to quantize
//                              weights on the GPU (load time, tests) with bytes
//                              identical to bitsandbytes' CPU quantizer, so a
//                              checkpoint quantized here and one quantized
//                              there are the same file.
//   dequantize_4bit_kernel<T>  one thread per packed byte (two elements).
//                              Exists for the large-M path (dequantize a
//                              weight once, then a dense tensor-core matmul)
//                              and as the simplest GPU statement of the format.
//
// Layout reminder: element 2j is the HIGH nibble of byte j, element 2j+1 the
// LOW nibble (for odd numel the last low nibble is the code of 0.0);
// absmax[b] covers elements [b*blocksize, (b+1)*blocksize).
// blocksize is a power of two >= 32, so every block starts on a byte and no
// two blocks share a byte: a warp can own its block's bytes outright.
//
// Numerics: no fast math anywhere. The scale step uses __fdiv_rn/__fmul_rn so
// that neither -use_fast_math nor FMA contraction can change a byte.

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
constexpr int kQuantWarpsPerCta = 8;  // 8 quant blocks per 256-thread CTA
constexpr int kDequantThreads = 256;
constexpr int64_t kDequantMaxCtas = 1 << 16;  // grid-stride beyond this

// max that propagates NaN, as torch.max does: once m is NaN it stays NaN, and
// a NaN v replaces m. Used both per lane and in the butterfly reduction, so
// every lane ends with NaN if any lane saw one.
__device__ __forceinline__ float nan_max(float m, float v) {
  return (v > m || v != v) ? v : m;
}

// absmax floored at kAbsmaxFloor before it divides. Written as a compare (not
// fmaxf) so that a NaN absmax stays NaN, like torch's clamp(min=...).
__device__ __forceinline__ float floor_absmax(float a) {
  return a < kAbsmaxFloor ? kAbsmaxFloor : a;
}

// w: numel elements, flattened. Warp g of the grid owns quant block g:
// elements [g*bs, min((g+1)*bs, numel)), bytes [g*bs/2, ...), absmax[g].
// Pass 1 reads the block for |w| max; pass 2 re-reads it (from L1/L2: at most
// 4096 elements per warp) and writes each byte once. Quantization runs once
// per weight, so the kernel is written for exactness, not peak bandwidth.
template <typename T>
__global__ void __launch_bounds__(kQuantWarpsPerCta * kWarp)
    quantize_4bit_kernel(const T* __restrict__ w, int64_t numel, int64_t blocksize,
                         int64_t n_blocks, QuantBounds qb, uint8_t* __restrict__ packed,
                         float* __restrict__ absmax) {
  // The bounds are read with uniform indices, the order table with a per-lane
  // index: shared memory serves both without the serialization a divergent
  // constant-bank read would cause.
  __shared__ QuantBounds s_qb;
  if (threadIdx.x == 0) s_qb = qb;
  __syncthreads();

  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kQuantWarpsPerCta + threadIdx.x / kWarp;
  if (b >= n_blocks) return;  // whole warp leaves together: shuffles below stay full

  const int64_t start = b * blocksize;
  const int64_t rest = numel - start;
  const int64_t len = rest < blocksize ? rest : blocksize;  // elements in this block
  const T* wb = w + start;

  float m = 0.0f;
  for (int64_t i = lane; i < len; i += kWarp) m = nan_max(m, fabsf(to_float(wb[i])));
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, off));
  }

  // Full block: multiply by the float32 reciprocal (bitsandbytes'
  // `A * (1 / absmax)` over [blocks, blocksize]); absmax stored unfloored.
  // Partial last block: divide by the floored absmax, which is also stored.
  const bool full = (len == blocksize);
  const float am = floor_absmax(m);
  const float recip = __fdiv_rn(1.0f, am);
  if (lane == 0) absmax[b] = full ? m : am;

  uint8_t* pb = packed + start / 2;
  const int64_t n_bytes = (len + 1) / 2;  // only the last block can have odd len
  for (int64_t j = lane; j < n_bytes; j += kWarp) {
    const int64_t e = 2 * j;
    const float v0 = to_float(wb[e]);
    const float s0 = clamp_unit(full ? __fmul_rn(v0, recip) : __fdiv_rn(v0, am));
    // e + 1 == len only for the lone last element of an odd numel: its pad
    // nibble is the code of a scaled 0.0 (NF4 7, FP4 0), as bitsandbytes pads
    // `scaled` with one 0.0 before rounding (pythia_native/reference.py).
    float s1 = 0.0f;
    if (e + 1 < len) {
      const float v1 = to_float(wb[e + 1]);
      s1 = clamp_unit(full ? __fmul_rn(v1, recip) : __fdiv_rn(v1, am));
    }
    const uint32_t hi = quantize_scaled(s0, s_qb);
    const uint32_t lo = quantize_scaled(s1, s_qb);
    pb[j] = static_cast<uint8_t>((hi << 4) | lo);
  }
}

// out: numel elements. Thread t handles byte t: out[2t] from the high nibble,
// out[2t+1] (if it exists) from the low nibble; both lie in block 2t/bs since
// bs is even. Memory-bound: 0.5 byte read + 2 elements written per thread; a
// warp reads 32 consecutive bytes and writes 64 consecutive elements.
template <typename T>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize_4bit_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                           int64_t numel, int log2_bs, CodeTable tab, T* __restrict__ out) {
  // Per-lane indices hit 16 distinct banks at worst: no bank conflict.
  __shared__ float s_code[16];
  // One thread, constant indices: indexing a kernel argument by threadIdx
  // would make nvcc copy the whole argument to local memory first.
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < 16; ++i) s_code[i] = tab.v[i];
  }
  __syncthreads();

  const int64_t n_bytes = (numel + 1) / 2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n_bytes;
       j += stride) {
    const uint32_t byte = __ldg(packed + j);
    const int64_t e = 2 * j;
    const float scale = __ldg(absmax + (e >> log2_bs));
    out[e] = from_float<T>(__fmul_rn(s_code[byte >> 4], scale));
    if (e + 1 < numel) out[e + 1] = from_float<T>(__fmul_rn(s_code[byte & 15u], scale));
  }
}

bool valid_qt(QuantType qt) { return qt == QuantType::NF4 || qt == QuantType::FP4; }

template <typename T>
void launch_quantize(const void* w, int64_t numel, int64_t blocksize, QuantType qt,
                     uint8_t* packed, float* absmax, cudaStream_t stream) {
  const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
  const int64_t ctas = (n_blocks + kQuantWarpsPerCta - 1) / kQuantWarpsPerCta;  // < 2^31 for
  // any tensor below 2^39 elements, far above the largest weight (2.6e8)
  quantize_4bit_kernel<T><<<static_cast<unsigned>(ctas), kQuantWarpsPerCta * kWarp, 0, stream>>>(
      static_cast<const T*>(w), numel, blocksize, n_blocks, make_quant_bounds(qt), packed,
      absmax);
}

template <typename T>
void launch_dequantize(const uint8_t* packed, const float* absmax, int64_t numel,
                       int64_t blocksize, QuantType qt, void* out, cudaStream_t stream) {
  const int64_t n_bytes = (numel + 1) / 2;
  int64_t ctas = (n_bytes + kDequantThreads - 1) / kDequantThreads;
  if (ctas > kDequantMaxCtas) ctas = kDequantMaxCtas;
  dequantize_4bit_kernel<T><<<static_cast<unsigned>(ctas), kDequantThreads, 0, stream>>>(
      packed, absmax, numel, log2_exact(blocksize), make_code_table(qt), static_cast<T*>(out));
}

}  // namespace

int quantize_4bit(const void* w, DType dt, int64_t numel, int64_t blocksize, QuantType qt,
                  uint8_t* packed, float* absmax, void* stream) {
  if (!valid_blocksize(blocksize) || !valid_qt(qt) || numel < 0) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (numel == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return launch_for_dtype(dt, [&](auto t) {
    launch_quantize<decltype(t)>(w, numel, blocksize, qt, packed, absmax, s);
  });
}

int dequantize_4bit(const uint8_t* packed, const float* absmax, int64_t numel,
                    int64_t blocksize, QuantType qt, void* out, DType dt, void* stream) {
  if (!valid_blocksize(blocksize) || !valid_qt(qt) || numel < 0) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (numel == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return launch_for_dtype(dt, [&](auto t) {
    launch_dequantize<decltype(t)>(packed, absmax, numel, blocksize, qt, out, s);
  });
}

}  // namespace cuda
}  // namespace pythia_native
