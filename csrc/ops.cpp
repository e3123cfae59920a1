// The op schemas of pythia_native (declared once, here), the argument checks
// every device shares, the CPU kernels' registrations, and the pybind11 module
// that reports what was compiled in. CUDA registrations live in ops_cuda.cpp.
//
// Ops (torch.ops.pythia_native.*):
//   quantize_4bit(weight, blocksize, quant_type) -> (packed, absmax)
//   dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype) -> W
//   dequantize_absmax(absmax_q, nested_absmax, nested_code, offset, nested_blocksize) -> absmax
//   gemm_4bit(x, packed, absmax, bias, n, k, blocksize, quant_type, compute) -> x @ W.T + bias
//   gemm_f16w(x, weight, bias) -> x @ float(weight).T + bias (float16 weight, float32 sums)
//   rotary_kv_cache_(qkv, positions, k_cache!, v_cache!, rotary_ndims, rope_theta) -> q
//   decode_attention(q, k_cache, v_cache, positions, scale) -> out
//   gelu(x) -> x * Phi(x) (exact GELU, float32 math)
//   neox_block_(x!, positions, k_cache!, v_cache!, layer norms, 4 x (packed, absmax,
//               bias), ...) -> () (a GPT-NeoX block of a decode step, block.cpp)
// (the attention ops' kernels are registered in attention.cpp / attention_cuda.cpp)
#include "ops.h"
#include "attention.h"
#include "common/attention_kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/safe_numerics.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace pythia_native {

QuantType parse_quant_type(const std::string& quant_type) {
  if (quant_type == "nf4") return QuantType::NF4;
  if (quant_type == "fp4") return QuantType::FP4;
  TORCH_CHECK(false, "pythia_native: quant_type must be 'nf4' or 'fp4', got '", quant_type, "'");
}

bool parse_compute(const std::string& compute, const char* op) {
  if (compute == "float32") return false;
  if (compute == "int16") return true;
  TORCH_CHECK(false, "pythia_native.", op, ": compute must be 'float32' or 'int16', got '", compute,
              "'");
}

void check_blocksize(int64_t blocksize) {
  TORCH_CHECK(valid_blocksize(blocksize),
              "pythia_native: blocksize must be a power of two in [", kMinBlocksize, ", ",
              kMaxBlocksize, "], got ", blocksize);
}

void check_float_dtype(const at::Tensor& t, const char* name, const char* op) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, "pythia_native.", op,
              ": ", name, " must be float32, float16 or bfloat16, got ", s);
}

int64_t weight_numel(int64_t n, int64_t k, const char* op) {
  int64_t numel = 0;
  TORCH_CHECK(!c10::mul_overflows(n, k, &numel) && numel <= kMaxWeightNumel, "pythia_native.",
              op, ": a weight of shape (", n, ", ", k, ") has more than 2^62 elements");
  return numel;
}

void check_packed(const at::Tensor& packed, const at::Tensor& absmax, int64_t numel,
                  int64_t blocksize, const char* op, const char* name) {
  TORCH_CHECK(numel >= 0 && numel <= kMaxWeightNumel, "pythia_native.", op, ": ", name,
              "weight element count ", numel, " is outside [0, 2^62]");
  TORCH_CHECK(packed.scalar_type() == at::kByte, "pythia_native.", op, ": ", name,
              "packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "pythia_native.", op, ": ", name,
              "absmax must be float32 (decode double-quantized absmax with "
              "dequantize_absmax first), got ",
              absmax.scalar_type());
  TORCH_CHECK(packed.device() == absmax.device(), "pythia_native.", op, ": ", name, "packed and ",
              name, "absmax must be on the same device, got ", packed.device(), " and ",
              absmax.device());
  TORCH_CHECK(packed.numel() == (numel + 1) / 2, "pythia_native.", op, ": ", name,
              "packed must hold (", numel, " + 1) / 2 = ", (numel + 1) / 2, " bytes for ", numel,
              " weights, got shape ", packed.sizes());
  TORCH_CHECK(absmax.numel() == ceil_div(numel, blocksize), "pythia_native.", op, ": ", name,
              "absmax must hold ceil(", numel, " / ", blocksize, ") = ", ceil_div(numel, blocksize),
              " block scales, got shape ", absmax.sizes());
  TORCH_CHECK(packed.is_contiguous(), "pythia_native.", op, ": ", name, "packed must be contiguous");
  TORCH_CHECK(absmax.is_contiguous(), "pythia_native.", op, ": ", name, "absmax must be contiguous");
}

void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x, int64_t n,
                const char* op, const char* name) {
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.device() == x.device(), "pythia_native.", op, ": ", name,
              "bias must be on x's device ", x.device(), ", got ", b.device());
  TORCH_CHECK(b.scalar_type() == x.scalar_type(), "pythia_native.", op, ": ", name,
              "bias must have x's dtype ", x.scalar_type(), ", got ", b.scalar_type());
  TORCH_CHECK(b.dim() == 1 && b.size(0) == n, "pythia_native.", op, ": ", name,
              "bias must have shape [", n, "], got ", b.sizes());
}

