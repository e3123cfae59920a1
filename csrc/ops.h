// Shared by the entry points of every device (ops.cpp, ops_cuda.cpp): argument
// checks that name the offending tensor, and small conversions.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <string>

#include "common/kernels.h"

namespace pythia_native {

QuantType parse_quant_type(const std::string& quant_type);
// gemm_4bit's `compute`: "float32" -> false, "int16" -> true (the CPU GEMV
// may round x to int16 per 64 elements, cpu/gemv_i16.cpp); anything else
// raises, naming the op.
bool parse_compute(const std::string& compute, const char* op);
void check_blocksize(int64_t blocksize);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// What an in-place op's kernel calls on each tensor it wrote (the KV caches,
// neox_block_'s x): their version counters go up, as torch's in-place ops do,
// so autograd refuses a backward through a value saved before the write
// instead of differentiating with the overwritten data. (torch's
// autogradNotImplemented fallbacks bump only mutated *returns*; these ops
// return none of what they write.) An inference tensor has no counter: left
// alone, as torch.autograd.graph.increment_version does.
inline void bump_version(const at::Tensor& written) {
  if (!written.is_inference()) written.unsafeGetTensorImpl()->bump_version();
}

// A tensor argument by name, for check_written_apart (references: a decode
// step checks ~60 pairs per block, without a refcount or a string each).
struct NamedTensor {
  const char* name;
  const at::Tensor& tensor;
};
// An in-place op's `written` tensors must share no memory with each other or
// with any of its `read` ones: its kernels read and write in an order of
// their own (and of the thread count), so an alias (k_cache passed as
// v_cache, qkv a view of a cache, a bias a view of x) gives a result that
// depends on that order. Compares allocations and address ranges (first to
// last element), so it reads data pointers: the real kernels call it, not
// the fake ones. Conservative: two strided views interleaved in one buffer
// without a common element are refused too. Undefined and empty tensors are
// skipped.
void check_written_apart(const char* op, c10::ArrayRef<NamedTensor> written,
                         c10::ArrayRef<NamedTensor> read);

// The element count of a 4-bit weight is at most this (2^62), so that
// (numel + 1) / 2 and ceil(numel / blocksize) cannot overflow int64. Shapes
// whose product exceeds it (or int64) raise instead of wrapping to a small
// count that a tiny packed tensor could match.
constexpr int64_t kMaxWeightNumel = int64_t{1} << 62;
// n * k for a weight [n, k] (n, k >= 0), or an error naming `op` when the
// product exceeds kMaxWeightNumel.
int64_t weight_numel(int64_t n, int64_t k, const char* op);

// A 4-bit weight of `numel` elements: packed uint8 [(numel + 1) / 2] and
// absmax float32 [ceil(numel / blocksize)], contiguous, on one device. `name`
// prefixes the argument names in the errors ("qkv_" -> "qkv_packed ...").
void check_packed(const at::Tensor& packed, const at::Tensor& absmax, int64_t numel,
                  int64_t blocksize, const char* op, const char* name = "");
// bias (if any): [n], x's dtype, x's device; `name` as for check_packed.
void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x, int64_t n,
                const char* op, const char* name = "");

void check_float_dtype(const at::Tensor& t, const char* name, const char* op);

// Every op's argument checks, one function each, run by its CPU and CUDA
// kernels and (through _C.check_<op>_args) by its fake kernel on static
// shapes, so that a traced call fails where the eager one would. They read
// metadata only. (The attention ops': attention.h; neox_block_'s: below.)
QuantType check_quantize_args(const at::Tensor& weight, int64_t blocksize,
                              const std::string& quant_type);
struct DequantizeArgs {
  QuantType qt;
  int64_t numel;  // of the weight
};
DequantizeArgs check_dequantize_args(const at::Tensor& packed, const at::Tensor& absmax,
                                     int64_t blocksize, const std::string& quant_type,
                                     at::IntArrayRef shape, at::ScalarType dtype);
