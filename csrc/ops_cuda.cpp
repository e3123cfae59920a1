// CUDA registrations of the pythia_native ops: check (ops.h), then call the
// raw-pointer launchers of csrc/cuda/*.cu on torch's current stream. Nothing
// here synchronizes the host, so the ops are safe inside CUDA graph capture.
//
// gemm_4bit picks one of two paths:
//   M <= cuda::kGemvMaxM on a row-aligned layout: gemv_4bit, which streams the
//     packed weights once (decode is memory-bound: 0.5 byte per weight);
//   otherwise: dequantize W to x's dtype and call cuBLAS through at::linear
//     (prefill is compute-bound, and tensor-core GEMM beats any decode-fused
//     kernel we have; the transient [N, K] buffer comes from torch's caching
//     allocator).
// c10/cuda only: ATen/cuda/CUDAContext.h would drag in cuBLAS/cuSPARSE headers
// that a bare toolkit (nvcc alone) does not ship.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops.h"
#include "ops_cuda.h"

namespace pythia_native {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& weight, int64_t blocksize,
                                                      const std::string& quant_type) {
  const QuantType qt = check_quantize_args(weight, blocksize, quant_type);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const int64_t numel = w.numel();
  at::Tensor packed = at::empty({(numel + 1) / 2, 1}, w.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({ceil_div(numel, blocksize)}, w.options().dtype(at::kFloat));
  check_launch(cuda::quantize_4bit(w.data_ptr(), to_dtype(w.scalar_type()), numel, blocksize, qt,
                                   packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                   current_stream()),
               "quantize_4bit");
  return {packed, absmax};
}

at::Tensor dequantize_4bit_cuda_impl(const at::Tensor& packed, const at::Tensor& absmax,
                                     int64_t blocksize, QuantType qt, at::IntArrayRef shape,
                                     at::ScalarType dtype) {
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  check_launch(cuda::dequantize_4bit(packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                     out.numel(), blocksize, qt, out.data_ptr(), to_dtype(dtype),
                                     current_stream()),
               "dequantize_4bit");
  return out;
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                                int64_t blocksize, const std::string& quant_type,
                                at::IntArrayRef shape, at::ScalarType dtype) {
  const QuantType qt = check_dequantize_args(packed, absmax, blocksize, quant_type, shape, dtype).qt;
  const c10::cuda::CUDAGuard guard(packed.device());
  return dequantize_4bit_cuda_impl(packed, absmax, blocksize, qt, shape, dtype);
}

at::Tensor gemm_4bit_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const c10::optional<at::Tensor>& bias, int64_t n, int64_t k,
                          int64_t blocksize, const std::string& quant_type,
                          const std::string& compute) {
  // compute="int16" allows rounding x to int16; the GPU kernels are bound by
  // memory, not by the lookups that mode saves on the CPU, so they compute in
  // float32 (within the mode's bound) either way.
  const QuantType qt =
      check_gemm_args(x, packed, absmax, bias, n, k, blocksize, quant_type, compute).qt;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto out_shape = gemm_out_shape(x, n);
  at::Tensor x2 = x.reshape({-1, k});
  const int64_t M = x2.size(0);
  if (M == 0) return at::empty(out_shape, x.options());
  if (x2.stride(-1) != 1) x2 = x2.contiguous();

  const size_t elem = x2.element_size();
  const bool gemv_ok = M <= cuda::kGemvMaxM && k % blocksize == 0 && k % 32 == 0 &&
                       aligned16(packed.data_ptr());
  if (gemv_ok) {
    // The GEMV reads x in 16-byte loads. An x that is not 16-byte aligned
    // (a view at an odd offset), or whose rows are not (row stride not a
    // multiple of 16 bytes; row 1 on is never read at M = 1), is copied to
    // fresh storage (allocator blocks are 512-byte aligned, and k % 32 == 0
    // keeps every row so): M * K elements, against the N * K * 2 bytes that
    // dequantizing the weight for cuBLAS would write and read again.
    if (!aligned16(x2.data_ptr()) || (M > 1 && (x2.stride(0) * elem) % 16 != 0)) {
      x2 = x2.clone(at::MemoryFormat::Contiguous);
    }
    at::Tensor y = at::empty({M, n}, x.options());
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    check_launch(cuda::gemv_4bit(x2.data_ptr(), M, k, x2.stride(0), packed.data_ptr<uint8_t>(),
                                 absmax.data_ptr<float>(), n, blocksize, qt,
                                 b.defined() ? b.data_ptr() : nullptr, y.data_ptr(),
                                 to_dtype(x.scalar_type()), current_stream()),
                 "gemm_4bit");
    return y.view(out_shape);
  }
  const at::Tensor w =
      dequantize_4bit_cuda_impl(packed, absmax, blocksize, qt, {n, k}, x.scalar_type());
  return at::linear(x2, w, bias).view(out_shape);
}

// gemm_f16w on CUDA: a float16 x is cuBLAS's own float16 GEMM (float32
// accumulation, the op's contract as it stands); other x dtypes widen x and W
// to float32 first. Models on CUDA compute in fp16/bf16 and keep their head
// in that dtype, so this path serves completeness and tests, not decoding.
at::Tensor gemm_f16w_cuda(const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias) {
  check_gemm_f16w_args(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.scalar_type() == at::kHalf) return at::linear(x, weight, bias);
  const c10::optional<at::Tensor> bf =
      bias.has_value() ? c10::optional<at::Tensor>(bias->to(at::kFloat)) : c10::nullopt;
  return at::linear(x.to(at::kFloat), weight.to(at::kFloat), bf).to(x.scalar_type());
}

at::Tensor gelu_cuda(const at::Tensor& x) {
  check_gelu_args(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(xc.sizes(), xc.options());
  check_launch(cuda::gelu(xc.data_ptr(), y.data_ptr(), to_dtype(x.scalar_type()), xc.numel(),
                          current_stream()),
               "gelu");
  return y;
}

}  // namespace

uint64_t cuda_stream_create(int64_t device) {
  const int64_t count = c10::cuda::device_count();
  TORCH_CHECK(device >= 0 && device < count, "pythia_native.cuda_stream_create: device must be in "
              "[0, ", count, "), got ", device);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaStream_t stream = nullptr;
  const cudaError_t status = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  TORCH_CHECK(status == cudaSuccess, "pythia_native.cuda_stream_create: ",
              cudaGetErrorString(status));
  return reinterpret_cast<uint64_t>(stream);
}

void cuda_stream_destroy(uint64_t stream) {
  // Work still queued on it completes first (CUDA releases the stream after).
  // An error (at exit the runtime may be gone already) is ignored: nothing
  // can be done about it from a destructor, and the handle is not reused.
  (void)cudaStreamDestroy(reinterpret_cast<cudaStream_t>(stream));
}

TORCH_LIBRARY_IMPL(pythia_native, CUDA, m) {
  m.impl("quantize_4bit", &quantize_4bit_cuda);
  m.impl("dequantize_4bit", &dequantize_4bit_cuda);
  m.impl("gemm_4bit", &gemm_4bit_cuda);
  m.impl("gemm_f16w", &gemm_f16w_cuda);
  m.impl("gelu", &gelu_cuda);
}

}  // namespace pythia_native