GemmArgs check_gemm_args(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                         const c10::optional<at::Tensor>& bias, int64_t n, int64_t k,
                         int64_t blocksize, const std::string& quant_type,
                         const std::string& compute) {
  check_blocksize(blocksize);
  TORCH_CHECK(n >= 1 && k >= 1, "pythia_native.gemm_4bit: the weight shape (n, k) must be "
              "positive, got (", n, ", ", k, ")");
  check_float_dtype(x, "x", "gemm_4bit");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, "pythia_native.gemm_4bit: x must have shape "
              "[..., k] with k = ", k, ", got ", x.sizes());
  TORCH_CHECK(x.device() == packed.device(), "pythia_native.gemm_4bit: x and packed must be on "
              "the same device, got ", x.device(), " and ", packed.device());
  check_packed(packed, absmax, weight_numel(n, k, "gemm_4bit"), blocksize, "gemm_4bit");
  check_bias(bias, x, n, "gemm_4bit");
  const QuantType qt = parse_quant_type(quant_type);
  return {qt, parse_compute(compute, "gemm_4bit")};
}

QuantType check_quantize_args(const at::Tensor& weight, int64_t blocksize,
                              const std::string& quant_type) {
  check_blocksize(blocksize);
  const QuantType qt = parse_quant_type(quant_type);
  check_float_dtype(weight, "weight", "quantize_4bit");
  return qt;
}

DequantizeArgs check_dequantize_args(const at::Tensor& packed, const at::Tensor& absmax,
                                     int64_t blocksize, const std::string& quant_type,
                                     at::IntArrayRef shape, at::ScalarType dtype) {
  const QuantType qt = parse_quant_type(quant_type);
  check_blocksize(blocksize);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "pythia_native.dequantize_4bit: dtype must be float32, float16 or bfloat16, got ",
              dtype);
  int64_t numel = 1;
  for (int64_t s : shape) {
    TORCH_CHECK(s >= 0, "pythia_native.dequantize_4bit: shape must be non-negative, got ", shape);
    numel = weight_numel(numel, s, "dequantize_4bit");
  }
  check_packed(packed, absmax, numel, blocksize, "dequantize_4bit");
  return {qt, numel};
}

std::vector<int64_t> gemm_out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

void check_gemm_f16w_args(const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.scalar_type() == at::kHalf, "pythia_native.gemm_f16w: weight must be "
              "float16, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) >= 1 && weight.size(1) >= 1,
              "pythia_native.gemm_f16w: weight must have shape [n, k] with n, k >= 1, got ",
              weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), "pythia_native.gemm_f16w: weight must be contiguous");
  check_float_dtype(x, "x", "gemm_f16w");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, "pythia_native.gemm_f16w: x must have shape "
              "[..., k] with k = ", k, " (weight is ", weight.sizes(), "), got ", x.sizes());
  TORCH_CHECK(x.device() == weight.device(), "pythia_native.gemm_f16w: x and weight must be on "
              "the same device, got ", x.device(), " and ", weight.device());
  check_bias(bias, x, n, "gemm_f16w");
}

namespace {
// [first, one past the last) byte an element of t can occupy (strides >= 0).
std::pair<const char*, const char*> byte_range(const at::Tensor& t) {
  const char* begin = static_cast<const char*>(t.data_ptr());
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return {begin, begin + (last + 1) * static_cast<int64_t>(t.element_size())};
}

// By address, not by storage: tensors built over one buffer through separate
// storages (torch.from_numpy twice on one array, torch.frombuffer,
// from_dlpack) share memory too, and an op writing one would corrupt the other.
bool share_memory(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0) return false;
  if (!a.has_storage() || !b.has_storage() || a.device() != b.device()) return false;
  const auto ra = byte_range(a), rb = byte_range(b);
  return ra.first < rb.second && rb.first < ra.second;
}
}  // namespace

void check_written_apart(const char* op, c10::ArrayRef<NamedTensor> written,
                         c10::ArrayRef<NamedTensor> read) {
  for (size_t i = 0; i < written.size(); ++i) {
    const NamedTensor& w = written[i];
    for (size_t j = i + 1; j < written.size(); ++j) {
      TORCH_CHECK(!share_memory(w.tensor, written[j].tensor), "pythia_native.", op, ": ", w.name,
                  " and ", written[j].name, " share memory; the op writes both, so they must be "
                  "separate tensors");
    }
    for (const NamedTensor& r : read) {
      TORCH_CHECK(!share_memory(w.tensor, r.tensor), "pythia_native.", op, ": ", r.name,
                  " shares memory with ", w.name, ", which the op writes in place; pass a separate "
                  "tensor (e.g. ", r.name, ".clone())");
    }
  }
}

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: return DType::F32;
  }
}

