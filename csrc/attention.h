// Argument checks of the attention ops shared by the CPU (attention.cpp) and
// CUDA (attention_cuda.cpp) entry points. Each names the offending tensor.
#pragma once

#include <ATen/ATen.h>

#include "common/kernels.h"

namespace pythia_native {

// Sizes of a checked rotary_kv_cache_ call.
struct RotaryDims {
  int64_t B, T, H, D, L;
};

// qkv [B, T, H*3*D] float32/float16/bfloat16; positions int64 [B, T];
// k_cache, v_cache [Bc >= B, H, L, D] contiguous, qkv's dtype and device;
// rotary_ndims even in [0, D]; rope_theta as check_rope_theta. Does not look
// at the positions' values.
RotaryDims check_rotary_kv_cache_args(const at::Tensor& qkv, const at::Tensor& positions,
                                      const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      int64_t rotary_ndims, double rope_theta);

// rotary_kv_cache_'s caches share no memory with each other, qkv or
// positions (check_written_apart; real tensors only, the kernels call it).
void check_rotary_kv_cache_memory(const at::Tensor& qkv, const at::Tensor& positions,
                                  const at::Tensor& k_cache, const at::Tensor& v_cache);

// Sizes of a checked decode_attention call.
struct DecodeDims {
  int64_t B, T, H, D, L;
};

// q [B, T, H, D] float32/float16/bfloat16; k_cache, v_cache [Bc >= B, H, L, D]
// contiguous, q's dtype and device, L >= 1; D % 8 == 0 and D <= 256;
// positions int64 [B, T]; scale as check_attention_scale.
DecodeDims check_decode_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                                       const at::Tensor& v_cache, const at::Tensor& positions,
                                       double scale);

// The kernels take these scalars as float32: rope_theta must be finite and
// > 0 there (0, a negative or a non-finite base makes every angle NaN or
// inf), the softmax scale finite (inf or NaN turns every score into inf/NaN,
// which comes out as NaN or as an arbitrary row, not as an error).
void check_rope_theta(double rope_theta, const char* op);
void check_attention_scale(double scale, const char* op);

// Shared checks: a cache is [Bc, H, L, D], contiguous, with `like`'s dtype
// and device; positions are int64 [B, T] on `like`'s device.
void check_cache(const at::Tensor& cache, const char* name, const at::Tensor& like,
                 const char* like_name, const char* op);
void check_positions(const at::Tensor& positions, int64_t B, int64_t T, const at::Tensor& like,
                     const char* op);

// The CPU kernels after their checks, threaded, allocating nothing (for the
// fused block, block.cpp, to call them on its own buffers).
// rotary_kv_cache_: qkv rows of stride stride_b / stride_t (elements); refuses
// a position >= L (the error names `op`).
void rotary_kv_cache_cpu_run(const void* qkv, DType dt, int64_t stride_b, int64_t stride_t,
                             const int64_t* pos, const RotaryDims& s, int64_t rotary_ndims,
                             double rope_theta, void* k_cache, void* v_cache, void* q_out,
                             cpu::Isa isa, const char* op);
// decode_attention: q and out [B, T, H, D] contiguous.
void decode_attention_cpu_run(const void* q, const void* k_cache, const void* v_cache, DType dt,
                              const int64_t* pos, const DecodeDims& s, double scale, void* out,
                              cpu::Isa isa);

}  // namespace pythia_native
