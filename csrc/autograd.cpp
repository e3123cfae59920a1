// Autograd kernels of the pythia_native ops. (Typed calls and kernels use the
// C++ signatures of ops.cpp's kernels, std::string for `str`: the dispatcher
// requires every kernel of an op to share one.)
//
// Why: an op with no Autograd kernel gets torch's fallback, which lets a
// backward through it run and return None for its inputs (with a warning):
// a silently missing gradient. Here every op has one:
//   gemm_4bit   differentiable in x and bias: grad_x = grad @ W with W
//               dequantized in grad's dtype (what bitsandbytes' matmul_4bit
//               does), grad_bias = the sum of grad over the rows (float32
//               sums). The 4-bit weight is frozen: an absmax that requires
//               grad is refused at the call, not given a None gradient.
//   gemm_f16w   differentiable in x, weight and bias (float32 products, then
//               each gradient in its input's dtype).
//   gelu        differentiable in x: at::gelu_backward, the exact (erf)
//               derivative Phi(x) + x * phi(x) of the op's GELU.
//   rotary_kv_cache_, neox_block_
//               (inference ops that write caches / x in place) refuse a call
//               with grad mode on and any argument requiring grad. torch's
//               fallback would let it run: it records no history on the
//               arguments written (x kept its old grad_fn, so a backward
//               took the block for the identity; gradients to qkv through the
//               caches were silently None).
//   the rest    (quantize/dequantize, dequantize_absmax, decode_attention:
//               inference ops returning new tensors) take torch's
//               autogradNotImplementedFallback: a backward through them raises
//               an error that names the op.
// The in-place ops bump the version counters of what they write in their
// kernels (ops.h: bump_version), which these kernels do not.
// All of these redispatch below autograd at once when no input requires
// grad (and are skipped entirely under torch.inference_mode, where generate
// runs), so the decode path pays nothing for them.
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string>

namespace pythia_native {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_gemm_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const c10::optional<at::Tensor>& bias, int64_t n, int64_t k,
                          int64_t blocksize, const std::string& quant_type,
                          const std::string& compute) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pythia_native::gemm_4bit", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const c10::optional<at::Tensor>&,
                                               int64_t, int64_t, int64_t, const std::string&,
                                               const std::string&)>();
  return op.call(x, packed, absmax, bias, n, k, blocksize, quant_type, compute);
}

at::Tensor call_dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax,
                                int64_t blocksize, const std::string& quant_type,
                                at::IntArrayRef shape, at::ScalarType dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pythia_native::dequantize_4bit", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t,
                                               const std::string&, at::IntArrayRef,
                                               at::ScalarType)>();
  return op.call(packed, absmax, blocksize, quant_type, shape, dtype);
}

at::Tensor call_gemm_f16w(const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pythia_native::gemm_f16w", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                            const c10::optional<at::Tensor>&)>();
  return op.call(x, weight, bias);
}

at::Tensor call_gelu(const at::Tensor& x) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pythia_native::gelu", "")
                             .typed<at::Tensor(const at::Tensor&)>();
  return op.call(x);
}

// grad [..., n] summed over every row to [n] in float32, then in `dtype`.
at::Tensor bias_grad(const at::Tensor& grad, int64_t n, at::ScalarType dtype) {
  return grad.reshape({-1, n}).sum(0, /*keepdim=*/false, at::kFloat).to(dtype);
}