namespace {

// ------------------------------------------------------------ CPU kernels ---

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& weight, int64_t blocksize,
                                                     const std::string& quant_type) {
  const QuantType qt = check_quantize_args(weight, blocksize, quant_type);
  const int64_t numel = weight.numel();
  const int64_t n_blocks = ceil_div(numel, blocksize);
  at::Tensor packed = at::empty({(numel + 1) / 2, 1}, weight.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({n_blocks}, weight.options().dtype(at::kFloat));
  // fp16/bf16 -> fp32 is exact; the scale and rounding happen in fp32.
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const float* wp = w.data_ptr<float>();
  uint8_t* pp = packed.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  at::parallel_for(0, n_blocks, std::max<int64_t>(1, 16384 / blocksize),
                   [&](int64_t b0, int64_t b1) {
                     cpu::quantize_4bit_blocks(wp, numel, blocksize, qt, b0, b1, pp, ap);
                   });
  return {packed, absmax};
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                               int64_t blocksize, const std::string& quant_type,
                               at::IntArrayRef shape, at::ScalarType dtype) {
  const auto [qt, numel] = check_dequantize_args(packed, absmax, blocksize, quant_type, shape, dtype);
  at::Tensor out = at::empty(shape, packed.options().dtype(at::kFloat));
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* ap = absmax.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, numel, 32768, [&](int64_t e0, int64_t e1) {
    cpu::dequantize_4bit_range(pp, ap, blocksize, qt, e0, e1, op + e0);
  });
  return dtype == at::kFloat ? out : out.to(dtype);
}

// How gemm_4bit's CPU kernel is chosen by M (rows of x), measured with
// benchmarks/bench_gemm_4bit.py on the Pythia layer shapes:
//  - M <= kCpuGemvMaxM: the GEMV streams packed rows (gemv_4bit_rows); W is
//    read once and decoded once per 4 rows of x, which is cheapest there.
//  - up to cpu_tiles_max_m(isa): rows of W dequantized 4 at a time and
//    multiplied by register tiles of x (gemm_4bit_tiles). With AVX-512 it ran
//    ~1.2x the GEMV at M = 8 and ~2x both the GEMV and BLAS at M = 16-64;
//    at M = 128 it tied BLAS, above it lost (x outgrows L2).
//  - above: panels of W dequantized for BLAS (sized in panel_matmul).
// AVX2's tiles are 4 x 2 (16 ymm registers): ahead of BLAS up to M = 16 on the
// machine measured, whose BLAS itself used AVX-512. The scalar tiles never
// beat BLAS, so they exist as the readable definition (and are tested).
// compute="int16" takes its own GEMV up to cpu::kGemvI16MaxM (16) instead.
constexpr int64_t kCpuGemvMaxM = 4;
int64_t cpu_tiles_max_m(cpu::Isa isa) {
  switch (isa) {
    case cpu::Isa::AVX512: return 64;
    case cpu::Isa::AVX2: return 16;
    default: return kCpuGemvMaxM;
  }
}
// gemm_f16w by M: its GEMV (4 rows of x per pass over a float16 row) up to
// M = 8, where the tiles only tied it (the pythia-160m head, cold, 2 threads:
// 6.4 ms both at M = 8); the tiles (K % 16 == 0 with AVX-512, K % 8 with
// AVX2) up to the same limits as gemm_4bit's, where they beat both the GEMV
// and BLAS (M = 16: 8.9 ms vs 9.9 and 14.6; M = 32: 13.6 vs 16.6 and 18.6);
// BLAS panels above.
constexpr int64_t kCpuF16wGemvMaxM = 8;
int64_t f16w_tiles_max_m(cpu::Isa isa, int64_t k) {
  return cpu::gemm_f16w_tiles_vectorized(isa, k) ? cpu_tiles_max_m(isa) : 0;
}
// Rows [0, n) of W split between threads in whole groups of the tiles' rows,
// f(n0, n1) per thread's range.
template <typename F>
void for_tile_row_groups(int64_t n, F f) {
  constexpr int64_t R = cpu::kTileRows;
  at::parallel_for(0, (n + R - 1) / R, 4, [&](int64_t g0, int64_t g1) {
    f(R * g0, std::min(n, R * g1));
  });
}
// Panel size: rows of W per BLAS call, at least 2 MB of float32 (cache-sized
// where that is the largest term), at least kMinPanelRows rows, and at least
// M (x's rows), at most all n rows: BLAS reads all of x again for each panel
// and writes y's columns of a panel as a strided slice, which at prefill
// sizes costs more than a panel outgrowing the L2 (a K = 8192 panel of 2 MB
// is 64 rows). M = 2000, one op, 2 threads, Xeon 167 with a 480 MiB L3, two
// runs: 8192x2048 335-357 -> 229-243 ms, 3072x768 41-43 -> 35-36 ms with 512
// rows; K = 768 (682 rows either way) unchanged; M = 128 the same.
// Temporary memory: one panel (float32 for float32 x, bf16 for bf16 x).
// Where M is the largest term it holds no more elements than x; below M =
// 512 the 512-row floor rules (up to 40 MiB of float32 at k = 20480, 12b's
// down projection, however small M); once M >= n the panel is all of W (at
// M = 2000 on that layer: 3 panels of 1707 rows, ~140 MB of float32).
constexpr int64_t kPanelBytes = 2 << 20;
constexpr int64_t kMinPanelRows = 512;

