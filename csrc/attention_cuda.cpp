// CUDA registrations of the attention ops: check (attention.h), then call the
// raw-pointer launchers of cuda/attention.cu on torch's current stream.
// Nothing here reads device memory or synchronizes the host, and the launch
// configuration depends on shapes only, so a decode step that calls these ops
// can be captured in a CUDA graph and replayed as the positions advance. The
// decode workspace comes from torch's caching allocator (graph-capture safe).
//
// Difference from the CPU op, forced by the no-sync rule: rotary_kv_cache_
// cannot refuse positions >= L (that needs their values on the host); the
// kernel skips the cache write of such tokens instead. See the op docstring.
// c10/cuda only (see ops_cuda.cpp): no ATen/cuda/CUDAContext.h.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "attention.h"
#include "common/attention_kernels.h"
#include "ops.h"
#include "ops_cuda.h"

namespace pythia_native {
namespace {

at::Tensor rotary_kv_cache_cuda(const at::Tensor& qkv_in, const at::Tensor& positions_in,
                                at::Tensor& k_cache, at::Tensor& v_cache, int64_t rotary_ndims,
                                double rope_theta) {
  const RotaryDims s = check_rotary_kv_cache_args(qkv_in, positions_in, k_cache, v_cache,
                                                   rotary_ndims, rope_theta);
  check_rotary_kv_cache_memory(qkv_in, positions_in, k_cache, v_cache);
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  at::Tensor q = at::empty({s.B, s.T, s.H, s.D}, qkv_in.options());
  if (s.B * s.T == 0) return q;
  const at::Tensor positions = positions_in.contiguous();
  const at::Tensor qkv = qkv_in.stride(2) == 1 ? qkv_in : qkv_in.contiguous();
  check_launch(cuda::rotary_kv_cache(qkv.data_ptr(), to_dtype(qkv.scalar_type()), s.B, s.T,
                                     qkv.stride(0), qkv.stride(1),
                                     positions.data_ptr<int64_t>(), s.H, s.D, s.L, rotary_ndims,
                                     static_cast<float>(rope_theta), k_cache.data_ptr(),
                                     v_cache.data_ptr(), q.data_ptr(), current_stream()),
               "rotary_kv_cache_");
  bump_version(k_cache);
  bump_version(v_cache);
  return q;
}

at::Tensor decode_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& positions_in,
                                 double scale) {
  const DecodeDims s = check_decode_attention_args(q_in, k_cache, v_cache, positions_in, scale);
  // The kernel reads K/V rows with 16-byte loads; any cache torch allocates
  // is aligned, only an odd storage offset is not.
  TORCH_CHECK(aligned16(k_cache.data_ptr()) && aligned16(v_cache.data_ptr()),
              "pythia_native.decode_attention: k_cache and v_cache must start on a 16-byte "
              "boundary (a cache from torch.empty/zeros does; a view with an odd storage "
              "offset may not)");
  const int64_t rows = s.B * s.T * s.H;
  TORCH_CHECK(rows <= 2147483647 && cuda::decode_attention_splits(s.L) <= 65535,
              "pythia_native.decode_attention: B * T * H = ", rows, " or L = ", s.L,
              " is too large for one launch");
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor out = at::empty({s.B, s.T, s.H, s.D}, q_in.options());
  if (rows == 0) return out;
  const at::Tensor q = q_in.contiguous();
  const at::Tensor positions = positions_in.contiguous();
  at::Tensor workspace = at::empty({cuda::decode_attention_workspace(rows, s.L, s.D)},
                                   q.options().dtype(at::kFloat));
  check_launch(cuda::decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                      to_dtype(q.scalar_type()), positions.data_ptr<int64_t>(),
                                      s.B, s.T, s.H, s.L, s.D, static_cast<float>(scale),
                                      workspace.data_ptr<float>(), out.data_ptr(),
                                      current_stream()),
               "decode_attention");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pythia_native, CUDA, m) {
  m.impl("rotary_kv_cache_", &rotary_kv_cache_cuda);
  m.impl("decode_attention", &decode_attention_cuda);
}

}  // namespace pythia_native
