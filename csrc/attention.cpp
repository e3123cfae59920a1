// Entry points of the attention ops: the argument checks both devices share,
// and the CPU kernels' registrations (the CUDA ones are in attention_cuda.cpp).
// Schemas are declared with the others in ops.cpp:
//   rotary_kv_cache_(qkv, positions, k_cache!, v_cache!, rotary_ndims, rope_theta) -> q
//   decode_attention(q, k_cache, v_cache, positions, scale) -> out
#include "attention.h"

#include <ATen/Parallel.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common/attention_kernels.h"
#include "ops.h"

namespace pythia_native {

void check_cache(const at::Tensor& cache, const char* name, const at::Tensor& like,
                 const char* like_name, const char* op) {
  TORCH_CHECK(cache.dim() == 4, "pythia_native.", op, ": ", name,
              " must have shape [Bc, H, L, D], got ", cache.sizes());
  TORCH_CHECK(cache.scalar_type() == like.scalar_type(), "pythia_native.", op, ": ", name,
              " must have ", like_name, "'s dtype ", like.scalar_type(), ", got ",
              cache.scalar_type());
  TORCH_CHECK(cache.device() == like.device(), "pythia_native.", op, ": ", name,
              " must be on ", like_name, "'s device ", like.device(), ", got ", cache.device());
  TORCH_CHECK(cache.is_contiguous(), "pythia_native.", op, ": ", name, " must be contiguous");
}

void check_positions(const at::Tensor& positions, int64_t B, int64_t T, const at::Tensor& like,
                     const char* op) {
  TORCH_CHECK(positions.scalar_type() == at::kLong, "pythia_native.", op,
              ": positions must be int64, got ", positions.scalar_type());
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == B && positions.size(1) == T,
              "pythia_native.", op, ": positions must have shape [B, T] = [", B, ", ", T,
              "], got ", positions.sizes());
  TORCH_CHECK(positions.device() == like.device(), "pythia_native.", op,
              ": positions must be on the device of the other tensors ", like.device(), ", got ",
              positions.device());
}

void check_rope_theta(double rope_theta, const char* op) {
  const float f = static_cast<float>(rope_theta);
  TORCH_CHECK(std::isfinite(f) && f > 0.0f, "pythia_native.", op, ": rope_theta must be a "
              "finite float32 > 0, got ", rope_theta);
}

void check_attention_scale(double scale, const char* op) {
  TORCH_CHECK(std::isfinite(static_cast<float>(scale)), "pythia_native.", op,
              ": scale must be a finite float32, got ", scale);
}

RotaryDims check_rotary_kv_cache_args(const at::Tensor& qkv, const at::Tensor& positions,
                                      const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      int64_t rotary_ndims, double rope_theta) {
  const char* op = "rotary_kv_cache_";
  check_float_dtype(qkv, "qkv", op);
  TORCH_CHECK(qkv.dim() == 3, "pythia_native.rotary_kv_cache_: qkv must have shape "
              "[B, T, H * 3 * D], got ", qkv.sizes());
  check_cache(k_cache, "k_cache", qkv, "qkv", op);
  check_cache(v_cache, "v_cache", qkv, "qkv", op);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "pythia_native.rotary_kv_cache_: k_cache and "
              "v_cache must have one shape, got ", k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t B = qkv.size(0), T = qkv.size(1);
  const int64_t Bc = k_cache.size(0), H = k_cache.size(1), L = k_cache.size(2),
                D = k_cache.size(3);
  TORCH_CHECK(H >= 1 && D >= 1, "pythia_native.rotary_kv_cache_: k_cache must have H >= 1 and "
              "D >= 1, got ", k_cache.sizes());
  // Overflow-checked: a cache with no elements can claim any H and D.
  int64_t three_d = 0, width = 0;
  TORCH_CHECK(!c10::mul_overflows(D, int64_t{3}, &three_d) &&
                  !c10::mul_overflows(H, three_d, &width),
              "pythia_native.rotary_kv_cache_: k_cache's H * 3 * D overflows int64 (H = ", H,
              ", D = ", D, ")");
  TORCH_CHECK(qkv.size(2) == width, "pythia_native.rotary_kv_cache_: qkv must have shape "
              "[B, T, H * 3 * D] = [", B, ", ", T, ", ", width, "] for the cache's H = ", H,
              " and D = ", D, ", got ", qkv.sizes());
  TORCH_CHECK(Bc >= B, "pythia_native.rotary_kv_cache_: k_cache holds ", Bc,
              " sequences, fewer than qkv's batch B = ", B);
  check_positions(positions, B, T, qkv, op);
  TORCH_CHECK(rotary_ndims >= 0 && rotary_ndims <= D && rotary_ndims % 2 == 0 &&
                  rotary_ndims <= kAttnMaxHeadDim,
              "pythia_native.rotary_kv_cache_: rotary_ndims must be even and in [0, min(D, ",
              kAttnMaxHeadDim, ")] with D = ", D, ", got ", rotary_ndims);
  check_rope_theta(rope_theta, op);
  return {B, T, H, D, L};
}

void check_rotary_kv_cache_memory(const at::Tensor& qkv, const at::Tensor& positions,
                                  const at::Tensor& k_cache, const at::Tensor& v_cache) {
  check_written_apart("rotary_kv_cache_", {{"k_cache", k_cache}, {"v_cache", v_cache}},
                      {{"qkv", qkv}, {"positions", positions}});
}