// The bias in float32 for the CPU epilogues (a no-op when it already is).
c10::optional<at::Tensor> float_bias(const c10::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return c10::nullopt;
  return bias->to(at::kFloat).contiguous();
}

// y = xm @ W.T + bias through BLAS, W materialized a panel of rows at a
// time by fill(r0, i0, i1, out): rows r0 + [i0, i1) of W into out as float32
// (threads split a panel's rows). xm: [M, k] contiguous, float32, or
// bfloat16 to multiply in bf16: each row is then filled into a per-thread
// float32 row and rounded to bf16 into the panel (narrow_bf16: torch's
// rounding for every non-NaN value, without a float32 panel and its copy_);
// BLAS accumulates in float32. bias float32 or none. Returns y [M, n] in xm's dtype.
template <typename Fill>
at::Tensor panel_matmul(const at::Tensor& xm, int64_t n, int64_t k,
                        const c10::optional<at::Tensor>& bias, Fill fill) {
  const int64_t M = xm.size(0);
  at::Tensor y = at::empty({M, n}, xm.options());
  // Split evenly: no short last panel (n = 2304 at M = 2000: 2 x 1152 rows,
  // not 2000 + 304).
  const int64_t max_rows = std::min<int64_t>(n, std::max({kMinPanelRows, M, kPanelBytes / (4 * k)}));
  const int64_t n_panels = (n + max_rows - 1) / max_rows;
  const int64_t panel_rows = (n + n_panels - 1) / n_panels;
  TORCH_INTERNAL_ASSERT(xm.scalar_type() == at::kFloat || xm.scalar_type() == at::kBFloat16);
  const bool bf16_panel = xm.scalar_type() == at::kBFloat16;
  at::Tensor panel_mm = at::empty({panel_rows, k}, xm.options());
  c10::optional<at::Tensor> b = bias;
  if (b.has_value() && bf16_panel) b = b->to(xm.scalar_type());
  const cpu::Isa isa = cpu::active_isa();
  for (int64_t r0 = 0; r0 < n; r0 += panel_rows) {
    const int64_t rows = std::min(panel_rows, n - r0);
    at::parallel_for(0, rows, 4, [&](int64_t i0, int64_t i1) {
      if (!bf16_panel) {
        fill(r0, i0, i1, panel_mm.data_ptr<float>() + i0 * k);
        return;
      }
      std::vector<float> row(static_cast<size_t>(k));
      auto* out = reinterpret_cast<uint16_t*>(panel_mm.data_ptr<at::BFloat16>());
      for (int64_t i = i0; i < i1; ++i) {
        fill(r0, i, i + 1, row.data());
        cpu::narrow_bf16(row.data(), k, out + i * k, isa);
      }
    });
    const at::Tensor w = panel_mm.narrow(0, 0, rows);
    // Straight into y's columns [r0, r0 + rows): a row-major view with
    // leading dimension n, which BLAS takes as it is (no temporary + copy).
    at::Tensor out_slice = y.narrow(1, r0, rows);
    if (b.has_value()) {
      at::addmm_out(out_slice, b->narrow(0, r0, rows), xm, w.t());
    } else {
      at::mm_out(out_slice, xm, w.t());
    }
  }
  return y;
}

}  // namespace

bool gemm_4bit_cpu_small_ok(int64_t M, int64_t k, int64_t blocksize, cpu::Isa isa) {
  return k % blocksize == 0 && M <= cpu_tiles_max_m(isa);
}