// needs_input_grad(i) counts the tensor inputs a Function was given, and an
// absent optional bias is none: its index exists only when a bias was passed
// (the backward asks only then; without the check it read past the end).
bool has_tensor(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

class Gemm4bitFunction : public torch::autograd::Function<Gemm4bitFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& absmax, const c10::optional<at::Tensor>& bias,
                            int64_t n, int64_t k, int64_t blocksize, const std::string& quant_type,
                            const std::string& compute) {
    ctx->save_for_backward({packed, absmax});
    ctx->saved_data["n"] = n;
    ctx->saved_data["k"] = k;
    ctx->saved_data["blocksize"] = blocksize;
    ctx->saved_data["quant_type"] = quant_type;
    ctx->saved_data["has_bias"] = has_tensor(bias);
    ctx->saved_data["bias_dtype"] = has_tensor(bias) ? bias->scalar_type() : x.scalar_type();
    const at::AutoDispatchBelowADInplaceOrView below;
    return call_gemm_4bit(x, packed, absmax, bias, n, k, blocksize, quant_type, compute);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];
    const auto saved = ctx->get_saved_variables();
    const int64_t n = ctx->saved_data["n"].toInt(), k = ctx->saved_data["k"].toInt();
    at::Tensor grad_x, grad_bias;
    if (ctx->needs_input_grad(0)) {
      // W [n, k] in grad's dtype; [..., n] @ [n, k] -> [..., k], x's shape.
      const at::Tensor w = call_dequantize_4bit(
          saved[0], saved[1], ctx->saved_data["blocksize"].toInt(),
          ctx->saved_data["quant_type"].toStringRef(), {n, k}, grad.scalar_type());
      grad_x = at::matmul(grad, w);
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) {
      grad_bias = bias_grad(grad, n, ctx->saved_data["bias_dtype"].toScalarType());
    }
    // One entry per forward argument (x, packed, absmax, bias, n, k, blocksize,
    // quant_type, compute).
    return {grad_x, at::Tensor(), at::Tensor(), grad_bias, at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class GemmF16wFunction : public torch::autograd::Function<GemmF16wFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias) {
    ctx->save_for_backward({x, weight});
    ctx->saved_data["has_bias"] = has_tensor(bias);
    ctx->saved_data["bias_dtype"] = has_tensor(bias) ? bias->scalar_type() : x.scalar_type();
    const at::AutoDispatchBelowADInplaceOrView below;
    return call_gemm_f16w(x, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1];
    const int64_t n = weight.size(0), k = weight.size(1);
    // float32 products, as the forward sums (its contract: fp32 accumulation).
    const at::Tensor g = grads[0].to(at::kFloat);
    at::Tensor grad_x, grad_w, grad_bias;
    if (ctx->needs_input_grad(0)) {
      grad_x = at::matmul(g, weight.to(at::kFloat)).to(x.scalar_type());
    }
    if (ctx->needs_input_grad(1)) {
      grad_w = at::matmul(g.reshape({-1, n}).t(), x.reshape({-1, k}).to(at::kFloat))
                   .to(weight.scalar_type());
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) {
      grad_bias = bias_grad(grads[0], n, ctx->saved_data["bias_dtype"].toScalarType());
    }
    return {grad_x, grad_w, grad_bias};
  }
};

class GeluFunction : public torch::autograd::Function<GeluFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    ctx->save_for_backward({x});
    const at::AutoDispatchBelowADInplaceOrView below;
    return call_gelu(x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor x = ctx->get_saved_variables()[0];
    return {at::gelu_backward(grads[0], x, "none")};
  }
};

at::Tensor gemm_4bit_autograd(const at::Tensor& x, const at::Tensor& packed,
                              const at::Tensor& absmax, const c10::optional<at::Tensor>& bias,
                              int64_t n, int64_t k, int64_t blocksize,
                              const std::string& quant_type, const std::string& compute) {
  // Checked here, not in forward (which apply runs with grad mode off): under
  // no_grad a graph is not built, so there is nothing to refuse.
  TORCH_CHECK(!(at::GradMode::is_enabled() && absmax.requires_grad()),
              "pythia_native.gemm_4bit: absmax requires grad, but the 4-bit weight is frozen "
              "(no gradient for it); detach absmax (gradients flow to x and bias)");
  return Gemm4bitFunction::apply(x, packed, absmax, bias, n, k, blocksize, quant_type, compute);
}

at::Tensor gemm_f16w_autograd(const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  return GemmF16wFunction::apply(x, weight, bias);
}

at::Tensor gelu_autograd(const at::Tensor& x) { return GeluFunction::apply(x); }

// Autograd kernel of the in-place inference ops (boxed: one for both).
void refuse_grad_in_place(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                          torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  if (at::GradMode::is_enabled()) {
    const size_t first = stack->size() - args.size();
    for (size_t i = 0; i < args.size(); ++i) {
      const c10::IValue& v = (*stack)[first + i];
      TORCH_CHECK(!(v.isTensor() && v.toTensor().requires_grad()), "pythia_native.",
                  op.schema().name().substr(op.schema().name().find("::") + 2), ": ",
                  args[i].name(), " requires grad, but this op writes its results in place and "
                  "has no backward; call it under torch.no_grad() or torch.inference_mode(), or "
                  "detach ", args[i].name());
    }
  }
  const at::AutoDispatchBelowADInplaceOrView below;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(pythia_native, Autograd, m) {
  m.impl("gemm_4bit", &gemm_4bit_autograd);
  m.impl("gemm_f16w", &gemm_f16w_autograd);
  m.impl("gelu", &gelu_autograd);
  for (const char* op : {"quantize_4bit", "dequantize_4bit", "dequantize_absmax",
                         "decode_attention"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
  for (const char* op : {"rotary_kv_cache_", "neox_block_"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&refuse_grad_in_place>());
  }
}

}  // namespace pythia_native