DecodeDims check_decode_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                                       const at::Tensor& v_cache, const at::Tensor& positions,
                                       double scale) {
  const char* op = "decode_attention";
  check_float_dtype(q, "q", op);
  TORCH_CHECK(q.dim() == 4, "pythia_native.decode_attention: q must have shape [B, T, H, D], "
              "got ", q.sizes());
  check_cache(k_cache, "k_cache", q, "q", op);
  check_cache(v_cache, "v_cache", q, "q", op);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "pythia_native.decode_attention: k_cache and "
              "v_cache must have one shape, got ", k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Bc = k_cache.size(0), L = k_cache.size(2);
  TORCH_CHECK(k_cache.size(1) == H && k_cache.size(3) == D, "pythia_native.decode_attention: "
              "k_cache must have shape [Bc, H, L, D] with q's H = ", H, " and D = ", D, ", got ",
              k_cache.sizes());
  TORCH_CHECK(Bc >= B, "pythia_native.decode_attention: k_cache holds ", Bc,
              " sequences, fewer than q's batch B = ", B);
  TORCH_CHECK(L >= 1, "pythia_native.decode_attention: k_cache must have L >= 1 slots, got ",
              k_cache.sizes());
  TORCH_CHECK(D % kAttnHeadDimMultiple == 0 && D <= kAttnMaxHeadDim && D >= 1,
              "pythia_native.decode_attention: the head dim D must be a multiple of ",
              kAttnHeadDimMultiple, " and at most ", kAttnMaxHeadDim, ", got q of shape ",
              q.sizes());
  check_positions(positions, B, T, q, op);
  check_attention_scale(scale, op);
  return {B, T, H, D, L};
}

void rotary_kv_cache_cpu_run(const void* qkv, DType dt, int64_t stride_b, int64_t stride_t,
                             const int64_t* pos, const RotaryDims& s, int64_t rotary_ndims,
                             double rope_theta, void* k_cache, void* v_cache, void* q_out,
                             cpu::Isa isa, const char* op) {
  const int64_t tokens = s.B * s.T;
  // A slot >= L does not exist: refuse it here (the CUDA kernel, which cannot
  // check without a host sync, skips such tokens instead). A plain loop: an
  // aten max + item() costs more than the rotary of a decode token.
  int64_t max_pos = -1;
  for (int64_t i = 0; i < tokens; ++i) max_pos = std::max(max_pos, pos[i]);
  TORCH_CHECK(max_pos < s.L, "pythia_native.", op, ": positions must be < L = ", s.L,
              " (the cache length), got ", max_pos);
  const int64_t grain = std::max<int64_t>(1, 16384 / (3 * s.H * s.D));
  at::parallel_for(0, tokens, grain, [&](int64_t i0, int64_t i1) {
    cpu::rotary_kv_cache_tokens(qkv, dt, s.T, stride_b, stride_t, pos, s.H, s.D, s.L,
                                rotary_ndims, static_cast<float>(rope_theta), k_cache, v_cache,
                                q_out, i0, i1, isa);
  });
}

void decode_attention_cpu_run(const void* q, const void* k_cache, const void* v_cache, DType dt,
                              const int64_t* pos, const DecodeDims& s, double scale, void* out,
                              cpu::Isa isa) {
  // One (b, t, h) row is a pass over up to L keys: grain 1. Rows are ordered
  // (b, t, h), so a thread's range is the heads of a few tokens in order.
  at::parallel_for(0, s.B * s.T * s.H, 1, [&](int64_t r0, int64_t r1) {
    cpu::decode_attention_rows(q, k_cache, v_cache, dt, pos, s.T, s.H, s.L, s.D,
                               static_cast<float>(scale), out, r0, r1, isa);
  });
}

namespace {

// ------------------------------------------------------------ CPU kernels ---

at::Tensor rotary_kv_cache_cpu(const at::Tensor& qkv_in, const at::Tensor& positions_in,
                               at::Tensor& k_cache, at::Tensor& v_cache, int64_t rotary_ndims,
                               double rope_theta) {
  const RotaryDims s = check_rotary_kv_cache_args(qkv_in, positions_in, k_cache, v_cache,
                                                   rotary_ndims, rope_theta);
  check_rotary_kv_cache_memory(qkv_in, positions_in, k_cache, v_cache);
  at::Tensor q = at::empty({s.B, s.T, s.H, s.D}, qkv_in.options());
  if (s.B * s.T == 0) return q;
  const at::Tensor positions = positions_in.contiguous();
  // Rows may be strided (a view of a wider activation); elements must not.
  const at::Tensor qkv = qkv_in.stride(2) == 1 ? qkv_in : qkv_in.contiguous();
  rotary_kv_cache_cpu_run(qkv.data_ptr(), to_dtype(qkv.scalar_type()), qkv.stride(0),
                          qkv.stride(1), positions.data_ptr<int64_t>(), s, rotary_ndims,
                          rope_theta, k_cache.data_ptr(), v_cache.data_ptr(), q.data_ptr(),
                          cpu::active_isa(), "rotary_kv_cache_");
  bump_version(k_cache);
  bump_version(v_cache);
  return q;
}

at::Tensor decode_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& positions_in,
                                double scale) {
  const DecodeDims s = check_decode_attention_args(q_in, k_cache, v_cache, positions_in, scale);
  at::Tensor out = at::empty({s.B, s.T, s.H, s.D}, q_in.options());
  const int64_t rows = s.B * s.T * s.H;
  if (rows == 0) return out;
  const at::Tensor q = q_in.contiguous();
  const at::Tensor positions = positions_in.contiguous();
  decode_attention_cpu_run(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                           to_dtype(q.scalar_type()), positions.data_ptr<int64_t>(), s, scale,
                           out.data_ptr(), cpu::active_isa());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pythia_native, CPU, m) {
  m.impl("rotary_kv_cache_", &rotary_kv_cache_cpu);
  m.impl("decode_attention", &decode_attention_cpu);
}

}  // namespace pythia_native
