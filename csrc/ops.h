// Shared by the entry points of every device (ops.cpp, ops_cuda.cpp): argument
// checks that name the offending tensor, and small conversions.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <string>

#include "common/kernels.h"

namespace pythia_native {

QuantType parse_quant_type(const std::string& quant_type);
void check_blocksize(int64_t blocksize);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// packed: uint8 with (numel + 1) / 2 elements; absmax: float32 with
// ceil(numel / blocksize) elements; both contiguous, on one device.
void check_packed(const at::Tensor& packed, const at::Tensor& absmax, int64_t numel,
                  int64_t blocksize, const char* op);

void check_float_dtype(const at::Tensor& t, const char* name, const char* op);

// The checks dequantize_4bit does on every device; returns the weight's numel.
int64_t check_dequantize_args(const at::Tensor& packed, const at::Tensor& absmax,
                              int64_t blocksize, at::IntArrayRef shape, at::ScalarType dtype);

// The checks gemm_4bit does on every device before choosing a kernel.
void check_gemm_args(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                     const c10::optional<at::Tensor>& bias, int64_t n, int64_t k,
                     int64_t blocksize);

// The checks gemm_f16w does on every device: weight float16 [n, k]
// contiguous, x [..., k] float32/float16/bfloat16, bias [n] in x's dtype.
void check_gemm_f16w_args(const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias);

// Output shape of gemm_4bit: x.shape[:-1] + [n].
std::vector<int64_t> gemm_out_shape(const at::Tensor& x, int64_t n);

DType to_dtype(at::ScalarType t);

}  // namespace pythia_native