void gemm_4bit_cpu_small(const void* x, DType dt, int64_t M, int64_t k, int64_t ldx,
                         const uint8_t* pp, const float* ap, int64_t blocksize, QuantType qt,
                         const float* bias_p, int64_t n, void* y, float* xp, cpu::Isa isa,
                         bool int16) {
  if (int16 && cpu::gemv_i16_ok(M, k, blocksize, isa)) {
    // xq int16 [M, k] then the scales float32 ([M, k / 8] for the AVX-512
    // kernel, [M, k / 64] for AVX2's): at most 2.5 bytes per element of x,
    // inside xp's 4 (k % 128 == 0 keeps xs 64-byte aligned).
    const cpu::I16Kernel kern = cpu::i16_kernel(isa);
    int16_t* xq = reinterpret_cast<int16_t*>(xp);
    float* xs = reinterpret_cast<float*>(xq + M * k);
    if (cpu::quantize_x_i16(kern, x, dt, M, k, ldx, xq, xs)) {
      at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
        cpu::gemv_4bit_i16_rows(kern, xq, xs, M, k, pp, ap, blocksize, qt, bias_p, n0, n1, y, dt,
                                n);
      });
      return;
    }
    // An inf or NaN in x: the float32 GEMV below, which propagates it.
  }
  const float amax = cpu::permute_k(x, dt, M, k, ldx, isa, xp);
  if (M <= kCpuGemvMaxM) {
    // Each thread streams a contiguous range of weight rows.
    const int shift = cpu::gemv_code_shift(amax, blocksize, isa);
    at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
      cpu::gemv_4bit_rows(xp, M, k, pp, ap, blocksize, qt, bias_p, n0, n1, y, dt, n, isa, shift);
    });
  } else {
    for_tile_row_groups(n, [&](int64_t n0, int64_t n1) {
      cpu::gemm_4bit_tiles(xp, M, k, pp, ap, blocksize, qt, bias_p, n0, n1, y, dt, n, isa);
    });
  }
}

at::Tensor gemm_4bit_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                         const c10::optional<at::Tensor>& bias, int64_t n, int64_t k,
                         int64_t blocksize, const std::string& quant_type,
                         const std::string& compute) {
  const auto [qt, int16] =
      check_gemm_args(x, packed, absmax, bias, n, k, blocksize, quant_type, compute);
  const auto out_shape = gemm_out_shape(x, n);
  const at::Tensor x2 = x.reshape({-1, k});
  const int64_t M = x2.size(0);
  if (M == 0) return at::empty(out_shape, x.options());

  const c10::optional<at::Tensor> bf = float_bias(bias);
  const float* bias_p = bf.has_value() ? bf->data_ptr<float>() : nullptr;
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* ap = absmax.data_ptr<float>();
  const cpu::Isa isa = cpu::active_isa();
  const at::Tensor xs = x2.stride(-1) == 1 ? x2 : x2.contiguous();

  if (gemm_4bit_cpu_small_ok(M, k, blocksize, isa)) {
    // x widened to float32 and put in the kernels' chunk order in one pass
    // (see permute_k in cpu/gemm_4bit.cpp); y written in x's dtype by the
    // kernels' epilogue, so a decode-sized call makes two allocations.
    at::Tensor xp = at::empty({M, k}, x.options().dtype(at::kFloat));
    at::Tensor y = at::empty({M, n}, x.options());
    gemm_4bit_cpu_small(xs.data_ptr(), to_dtype(x.scalar_type()), M, k, xs.stride(0), pp, ap,
                        blocksize, qt, bias_p, n, y.data_ptr(), xp.data_ptr<float>(), isa, int16);
    return y.view(out_shape);
  }

  // Large M (or a layout that is not row-aligned): dequantize panels of W
  // (sized in panel_matmul) and let BLAS multiply them, in float32 (bf16 x:
  // in bf16).
  // The panels hold W's rows in their own order (the flat-index decode, which
  // also takes rows that straddle blocks or start mid-byte), so x goes to
  // BLAS as it is: float32 or bf16 x without a copy when its rows are
  // contiguous. (The GEMV's chunk order, permute_k, cost a copy of x per call
  // here.)
  const at::Tensor xp = x.scalar_type() == at::kBFloat16 ? xs.contiguous()
                                                         : xs.to(at::kFloat).contiguous();
  const auto fill = [&](int64_t r0, int64_t i0, int64_t i1, float* out) {
    cpu::dequantize_4bit_range(pp, ap, blocksize, qt, (r0 + i0) * k, (r0 + i1) * k, out);
  };
  // bf16 x: the panels in bf16 too, for BLAS's bf16 kernels (AMX / AVX512-BF16
  // where the CPU has them): W rounded to bf16 once, as the CUDA path and a
  // plain bf16 F.linear on the dequantized weight do. For pythia-160m's
  // layers at M = 128-1024 on the 2-core Xeon measured, 2-3x faster than the
  // float32 panels (M = 256: 1.7-4.0 ms against 5.8-8.7), the relative error
  // ~3e-3 against 2.5e-3 (most of both is y's own rounding to bf16). Below
  // M = 64 the float32 tiles stay faster. fp16 x stays float32 (CPU BLAS has
  // no fast fp16 matmul).
  return panel_matmul(xp, n, k, bf, fill).to(x.scalar_type()).view(out_shape);
}

namespace {

at::Tensor gemm_f16w_cpu(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias) {
  check_gemm_f16w_args(x, weight, bias);
  const int64_t n = weight.size(0), k = weight.size(1);
  const auto out_shape = gemm_out_shape(x, n);
  const at::Tensor x2 = x.reshape({-1, k});
  const int64_t M = x2.size(0);
  if (M == 0) return at::empty(out_shape, x.options());
  const c10::optional<at::Tensor> bf = float_bias(bias);
  const float* bias_p = bf.has_value() ? bf->data_ptr<float>() : nullptr;
  const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::Half>());
  const cpu::Isa isa = cpu::active_isa();
  const at::Tensor xf = x2.to(at::kFloat).contiguous();  // exact for fp16 / bf16 x

