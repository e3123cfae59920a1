// GELU on the GPU (torch-free; the API is in common/kernels.h).
//
// gelu_kernel<T>  y[i] = x[i] * Phi(x[i]) in float32, Phi = normcdff (CUDA's
//                 normal CDF: erfc-based, so the negative tail keeps its
//                 relative accuracy, where 0.5 x (1 + erf(x / sqrt 2)) cancels),
//                 rounded once to T. One element per thread per step, a
//                 grid-stride loop past kGeluMaxCtas blocks. Elementwise and
//                 memory-bound: in a decode step it is one small launch inside
//                 the captured graph; it exists so that the op has a kernel on
//                 every device, with the CPU kernel's specials (+inf -> +inf,
//                 -inf -> NaN as 0 * -inf, NaN -> NaN).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/kernels.h"
#include "cuda/device_common.cuh"

namespace pythia_native {
namespace cuda {
namespace {

constexpr int kGeluThreads = 256;
constexpr int64_t kGeluMaxCtas = 1 << 16;  // grid-stride beyond this

template <typename T>
__global__ void gelu_kernel(const T* x, T* y, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float v = to_float(x[i]);
    y[i] = from_float<T>(__fmul_rn(v, normcdff(v)));
  }
}

}  // namespace

int gelu(const void* x, void* y, DType dt, int64_t n, void* stream) {
  if (n < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return 0;  // a zero-size grid is a launch error
  int64_t ctas = (n + kGeluThreads - 1) / kGeluThreads;
  if (ctas > kGeluMaxCtas) ctas = kGeluMaxCtas;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return launch_for_dtype(dt, [&](auto t) {
    using T = decltype(t);
    gelu_kernel<T><<<static_cast<unsigned>(ctas), kGeluThreads, 0, s>>>(
        static_cast<const T*>(x), static_cast<T*>(y), n);
  });
}

}  // namespace cuda
}  // namespace pythia_native
