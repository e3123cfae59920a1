// neox_block_: one GPT-NeoX block over new tokens that attend through the KV
// cache (a decode step), as one op. Schema (declared in ops.cpp):
//   neox_block_(x!, positions, k_cache!, v_cache!, ln1_weight, ln1_bias,
//               ln2_weight, ln2_bias, eps, {qkv,dense,up,down}_{packed,absmax,bias},
//               intermediate_size, blocksize, quant_type, rotary_ndims,
//               rope_theta, scale, parallel_residual) -> ()
// x [B, T, hidden] is updated in place to the block's output:
//   parallel:   x = (x + dense(attn(rotary(qkv(ln1(x)))))) + down(gelu(up(ln2(x))))
//   sequential: x = x + dense(...ln1(x)...); x = x + down(gelu(up(ln2(x))))
// with the same ops, roundings and order as the layer written in Python
// (pythia_native/block.py, which is also this op's CUDA kernel and the
// prefill path): LayerNorm in float32 rounded to x's dtype, each Linear
// summed in float32 and rounded to x's dtype, the residual adds rounded one
// at a time.
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
#include <torch/library.h>

#include <algorithm>
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

void check_vector(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "pythia_native.neox_block_: ", name,
              " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "pythia_native.neox_block_: ", name,
              " must have shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), "pythia_native.neox_block_: ", name,
              " must be on x's device ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "pythia_native.neox_block_: ", name, " must be contiguous");
}

// One 4-bit Linear [n, k] of the block: `name` is qkv, dense, up or down.
void check_linear(const std::string& name, const at::Tensor& packed, const at::Tensor& absmax,
                  const c10::optional<at::Tensor>& bias, int64_t n, int64_t k,
                  int64_t blocksize, const at::Tensor& x) {
  const int64_t numel = n * k;
  TORCH_CHECK(packed.scalar_type() == at::kByte, "pythia_native.neox_block_: ", name,
              "_packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(packed.numel() == (numel + 1) / 2, "pythia_native.neox_block_: ", name,
              "_packed must hold ", (numel + 1) / 2, " bytes for a [", n, ", ", k,
              "] weight, got shape ", packed.sizes());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "pythia_native.neox_block_: ", name,
              "_absmax must be float32 (decode double-quantized absmax with dequantize_absmax "
              "first), got ", absmax.scalar_type());
  TORCH_CHECK(absmax.numel() == ceil_div(numel, blocksize), "pythia_native.neox_block_: ", name,
              "_absmax must hold ceil(", numel, " / ", blocksize, ") = ",
              ceil_div(numel, blocksize), " block scales for a [", n, ", ", k,
              "] weight, got shape ", absmax.sizes());
  for (const at::Tensor* t : {&packed, &absmax}) {
    const char* suffix = t == &packed ? "_packed" : "_absmax";
    TORCH_CHECK(t->device() == x.device(), "pythia_native.neox_block_: ", name, suffix,
                " must be on x's device ", x.device(), ", got ", t->device());
    TORCH_CHECK(t->is_contiguous(), "pythia_native.neox_block_: ", name, suffix,
                " must be contiguous");
  }
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.scalar_type() == x.scalar_type(), "pythia_native.neox_block_: ", name,
              "_bias must have x's dtype ", x.scalar_type(), ", got ", b.scalar_type());
  TORCH_CHECK(b.dim() == 1 && b.size(0) == n, "pythia_native.neox_block_: ", name,
              "_bias must have shape [", n, "], got ", b.sizes());
  TORCH_CHECK(b.device() == x.device(), "pythia_native.neox_block_: ", name,
              "_bias must be on x's device ", x.device(), ", got ", b.device());
  TORCH_CHECK(b.is_contiguous(), "pythia_native.neox_block_: ", name, "_bias must be contiguous");
}

