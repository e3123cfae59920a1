// Argument checks of the attention ops shared by the CPU (attention.cpp) and
// CUDA (attention_cuda.cpp) entry points. Each names the offending tensor.
#pragma once

#include <ATen/ATen.h>

namespace pythia_native {

// Sizes of a checked rotary_kv_cache_ call.
struct RotaryDims {
  int64_t B, T, H, D, L;
};

// qkv [B, T, H*3*D] float32/float16/bfloat16; positions int64 [B, T];
// k_cache, v_cache [Bc >= B, H, L, D] contiguous, qkv's dtype and device;
// rotary_ndims even in [0, D]. Does not look at the positions' values.
RotaryDims check_rotary_kv_cache_args(const at::Tensor& qkv, const at::Tensor& positions,
                                      const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      int64_t rotary_ndims);

// Sizes of a checked decode_attention call.
struct DecodeDims {
  int64_t B, T, H, D, L;
};

// q [B, T, H, D] float32/float16/bfloat16; k_cache, v_cache [Bc >= B, H, L, D]
// contiguous, q's dtype and device, L >= 1; D % 8 == 0 and D <= 256;
// positions int64 [B, T].
DecodeDims check_decode_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                                       const at::Tensor& v_cache, const at::Tensor& positions);

}  // namespace pythia_native
