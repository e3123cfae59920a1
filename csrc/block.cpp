// neox_block_: one GPT-NeoX block over new tokens that attend through the KV
// cache (a decode step), as one op. Schema (declared in ops.cpp):
//   neox_block_(x!, positions, k_cache!, v_cache!, ln1_weight, ln1_bias,
//               ln2_weight, ln2_bias, eps, {qkv,dense,up,down}_{packed,absmax,bias},
//               intermediate_size, blocksize, quant_type, rotary_ndims,
//               rope_theta, scale, parallel_residual, compute="float32") -> ()
// x [B, T, hidden] is updated in place to the block's output:
//   parallel:   x = (x + dense(attn(rotary(qkv(ln1(x)))))) + down(gelu(up(ln2(x))))
//   sequential: x = x + dense(...ln1(x)...); x = x + down(gelu(up(ln2(x))))
// with the same ops, roundings and order as the layer written in Python
// (pythia_native/block.py, which is also this op's CUDA kernel and the
// prefill path): LayerNorm in float32 rounded to x's dtype, each Linear
// summed in float32 (or, compute="int16", through gemm_4bit's int16 GEMV where
// it applies) and rounded to x's dtype, the residual adds rounded one at a
// time.
//
// Why a fused op on the CPU: a decode step of pythia-160m spent ~1.4 of its
// ~6.5 ms between the weight reads (2-vCPU Xeon, benchmarks/profile_decode.py):
// ~15 torch ops per block called from Python, each paying the interpreter, the
// dispatcher, argument checks and an allocation. Here a block is one call:
// the kernels run on raw pointers into one scratch buffer, kept per thread
// between calls, so a decode step allocates nothing. On CUDA the decode step
// is a CUDA graph, which removes those costs already; its kernel is the
// composition of the per-op CUDA kernels.
#include <ATen/Parallel.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <memory>

#include "attention.h"
#include "common/attention_kernels.h"
#include "ops.h"

