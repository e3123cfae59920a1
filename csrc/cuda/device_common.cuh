// Device helpers shared by the CUDA kernels (torch-free): the code table
// passed by value, and exact conversions between the element types and float.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/codebook.h"
#include "common/kernels.h"

namespace pythia_native {
namespace cuda {

// Calls launch(T{}) with T the element type of dt (float, __half or
// __nv_bfloat16) and returns the launch status every launcher returns:
// cudaErrorInvalidValue for an unknown dt, else cudaGetLastError().
template <typename Launch>
inline int launch_for_dtype(DType dt, Launch&& launch) {
  switch (dt) {
    case DType::F32: launch(float{}); break;
    case DType::F16: launch(__half{}); break;
    case DType::BF16: launch(__nv_bfloat16{}); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

// The 16 code values, by value: kernel arguments are captured into CUDA graphs
// with the launch, unlike a __constant__ filled by cudaMemcpyToSymbol.
struct CodeTable {
  float v[16];
};

inline CodeTable make_code_table(QuantType qt) {
  const float* code = code_table(qt);
  CodeTable t{};
  for (int i = 0; i < 16; ++i) t.v[i] = code[i];
  return t;
}

// Exact conversions to float (every F16/BF16 value is a float).
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round-to-nearest-even casts from float.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// log2 of a power of two (blocksizes are checked by the caller).
inline int log2_exact(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

}  // namespace cuda
}  // namespace pythia_native