  if (M <= f16w_tiles_max_m(isa, k) || M <= kCpuF16wGemvMaxM) {
    at::Tensor y = at::empty({M, n}, x.options());
    const float* xp = xf.data_ptr<float>();
    void* y_p = y.data_ptr();
    const DType ydt = to_dtype(x.scalar_type());
    if (M <= kCpuF16wGemvMaxM) {
      at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
        cpu::gemv_f16w_rows(xp, M, k, wp, bias_p, n0, n1, y_p, ydt, n, isa);
      });
    } else {
      for_tile_row_groups(n, [&](int64_t n0, int64_t n1) {
        cpu::gemm_f16w_tiles(xp, M, k, wp, bias_p, n0, n1, y_p, ydt, n, isa);
      });
    }
    return y.view(out_shape);
  }
  // Larger M: widen panels of W (sized in panel_matmul) to float32 for BLAS.
  const auto fill = [&](int64_t r0, int64_t i0, int64_t i1, float* out) {
    cpu::widen_f16(wp + (r0 + i0) * k, (i1 - i0) * k, out, isa);
  };
  return panel_matmul(xf, n, k, bf, fill).to(x.scalar_type()).view(out_shape);
}

}  // namespace

void gelu_cpu_run(const void* x, void* y, DType dt, int64_t n, cpu::Isa isa) {
  at::parallel_for(0, n, kCpuElementwiseGrain, [&](int64_t i0, int64_t i1) {
    cpu::gelu_range(x, y, dt, i0, i1, isa);
  });
}

void check_gelu_args(const at::Tensor& x) { check_float_dtype(x, "x", "gelu"); }

void check_dequantize_absmax_args(const at::Tensor& absmax_q, const at::Tensor& nested_absmax,
                                  const at::Tensor& nested_code, double offset,
                                  int64_t nested_blocksize) {
  TORCH_CHECK(absmax_q.scalar_type() == at::kByte, "pythia_native.dequantize_absmax: absmax_q "
              "must be uint8, got ", absmax_q.scalar_type());
  TORCH_CHECK(nested_absmax.scalar_type() == at::kFloat, "pythia_native.dequantize_absmax: "
              "nested_absmax must be float32, got ", nested_absmax.scalar_type());
  TORCH_CHECK(nested_code.scalar_type() == at::kFloat && nested_code.numel() == 256,
              "pythia_native.dequantize_absmax: nested_code must be float32 with 256 entries, "
              "got ", nested_code.scalar_type(), " ", nested_code.sizes());
  // bitsandbytes nests in blocks of 256; any size works here, bounded so
  // that ceil(n / nested_blocksize) cannot overflow.
  TORCH_CHECK(nested_blocksize >= 1 && nested_blocksize <= (int64_t{1} << 31),
              "pythia_native.dequantize_absmax: nested_blocksize must be in [1, 2^31], got ",
              nested_blocksize);
  TORCH_CHECK(std::isfinite(static_cast<float>(offset)), "pythia_native.dequantize_absmax: "
              "offset must be a finite float32, got ", offset);
  const int64_t n = absmax_q.numel();
  TORCH_CHECK(nested_absmax.numel() == ceil_div(n, nested_blocksize),
              "pythia_native.dequantize_absmax: nested_absmax must hold ceil(", n, " / ",
              nested_blocksize, ") = ", ceil_div(n, nested_blocksize), " values, got ",
              nested_absmax.sizes());
  TORCH_CHECK(absmax_q.device() == nested_absmax.device() &&
                  absmax_q.device() == nested_code.device(),
              "pythia_native.dequantize_absmax: absmax_q, nested_absmax and nested_code must "
              "be on one device");
}

namespace {

at::Tensor gelu_cpu(const at::Tensor& x) {
  check_gelu_args(x);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(xc.sizes(), xc.options());
  gelu_cpu_run(xc.data_ptr(), y.data_ptr(), to_dtype(x.scalar_type()), xc.numel(),
               cpu::active_isa());
  return y;
}

// Double quantization: absmax[i] = nested_code[absmax_q[i]] * nested_absmax[i / nb] + offset.
// A load-time decode (one float per 64 weights), written with torch ops so
// that it runs on every device.
at::Tensor dequantize_absmax(const at::Tensor& absmax_q, const at::Tensor& nested_absmax,
                             const at::Tensor& nested_code, double offset,
                             int64_t nested_blocksize) {
  check_dequantize_absmax_args(absmax_q, nested_absmax, nested_code, offset, nested_blocksize);
  const int64_t n = absmax_q.numel();
  const at::Tensor q = absmax_q.reshape({-1}).to(at::kLong);
  // Block i / nb of each value, gathered: n values whatever nb is (repeating
  // each nested scale nb times would allocate ceil(n / nb) * nb).
  const at::Tensor block =
      at::arange(n, absmax_q.options().dtype(at::kLong)).floor_divide(nested_blocksize);
  const at::Tensor scale = nested_absmax.reshape({-1}).index_select(0, block);
  return (nested_code.reshape({-1}).index_select(0, q) * scale + offset).to(at::kFloat);
}

}  // namespace