namespace pythia_native {
namespace {

constexpr const char* kOp = "neox_block_";

struct BlockDims {
  int64_t B, T, hidden, H, D, L, inter;
};

BlockDims block_dims(const at::Tensor& x, const at::Tensor& k_cache, int64_t intermediate_size) {
  return {x.size(0), x.size(1), x.size(2), k_cache.size(1), k_cache.size(3), k_cache.size(2),
          intermediate_size};
}

void check_vector(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "pythia_native.neox_block_: ", name,
              " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "pythia_native.neox_block_: ", name,
              " must have shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), "pythia_native.neox_block_: ", name,
              " must be on x's device ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "pythia_native.neox_block_: ", name, " must be contiguous");
}

// One 4-bit Linear [n, k] of the block; `name` is "qkv_", "dense_", "up_" or
// "down_", which the errors put before packed / absmax / bias.
void check_linear(const char* name, const at::Tensor& packed, const at::Tensor& absmax,
                  const c10::optional<at::Tensor>& bias, int64_t n, int64_t k,
                  int64_t blocksize, const at::Tensor& x) {
  check_packed(packed, absmax, weight_numel(n, k, kOp), blocksize, kOp, name);
  TORCH_CHECK(packed.device() == x.device(), "pythia_native.neox_block_: ", name,
              "packed must be on x's device ", x.device(), ", got ", packed.device());
  check_bias(bias, x, n, kOp, name);
}

}  // namespace

void check_neox_block(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& ln1_weight,
                      const at::Tensor& ln1_bias, const at::Tensor& ln2_weight,
                      const at::Tensor& ln2_bias, double eps, const at::Tensor& qkv_packed,
                      const at::Tensor& qkv_absmax, const c10::optional<at::Tensor>& qkv_bias,
                      const at::Tensor& dense_packed, const at::Tensor& dense_absmax,
                      const c10::optional<at::Tensor>& dense_bias, const at::Tensor& up_packed,
                      const at::Tensor& up_absmax, const c10::optional<at::Tensor>& up_bias,
                      const at::Tensor& down_packed, const at::Tensor& down_absmax,
                      const c10::optional<at::Tensor>& down_bias, int64_t intermediate_size,
                      int64_t blocksize, const std::string& quant_type, int64_t rotary_ndims,
                      double rope_theta, double scale, bool /*parallel_residual*/,
                      const std::string& compute) {
  check_float_dtype(x, "x", kOp);
  TORCH_CHECK(x.dim() == 3, "pythia_native.neox_block_: x must have shape [B, T, hidden], got ",
              x.sizes());
  TORCH_CHECK(x.is_contiguous(), "pythia_native.neox_block_: x must be contiguous (it is "
              "updated in place)");
  check_cache(k_cache, "k_cache", x, "x", kOp);
  check_cache(v_cache, "v_cache", x, "x", kOp);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "pythia_native.neox_block_: k_cache and "
              "v_cache must have one shape, got ", k_cache.sizes(), " and ", v_cache.sizes());
  const BlockDims s = block_dims(x, k_cache, intermediate_size);
  TORCH_CHECK(s.H >= 1 && s.D >= 1 && s.L >= 1, "pythia_native.neox_block_: k_cache must have "
              "H, L, D >= 1, got ", k_cache.sizes());
  int64_t cache_width = 0;  // overflow-checked: a cache with no elements can claim any H and D
  TORCH_CHECK(!c10::mul_overflows(s.H, s.D, &cache_width) && cache_width == s.hidden,
              "pythia_native.neox_block_: x's hidden size ", s.hidden,
              " must equal the cache's H * D = ", s.H, " * ", s.D);
  TORCH_CHECK(k_cache.size(0) >= s.B, "pythia_native.neox_block_: k_cache holds ",
              k_cache.size(0), " sequences, fewer than x's batch B = ", s.B);
  TORCH_CHECK(s.D % kAttnHeadDimMultiple == 0 && s.D <= kAttnMaxHeadDim,
              "pythia_native.neox_block_: the head dim D must be a multiple of ",
              kAttnHeadDimMultiple, " and at most ", kAttnMaxHeadDim, ", got k_cache of shape ",
              k_cache.sizes());
  TORCH_CHECK(rotary_ndims >= 0 && rotary_ndims <= s.D && rotary_ndims % 2 == 0,
              "pythia_native.neox_block_: rotary_ndims must be even and in [0, D = ", s.D,
              "], got ", rotary_ndims);
  check_positions(positions, s.B, s.T, x, kOp);
  check_vector(ln1_weight, "ln1_weight", s.hidden, x);
  check_vector(ln1_bias, "ln1_bias", s.hidden, x);
  check_vector(ln2_weight, "ln2_weight", s.hidden, x);
  check_vector(ln2_bias, "ln2_bias", s.hidden, x);
  TORCH_CHECK(std::isfinite(static_cast<float>(eps)) && eps >= 0.0,
              "pythia_native.neox_block_: eps must be a finite float32 >= 0, got ", eps);
  check_rope_theta(rope_theta, kOp);
  check_attention_scale(scale, kOp);
  TORCH_CHECK(intermediate_size >= 1, "pythia_native.neox_block_: intermediate_size must be "
              ">= 1, got ", intermediate_size);
  check_blocksize(blocksize);
  parse_quant_type(quant_type);
  check_linear("qkv_", qkv_packed, qkv_absmax, qkv_bias, 3 * s.hidden, s.hidden, blocksize, x);
  check_linear("dense_", dense_packed, dense_absmax, dense_bias, s.hidden, s.hidden, blocksize, x);
  check_linear("up_", up_packed, up_absmax, up_bias, s.inter, s.hidden, blocksize, x);
  check_linear("down_", down_packed, down_absmax, down_bias, s.hidden, s.inter, blocksize, x);
  parse_compute(compute, kOp);
}