BlockDims check_neox_block_args(
    const at::Tensor& x, const at::Tensor& positions, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& ln1_weight, const at::Tensor& ln1_bias,
    const at::Tensor& ln2_weight, const at::Tensor& ln2_bias, double eps,
    const at::Tensor& qkv_packed, const at::Tensor& qkv_absmax,
    const c10::optional<at::Tensor>& qkv_bias, const at::Tensor& dense_packed,
    const at::Tensor& dense_absmax, const c10::optional<at::Tensor>& dense_bias,
    const at::Tensor& up_packed, const at::Tensor& up_absmax,
    const c10::optional<at::Tensor>& up_bias, const at::Tensor& down_packed,
    const at::Tensor& down_absmax, const c10::optional<at::Tensor>& down_bias,
    int64_t intermediate_size, int64_t blocksize, const std::string& quant_type,
    int64_t rotary_ndims) {
  check_float_dtype(x, "x", kOp);
  TORCH_CHECK(x.dim() == 3, "pythia_native.neox_block_: x must have shape [B, T, hidden], got ",
              x.sizes());
  TORCH_CHECK(x.is_contiguous(), "pythia_native.neox_block_: x must be contiguous (it is "
              "updated in place)");
  check_cache(k_cache, "k_cache", x, "x", kOp);
  check_cache(v_cache, "v_cache", x, "x", kOp);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "pythia_native.neox_block_: k_cache and "
              "v_cache must have one shape, got ", k_cache.sizes(), " and ", v_cache.sizes());
  const BlockDims s{x.size(0), x.size(1), x.size(2), k_cache.size(1),
                    k_cache.size(3), k_cache.size(2), intermediate_size};
  TORCH_CHECK(s.H >= 1 && s.D >= 1 && s.L >= 1, "pythia_native.neox_block_: k_cache must have "
              "H, L, D >= 1, got ", k_cache.sizes());
  TORCH_CHECK(s.H * s.D == s.hidden, "pythia_native.neox_block_: x's hidden size ", s.hidden,
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
  TORCH_CHECK(eps >= 0.0, "pythia_native.neox_block_: eps must be >= 0, got ", eps);
  TORCH_CHECK(intermediate_size >= 1, "pythia_native.neox_block_: intermediate_size must be "
              ">= 1, got ", intermediate_size);
  check_blocksize(blocksize);
  parse_quant_type(quant_type);
  check_linear("qkv", qkv_packed, qkv_absmax, qkv_bias, 3 * s.hidden, s.hidden, blocksize, x);
  check_linear("dense", dense_packed, dense_absmax, dense_bias, s.hidden, s.hidden, blocksize, x);
  check_linear("up", up_packed, up_absmax, up_bias, s.inter, s.hidden, blocksize, x);
  check_linear("down", down_packed, down_absmax, down_bias, s.hidden, s.inter, blocksize, x);
  return s;
}

// The CPU kernel's scratch: one buffer per calling thread, grown on demand
// and kept, so that steady decode steps allocate nothing. Requests above
// kCachedScratchBytes (a prefill-sized call) get a tensor of their own
// instead, so no thread keeps hundreds of MB.
constexpr size_t kCachedScratchBytes = size_t{16} << 20;
constexpr size_t kAlign = 64;