TORCH_LIBRARY(pythia_native, m) {
  // Fake (meta) kernels are registered in Python (pythia_native/ops.py).
  m.set_python_module("pythia_native.ops");
  m.def("quantize_4bit(Tensor weight, int blocksize, str quant_type) -> (Tensor, Tensor)");
  m.def("dequantize_4bit(Tensor packed, Tensor absmax, int blocksize, str quant_type, "
        "int[] shape, ScalarType dtype) -> Tensor");
  m.def("dequantize_absmax(Tensor absmax_q, Tensor nested_absmax, Tensor nested_code, "
        "float offset, int nested_blocksize) -> Tensor");
  m.def("gemm_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor? bias, int n, int k, "
        "int blocksize, str quant_type, str compute=\"float32\") -> Tensor");
  m.def("gemm_f16w(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // Writes k and v of every token into the caches (a!, b!), returns rotated q.
  m.def("rotary_kv_cache_(Tensor qkv, Tensor positions, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, int rotary_ndims, float rope_theta) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor positions, "
        "float scale) -> Tensor");
  m.def("gelu(Tensor x) -> Tensor");
  // One GPT-NeoX block of a decode step, x updated in place (block.cpp).
  m.def("neox_block_(Tensor(a!) x, Tensor positions, Tensor(b!) k_cache, Tensor(c!) v_cache, "
        "Tensor ln1_weight, Tensor ln1_bias, Tensor ln2_weight, Tensor ln2_bias, float eps, "
        "Tensor qkv_packed, Tensor qkv_absmax, Tensor? qkv_bias, "
        "Tensor dense_packed, Tensor dense_absmax, Tensor? dense_bias, "
        "Tensor up_packed, Tensor up_absmax, Tensor? up_bias, "
        "Tensor down_packed, Tensor down_absmax, Tensor? down_bias, "
        "int intermediate_size, int blocksize, str quant_type, int rotary_ndims, "
        "float rope_theta, float scale, bool parallel_residual, "
        "str compute=\"float32\") -> ()");
}

TORCH_LIBRARY_IMPL(pythia_native, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
  m.impl("gemm_4bit", &gemm_4bit_cpu);
  m.impl("gemm_f16w", &gemm_f16w_cpu);
  m.impl("gelu", &gelu_cpu);
}

TORCH_LIBRARY_IMPL(pythia_native, CompositeExplicitAutograd, m) {
  m.impl("dequantize_absmax", &dequantize_absmax);
}

}  // namespace pythia_native