void check_neox_block_call(const at::Tensor& x, const at::Tensor& positions,
                           const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& ln1_weight, const at::Tensor& ln1_bias,
                           const at::Tensor& ln2_weight, const at::Tensor& ln2_bias, double eps,
                           const at::Tensor& qkv_packed, const at::Tensor& qkv_absmax,
                           const c10::optional<at::Tensor>& qkv_bias,
                           const at::Tensor& dense_packed, const at::Tensor& dense_absmax,
                           const c10::optional<at::Tensor>& dense_bias,
                           const at::Tensor& up_packed, const at::Tensor& up_absmax,
                           const c10::optional<at::Tensor>& up_bias, const at::Tensor& down_packed,
                           const at::Tensor& down_absmax,
                           const c10::optional<at::Tensor>& down_bias, int64_t intermediate_size,
                           int64_t blocksize, const std::string& quant_type, int64_t rotary_ndims,
                           double rope_theta, double scale, bool parallel_residual,
                           const std::string& compute) {
  check_neox_block(x, positions, k_cache, v_cache, ln1_weight, ln1_bias, ln2_weight, ln2_bias,
                   eps, qkv_packed, qkv_absmax, qkv_bias, dense_packed, dense_absmax, dense_bias,
                   up_packed, up_absmax, up_bias, down_packed, down_absmax, down_bias,
                   intermediate_size, blocksize, quant_type, rotary_ndims, rope_theta, scale,
                   parallel_residual, compute);
  static const at::Tensor none;
  const auto opt = [](const c10::optional<at::Tensor>& t) -> const at::Tensor& {
    return t.has_value() ? *t : none;
  };
  check_written_apart(kOp, {{"x", x}, {"k_cache", k_cache}, {"v_cache", v_cache}},
                      {{"positions", positions}, {"ln1_weight", ln1_weight},
                       {"ln1_bias", ln1_bias}, {"ln2_weight", ln2_weight}, {"ln2_bias", ln2_bias},
                       {"qkv_packed", qkv_packed}, {"qkv_absmax", qkv_absmax},
                       {"qkv_bias", opt(qkv_bias)}, {"dense_packed", dense_packed},
                       {"dense_absmax", dense_absmax}, {"dense_bias", opt(dense_bias)},
                       {"up_packed", up_packed}, {"up_absmax", up_absmax},
                       {"up_bias", opt(up_bias)}, {"down_packed", down_packed},
                       {"down_absmax", down_absmax}, {"down_bias", opt(down_bias)}});
}

namespace {

// The CPU kernel's scratch: one buffer per calling thread, grown on demand
// and kept, so that steady decode steps allocate nothing. Requests above
// kCachedScratchBytes (a prefill-sized call) get a tensor of their own
// instead, so no thread keeps hundreds of MB.
constexpr size_t kCachedScratchBytes = size_t{16} << 20;
constexpr size_t kAlign = 64;

// The pieces of one call's scratch, in bytes, carved from one buffer at
// 64-byte boundaries.
template <size_t N>
class Scratch {
 public:
  explicit Scratch(const std::array<size_t, N>& sizes) {
    size_t total = 0;
    for (size_t i = 0; i < N; ++i) {
      offset_[i] = total;
      total += (sizes[i] + kAlign - 1) / kAlign * kAlign;
    }
    if (total > kCachedScratchBytes) {
      own_ = at::empty({static_cast<int64_t>(total + kAlign)}, at::TensorOptions(at::kByte));
      base_ = static_cast<char*>(own_.data_ptr());
    } else {
      thread_local std::unique_ptr<char[]> buf;
      thread_local size_t cap = 0;
      if (cap < total) {
        buf.reset(new char[total + kAlign]);
        cap = total;
      }
      base_ = buf.get();
    }
    base_ += (kAlign - reinterpret_cast<uintptr_t>(base_) % kAlign) % kAlign;
  }
  void* operator[](size_t i) const { return base_ + offset_[i]; }