class Scratch {
 public:
  explicit Scratch(size_t bytes) {
    if (bytes > kCachedScratchBytes) {
      own_ = at::empty({static_cast<int64_t>(bytes + kAlign)}, at::TensorOptions(at::kByte));
      base_ = static_cast<char*>(own_.data_ptr());
    } else {
      thread_local std::unique_ptr<char[]> buf;
      thread_local size_t cap = 0;
      if (cap < bytes) {
        buf.reset(new char[bytes + kAlign]);
        cap = bytes;
      }
      base_ = buf.get();
    }
    base_ += (kAlign - reinterpret_cast<uintptr_t>(base_) % kAlign) % kAlign;
  }
  // Consecutive 64-byte-aligned pieces.
  void* take(size_t bytes) {
    void* p = base_ + used_;
    used_ += (bytes + kAlign - 1) / kAlign * kAlign;
    return p;
  }
  static size_t piece(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

 private:
  at::Tensor own_;
  char* base_ = nullptr;
  size_t used_ = 0;
};

// Element-wise passes (residual adds, GELU) split between threads above this
// many values; a decode step's 768-20,480 run on one thread (cheaper than a
// fork of the pool, as in gelu_cpu).
constexpr int64_t kElementwiseGrain = 32768;

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
                    bool parallel_residual) {
  const BlockDims s = check_neox_block_args(
      x, positions_in, k_cache, v_cache, ln1_weight, ln1_bias, ln2_weight, ln2_bias, eps,
      qkv_packed, qkv_absmax, qkv_bias, dense_packed, dense_absmax, dense_bias, up_packed,
      up_absmax, up_bias, down_packed, down_absmax, down_bias, intermediate_size, blocksize,
      quant_type, rotary_ndims);
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
  // biases widened (x's dtype -> float32, exact).
  const size_t row = static_cast<size_t>(M);
  const size_t bytes = Scratch::piece(row * std::max(Hd, I) * 4) +
                       Scratch::piece(row * Hd * es) * 5 + Scratch::piece(row * 3 * Hd * es) +
                       Scratch::piece(row * I * es) + Scratch::piece(3 * Hd * 4) +
                       Scratch::piece(Hd * 4) * 2 + Scratch::piece(I * 4);
  Scratch scratch(bytes);
  float* xp = static_cast<float*>(scratch.take(row * std::max(Hd, I) * 4));
  void* h = scratch.take(row * Hd * es);
  void* qkv = scratch.take(row * 3 * Hd * es);
  void* q = scratch.take(row * Hd * es);
  void* attn = scratch.take(row * Hd * es);
  void* a = scratch.take(row * Hd * es);
  void* u = scratch.take(row * I * es);
  void* m = scratch.take(row * Hd * es);
  const auto widen_bias = [&](const c10::optional<at::Tensor>& bias, int64_t n) -> const float* {
    if (!bias.has_value()) return nullptr;
    if (dt == DType::F32) return bias->data_ptr<float>();
    float* out = static_cast<float*>(scratch.take(n * 4));
    for (int64_t i = 0; i < n; ++i) {  // bf16 / fp16 -> float32: exact
      out[i] = dt == DType::BF16 ? static_cast<float>(bias->data_ptr<at::BFloat16>()[i])
                                 : static_cast<float>(bias->data_ptr<at::Half>()[i]);
    }
    return out;
  };
  const float* qkv_b = widen_bias(qkv_bias, 3 * Hd);
  const float* dense_b = widen_bias(dense_bias, Hd);
  const float* up_b = widen_bias(up_bias, I);
  const float* down_b = widen_bias(down_bias, Hd);

  // y[M, n] = in[M, k] @ W.T + bias, in x's dtype.
  const auto linear = [&](const void* in, int64_t k, const at::Tensor& packed,
                          const at::Tensor& absmax, const c10::optional<at::Tensor>& bias,
                          const float* bias_f32, int64_t n, void* y) {
    if (gemm_4bit_cpu_small_ok(M, k, blocksize, isa)) {
      gemm_4bit_cpu_small(in, dt, M, k, k, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                          blocksize, qt, bias_f32, n, y, xp, isa);
      return;
    }
    // Many tokens, or a layout that is not row-aligned: gemm_4bit's general
    // path (dequantized panels through BLAS), which allocates.
    const at::Tensor xin = at::from_blob(const_cast<void*>(in), {M, k}, x.options());
    const at::Tensor out = gemm_4bit_cpu(xin, packed, absmax, bias, n, k, blocksize, quant_type);
    std::memcpy(y, out.data_ptr(), static_cast<size_t>(M * n) * es);
  };
  const auto layer_norm = [&](const at::Tensor& w, const at::Tensor& b) {
    const float* wp = w.data_ptr<float>();
    const float* bp = b.data_ptr<float>();
    const void* xv = x.data_ptr();
    at::parallel_for(0, M, std::max<int64_t>(1, kElementwiseGrain / Hd), [&](int64_t m0, int64_t m1) {
      cpu::layer_norm_rows(xv, dt, Hd, Hd, wp, bp, static_cast<float>(eps), h, Hd, m0, m1, isa);
    });
  };
  const auto residual = [&](const void* add) {
    void* xv = x.data_ptr();
    at::parallel_for(0, M * Hd, kElementwiseGrain, [&](int64_t i0, int64_t i1) {
      cpu::add_inplace(xv, add, dt, i0, i1, isa);
    });
  };
  const auto mlp = [&]() {  // m = down(gelu(up(h)))
    linear(h, Hd, up_packed, up_absmax, up_bias, up_b, I, u);
    at::parallel_for(0, M * I, kElementwiseGrain, [&](int64_t i0, int64_t i1) {
      cpu::gelu_range(u, u, dt, i0, i1, isa);
    });
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
                      double /*rope_theta*/, double /*scale*/, bool /*parallel_residual*/) {
  check_neox_block_args(x, positions, k_cache, v_cache, ln1_weight, ln1_bias, ln2_weight,
                        ln2_bias, eps, qkv_packed, qkv_absmax, qkv_bias, dense_packed,
                        dense_absmax, dense_bias, up_packed, up_absmax, up_bias, down_packed,
                        down_absmax, down_bias, intermediate_size, blocksize, quant_type,
                        rotary_ndims);
}

TORCH_LIBRARY_IMPL(pythia_native, CPU, m) { m.impl("neox_block_", &neox_block_cpu); }

}  // namespace pythia_native