void check_dequantize_absmax_args(const at::Tensor& absmax_q, const at::Tensor& nested_absmax,
                                  const at::Tensor& nested_code, double offset,
                                  int64_t nested_blocksize);
void check_gelu_args(const at::Tensor& x);
struct GemmArgs {
  QuantType qt;
  bool int16;  // compute="int16"
};
GemmArgs check_gemm_args(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                         const c10::optional<at::Tensor>& bias, int64_t n, int64_t k,
                         int64_t blocksize, const std::string& quant_type,
                         const std::string& compute);

// The checks gemm_f16w does on every device: weight float16 [n, k]
// contiguous, x [..., k] float32/float16/bfloat16, bias [n] in x's dtype.
void check_gemm_f16w_args(const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias);

// Output shape of gemm_4bit: x.shape[:-1] + [n].
std::vector<int64_t> gemm_out_shape(const at::Tensor& x, int64_t n);

DType to_dtype(at::ScalarType t);

#ifdef PN_WITH_CUDA
// A CUDA stream of the caller's own on `device` (not one of torch's pooled
// streams; non-blocking, so no implicit sync with the legacy default stream),
// as an integer handle for torch.cuda.ExternalStream, and its release
// (ops_cuda.cpp). The engine captures its CUDA graphs on one: torch keys
// cuBLAS workspaces by stream and, when a graph is reset, frees those of the
// stream it was captured on (pytorch issue #193402), so two engines' graphs
// captured on one pooled stream could free each other's workspace.
uint64_t cuda_stream_create(int64_t device);
void cuda_stream_destroy(uint64_t stream);
#endif

// Element-wise CPU passes (GELU, the block's residual adds) split between
// threads above this many values; a decode step's 768-20,480 run on one
// thread (~3-10 us for GELU, cheaper than a fork of the pool and its cache
// traffic).
constexpr int64_t kCpuElementwiseGrain = 32768;

// gelu's CPU kernel after its checks: y[i] = GELU(x[i]) for i < n, threaded
// (y may be x).
void gelu_cpu_run(const void* x, void* y, DType dt, int64_t n, cpu::Isa isa);

// gemm_4bit's CPU kernel (ops.cpp), for the fused block (block.cpp) to call
// without the dispatcher.
at::Tensor gemm_4bit_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                         const c10::optional<at::Tensor>& bias, int64_t n, int64_t k,
                         int64_t blocksize, const std::string& quant_type,
                         const std::string& compute);
// Its small-M paths (the GEMV up to 4 rows of x, the register tiles above),
// which allocate nothing: whether they take (M, k) -- a row-aligned layout
// and M up to the ISA's tile limit -- and the product itself:
// y[M, n] (elements of dt, contiguous) = x[M, k] (dt, row stride ldx) @ W.T
// + bias (float32 or null), with xp float32 [M, k] scratch. int16: take the
// int16 GEMV where it applies (cpu::gemv_i16_ok, finite x), with xp's bytes
// as its scratch.
bool gemm_4bit_cpu_small_ok(int64_t M, int64_t k, int64_t blocksize, cpu::Isa isa);
void gemm_4bit_cpu_small(const void* x, DType dt, int64_t M, int64_t k, int64_t ldx,
                         const uint8_t* pp, const float* ap, int64_t blocksize, QuantType qt,
                         const float* bias_p, int64_t n, void* y, float* xp, cpu::Isa isa,
                         bool int16 = false);

// neox_block_'s argument checks (block.cpp), the op's arguments in its order:
// the CPU kernel runs them; Python's composition (the CUDA kernel,
// pythia_native/block.py) through _C.check_neox_block_call (these, then the
// aliasing checks), and the fake kernel (ops.py) through _C.check_neox_block_args.
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
                      double rope_theta, double scale, bool parallel_residual,
                      const std::string& compute);
// check_neox_block, then check_written_apart on x and the caches against
// every other tensor argument: what a real call (not a fake one) checks. The
// CPU kernel runs it; the CUDA composition through _C.check_neox_block_call
// (one call per block: a list-building Python check cost ~15 us a block).
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
                           const std::string& compute);

}  // namespace pythia_native