 private:
  std::array<size_t, N> offset_{};
  at::Tensor own_;
  char* base_ = nullptr;
};

void neox_block_cpu(at::Tensor& x, const at::Tensor& positions_in, at::Tensor& k_cache,
                    at::Tensor& v_cache, const at::Tensor& ln1_weight, const at::Tensor& ln1_bias,
                    const at::Tensor& ln2_weight, const at::Tensor& ln2_bias, double eps,
                    const at::Tensor& qkv_packed, const at::Tensor& qkv_absmax,
                    const c10::optional<at::Tensor>& qkv_bias, const at::Tensor& dense_packed,
                    const at::Tensor& dense_absmax, const c10::optional<at::Tensor>& dense_bias,
                    const at::Tensor& up_packed, const at::Tensor& up_absmax,
                    const c10::optional<at::Tensor>& up_bias, const at::Tensor& down_packed,
                    const at::Tensor& down_absmax, const c10::optional<at::Tensor>& down_bias,
                    int64_t intermediate_size, int64_t blocksize, const std::string& quant_type,
                    int64_t rotary_ndims, double rope_theta, double scale,
                    bool parallel_residual, const std::string& compute) {
  check_neox_block_call(x, positions_in, k_cache, v_cache, ln1_weight, ln1_bias, ln2_weight,
                        ln2_bias, eps, qkv_packed, qkv_absmax, qkv_bias, dense_packed,
                        dense_absmax, dense_bias, up_packed, up_absmax, up_bias, down_packed,
                        down_absmax, down_bias, intermediate_size, blocksize, quant_type,
                        rotary_ndims, rope_theta, scale, parallel_residual, compute);
  const bool int16 = parse_compute(compute, kOp);
  const BlockDims s = block_dims(x, k_cache, intermediate_size);
  const int64_t M = s.B * s.T, Hd = s.hidden, I = s.inter;
  if (M == 0) return;
  const QuantType qt = parse_quant_type(quant_type);
  const cpu::Isa isa = cpu::active_isa();
  const DType dt = to_dtype(x.scalar_type());
  const size_t es = static_cast<size_t>(dtype_size(dt));
  const at::Tensor positions = positions_in.contiguous();
  const int64_t* pos = positions.data_ptr<int64_t>();

  // Scratch, in x's dtype unless noted: h (a LayerNorm's output) [M, Hd],
  // qkv [M, 3 Hd], q and attn [M, Hd], a (the attention's output) [M, Hd],
  // u (the MLP's inner activation) [M, I], m (the MLP's output) [M, Hd];
  // float32: xp (a Linear's permuted input) [M, max(Hd, I)] and the four
  // biases widened (bf16 / fp16 -> float32, exact; for float32 x only a
  // non-contiguous bias is copied there).
  const size_t rows = static_cast<size_t>(M), hd = static_cast<size_t>(Hd),
               inter = static_cast<size_t>(I);
  const Scratch<12> scratch({rows * std::max(hd, inter) * 4, rows * hd * es, rows * 3 * hd * es,
                             rows * hd * es, rows * hd * es, rows * hd * es, rows * inter * es,
                             rows * hd * es, 3 * hd * 4, hd * 4, inter * 4, hd * 4});
  float* xp = static_cast<float*>(scratch[0]);
  void *h = scratch[1], *qkv = scratch[2], *q = scratch[3], *attn = scratch[4], *a = scratch[5],
       *u = scratch[6], *m = scratch[7];
  const auto widen_bias = [&](const c10::optional<at::Tensor>& bias, int64_t n,
                              void* piece) -> const float* {
    if (!bias.has_value()) return nullptr;
    // A float32 bias is used in place when contiguous; otherwise (and for bf16 /
    // fp16) its values go into `piece`: a contiguous() copy would be freed when
    // this returns, and the GEMVs below read it after.
    if (dt == DType::F32 && bias->is_contiguous()) return bias->data_ptr<float>();
    const at::Tensor b = bias->contiguous();
    float* out = static_cast<float*>(piece);
    if (dt == DType::F32) {
      std::memcpy(out, b.data_ptr<float>(), static_cast<size_t>(n) * sizeof(float));
      return out;
    }
    if (dt == DType::BF16) {
      const at::BFloat16* src = b.data_ptr<at::BFloat16>();
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(src[i]);
    } else {
      const at::Half* src = b.data_ptr<at::Half>();
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(src[i]);
    }
    return out;
  };
  const float* qkv_b = widen_bias(qkv_bias, 3 * Hd, scratch[8]);
  const float* dense_b = widen_bias(dense_bias, Hd, scratch[9]);
  const float* up_b = widen_bias(up_bias, I, scratch[10]);
  const float* down_b = widen_bias(down_bias, Hd, scratch[11]);

  // y[M, n] = in[M, k] @ W.T + bias, in x's dtype.
  const auto linear = [&](const void* in, int64_t k, const at::Tensor& packed,
                          const at::Tensor& absmax, const c10::optional<at::Tensor>& bias,
                          const float* bias_f32, int64_t n, void* y) {
    if (gemm_4bit_cpu_small_ok(M, k, blocksize, isa)) {
      gemm_4bit_cpu_small(in, dt, M, k, k, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                          blocksize, qt, bias_f32, n, y, xp, isa, int16);
      return;
    }
    // Many tokens, or a layout that is not row-aligned: gemm_4bit's general
    // path (dequantized panels through BLAS), which allocates.
    const at::Tensor xin = at::from_blob(const_cast<void*>(in), {M, k}, x.options());
    const at::Tensor out =
        gemm_4bit_cpu(xin, packed, absmax, bias, n, k, blocksize, quant_type, compute);
    std::memcpy(y, out.data_ptr(), static_cast<size_t>(M * n) * es);
  };
  const auto layer_norm = [&](const at::Tensor& w, const at::Tensor& b) {
    const float* wp = w.data_ptr<float>();
    const float* bp = b.data_ptr<float>();
    const void* xv = x.data_ptr();
    at::parallel_for(0, M, std::max<int64_t>(1, kCpuElementwiseGrain / Hd), [&](int64_t m0, int64_t m1) {
      cpu::layer_norm_rows(xv, dt, Hd, Hd, wp, bp, static_cast<float>(eps), h, Hd, m0, m1, isa);
    });
  };
  const auto residual = [&](const void* add) {
    void* xv = x.data_ptr();
    at::parallel_for(0, M * Hd, kCpuElementwiseGrain, [&](int64_t i0, int64_t i1) {
      cpu::add_inplace(xv, add, dt, i0, i1, isa);
    });
  };
  const auto mlp = [&]() {  // m = down(gelu(up(h)))
    linear(h, Hd, up_packed, up_absmax, up_bias, up_b, I, u);
    gelu_cpu_run(u, u, dt, M * I, isa);
    linear(u, I, down_packed, down_absmax, down_bias, down_b, Hd, m);
  };

  // Attention: a = dense(attention(rotary(qkv(ln1(x))))).
  layer_norm(ln1_weight, ln1_bias);
  linear(h, Hd, qkv_packed, qkv_absmax, qkv_bias, qkv_b, 3 * Hd, qkv);
  rotary_kv_cache_cpu_run(qkv, dt, s.T * 3 * Hd, 3 * Hd, pos, RotaryDims{s.B, s.T, s.H, s.D, s.L},
                          rotary_ndims, rope_theta, k_cache.data_ptr(), v_cache.data_ptr(), q,
                          isa, kOp);
  decode_attention_cpu_run(q, k_cache.data_ptr(), v_cache.data_ptr(), dt, pos,
                           DecodeDims{s.B, s.T, s.H, s.D, s.L}, scale, attn, isa);
  linear(attn, Hd, dense_packed, dense_absmax, dense_bias, dense_b, Hd, a);
  if (parallel_residual) {  // x + a + mlp(ln2(x)), ln2 of the block's input
    layer_norm(ln2_weight, ln2_bias);
    mlp();
    residual(a);
    residual(m);
  } else {  // x = x + a; x = x + mlp(ln2(x))
    residual(a);
    layer_norm(ln2_weight, ln2_bias);
    mlp();
    residual(m);
  }
  bump_version(x);
  bump_version(k_cache);
  bump_version(v_cache);
}

}  // namespace

TORCH_LIBRARY_IMPL(pythia_native, CPU, m) { m.impl("neox_block_", &neox_block_cpu); }

}  // namespace pythia_native
