// Shared by the CUDA entry points (ops_cuda.cpp, attention_cuda.cpp): torch's
// current stream for the launchers, their status turned into an error that
// names the op, and the 16-byte alignment the vector kernels need.
// c10/cuda only: ATen/cuda/CUDAContext.h would drag in cuBLAS/cuSPARSE headers
// that a bare toolkit (nvcc alone) does not ship.
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "ops.h"

namespace pythia_native {

inline void check_launch(int status, const char* what) {
  TORCH_CHECK(status == 0, "pythia_native.", what, ": CUDA launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(status)));
}

inline void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace pythia_native