#ifndef PN_CUDA_ARCHS
#define PN_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, mod) {
  using namespace pythia_native;
  mod.doc() = "pythia-native compiled core: ops are under torch.ops.pythia_native";
  mod.def("build_info", []() {
    pybind11::dict info;
#ifdef PN_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cuda_archs"] = std::string(PN_CUDA_ARCHS);
    info["cpu_isa_best"] = std::string(cpu::isa_name(cpu::best_isa()));
    info["cpu_isa_active"] = std::string(cpu::isa_name(cpu::active_isa()));
    info["cpu_isas_compiled"] =
        std::vector<std::string>{"scalar", "avx2", "avx512"};
    // Whether gemm_4bit(compute="int16") has an int16 GEMV on this CPU (AVX2
    // is enough); which kernel the best ISA takes ("avx512_vnni", "avx2" or
    // "none") and which the active one does (differs under a forced ISA).
    const cpu::I16Kernel best16 = cpu::i16_kernel(cpu::best_isa());
    info["cpu_gemv_int16"] = best16 != cpu::I16Kernel::None;
    info["cpu_gemv_int16_best"] = std::string(cpu::i16_kernel_name(best16));
    info["cpu_gemv_int16_kernel"] =
        std::string(cpu::i16_kernel_name(cpu::i16_kernel(cpu::active_isa())));
    // The rows of x (M) up to which it does.
    info["cpu_gemv_int16_max_m"] = cpu::kGemvI16MaxM;
    // The float32 AVX2 kernels' code lookup on this CPU ("vpermps" or
    // "vpshufb"; the same bits either way, see kernels.h Avx2Decode).
    info["cpu_avx2_decode"] = std::string(cpu::avx2_decode_name(cpu::avx2_decode()));
    return info;
  }, "What this build has: CUDA yes/no and archs, CPU ISAs compiled and chosen, "
     "whether the CPU has an int16 GEMV (and which one runs now) and up to which M, "
     "and the float32 AVX2 kernels' code lookup.");
  mod.def("blocksize_range", []() { return std::make_pair(kMinBlocksize, kMaxBlocksize); },
          "(min, max) blocksize the kernels take (powers of two in between).");
  mod.def("attention_head_dims", []() { return std::make_pair(kAttnHeadDimMultiple, kAttnMaxHeadDim); },
          "(multiple, max): the head dims the attention kernels take are the multiples of "
          "`multiple` up to `max`.");
  mod.def("rope_inv_freq", [](int64_t rotary_ndims, double rope_theta) {
    TORCH_CHECK(rotary_ndims >= 0 && rotary_ndims % 2 == 0 && rotary_ndims <= kAttnMaxHeadDim,
                "rope_inv_freq: rotary_ndims must be even, in [0, ", kAttnMaxHeadDim, "], got ", rotary_ndims);
    check_rope_theta(rope_theta, "rope_inv_freq");
    std::vector<float> f(static_cast<size_t>(rotary_ndims / 2));
    rope_inv_freq(rotary_ndims, static_cast<float>(rope_theta), f.data());
    return f;
  }, "The rotary frequencies the attention kernels (CPU and CUDA) rotate by, float32 as a list.");
  mod.def("code_table", [](const std::string& quant_type) {
    const float* c = code_table(parse_quant_type(quant_type));
    return std::vector<float>(c, c + 16);
  }, "The 16 float32 code values of 'nf4' or 'fp4', in index order.");
  mod.attr("absmax_floor") = kAbsmaxFloor;  // common/codebook.h: what a block's absmax is floored at before it divides
  mod.def("cpu_isa", []() { return std::string(cpu::isa_name(cpu::active_isa())); },
          "The ISA the CPU kernels use now.");
  mod.def("set_cpu_isa", [](const std::string& name) {
    cpu::Isa isa;
    if (name == "avx512") isa = cpu::Isa::AVX512;
    else if (name == "avx2") isa = cpu::Isa::AVX2;
    else if (name == "scalar") isa = cpu::Isa::Scalar;
    else if (name == "auto") isa = cpu::best_isa();
    else throw std::invalid_argument("set_cpu_isa: expected 'avx512', 'avx2', "
                                     "'scalar' or 'auto', got '" + name + "'");
    cpu::set_isa(isa);
  }, "Force the CPU kernels onto one ISA ('auto' restores the best one); for tests and "
     "benchmarks.");
  // Each op's argument checks (its arguments, in order), for its fake kernel
  // (pythia_native/ops.py): raise what the op would, return None.
  mod.def("check_quantize_4bit_args", [](const at::Tensor& weight, int64_t blocksize,
                                         const std::string& quant_type) {
    check_quantize_args(weight, blocksize, quant_type);
  });
  mod.def("check_dequantize_4bit_args",
          [](const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
             const std::string& quant_type, std::vector<int64_t> shape, at::ScalarType dtype) {
            check_dequantize_args(packed, absmax, blocksize, quant_type, shape, dtype);
          });
  mod.def("check_dequantize_absmax_args", &check_dequantize_absmax_args);
  mod.def("check_gemm_4bit_args",
          [](const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
             const c10::optional<at::Tensor>& bias, int64_t n, int64_t k, int64_t blocksize,
             const std::string& quant_type, const std::string& compute) {
            check_gemm_args(x, packed, absmax, bias, n, k, blocksize, quant_type, compute);
          });
  mod.def("check_gemm_f16w_args", &check_gemm_f16w_args);
  mod.def("check_gelu_args", &check_gelu_args);
  mod.def("check_rotary_kv_cache_args",
          [](const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& k_cache,
             const at::Tensor& v_cache, int64_t rotary_ndims, double rope_theta) {
            check_rotary_kv_cache_args(qkv, positions, k_cache, v_cache, rotary_ndims, rope_theta);
          });
  mod.def("check_decode_attention_args",
          [](const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
             const at::Tensor& positions, double scale) {
            check_decode_attention_args(q, k_cache, v_cache, positions, scale);
          });
  mod.def("check_neox_block_call", &check_neox_block_call,
          "neox_block_'s checks of a real call: its argument checks, then that x and the caches "
          "share no memory with another argument (its arguments, in order).");
  mod.def("check_neox_block_args", &check_neox_block,
          "neox_block_'s argument checks (its arguments, in order): raise what the op would.");
#ifdef PN_WITH_CUDA
  mod.def("cuda_stream_create", &cuda_stream_create, pybind11::arg("device"),
          "A new non-blocking CUDA stream on `device`, not from torch's pool, as an integer "
          "handle (for torch.cuda.ExternalStream); release it with cuda_stream_destroy.");
  mod.def("cuda_stream_destroy", &cuda_stream_destroy, pybind11::arg("stream"),
          "Release a stream from cuda_stream_create (its queued work completes first).");
#endif
}
