// Raw-pointer kernel API: what the torch-aware entry points (csrc/ops*.cpp)
// call after checking their arguments. Nothing here includes a torch header:
// the CPU kernels build into the native C++ tests (CMakeLists.txt) and the
// CUDA files compile in seconds.
//
// Shapes. A 4-bit weight W is [N, K] (out_features x in_features), stored
// flattened row-major: `packed` is uint8[(N*K + 1) / 2] (element 2j in the high
// nibble of byte j), `absmax` float32[ceil(N*K / blocksize)].
// A layout is "row-aligned" when K % blocksize == 0: every row then starts on
// a byte and on a block boundary, which the fast GEMV paths require (every
// Pythia Linear is row-aligned). Other layouts go through dequantize + matmul.
#pragma once

#include <cstdint>

#include "codebook.h"

namespace pythia_native {

// Floating-point element types the kernels read and write.
enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };
inline int64_t dtype_size(DType dt) { return dt == DType::F32 ? 4 : 2; }

namespace cpu {

// Instruction sets the CPU kernels are compiled for; the best one the CPU
// supports is chosen at run time (cpuid), and tests force each in turn.
enum class Isa : int32_t { Scalar = 0, AVX2 = 1, AVX512 = 2 };

Isa best_isa();            // what this CPU supports
Isa active_isa();          // what the kernels use now (best_isa() unless forced)
void set_isa(Isa isa);     // force an ISA; throws std::invalid_argument if unsupported
const char* isa_name(Isa isa);

// Quantize blocks [b0, b1) of w (float32, numel elements). Blocks are written
// whole, including the two nibbles of every byte they touch; the entry point
// hands out block ranges so that no two threads write one byte (a block of an
// even blocksize always starts on a byte boundary).
void quantize_4bit_blocks(const float* w, int64_t numel, int64_t blocksize, QuantType qt,
                          int64_t b0, int64_t b1, uint8_t* packed, float* absmax);

// Dequantize elements [e0, e1) of the flat weight into out[0, e1 - e0) (float32).
void dequantize_4bit_range(const uint8_t* packed, const float* absmax, int64_t blocksize,
                           QuantType qt, int64_t e0, int64_t e1, float* out);

// The float32 AVX2 kernels' code lookup (cpu/gemm_4bit.cpp): two vpermps and
// a blend per 8 codes (Perm) or vpshufb on the codes' four byte planes
// (Shuf). Both give the same codes in the same order, so the same bits; only
// the speed differs (Shuf 1.6x faster on an AMD EPYC, Perm expected faster on
// Intel's single shuffle port). Chosen per CPU (Shuf on AMD) unless forced.
enum class Avx2Decode : int32_t { Perm = 0, Shuf = 1 };
Avx2Decode avx2_decode();            // what the AVX2 kernels use now
void set_avx2_decode(Avx2Decode d);  // force one (tests, measurements)
void reset_avx2_decode();            // back to the CPU's choice
const char* avx2_decode_name(Avx2Decode d);  // "vpermps", "vpshufb"

// Elements per "chunk" of an ISA's unpack: 32 (AVX-512), 32 (AVX2), 2
// (scalar). Within a chunk the vector kernels produce the weights in a fixed
// scrambled order (that is how nibbles unpack without a shuffle, see
// cpu/gemm_4bit.cpp); callers permute x the same way once per call instead
// (permute_k), which leaves every dot product unchanged.
int64_t chunk_elems(Isa isa);

// xp[m, :] = float32(x[m, :]) with each chunk of K in the kernels' weight
// order. x: [M, K] elements of dt with row stride ldx; xp: [M, K] float32
// contiguous. K % chunk_elems == 0. (fp16/bf16 -> float32 is exact.)
// Returns max |x| (NaNs skipped, inf counted), for gemv_code_shift.
float permute_k(const void* x, DType dt, int64_t M, int64_t K, int64_t ldx, Isa isa, float* xp);
// The vector GEMVs sum code * x over a quant block (blocksize / chunk terms
// per lane, |code| <= 1) before scaling by its absmax. For an x whose largest
// |value| is amax, that sum could pass the float32 maximum (inf where the
// reference's (code * absmax) * x is finite) once terms * amax > FLT_MAX
// (blocksize 64: amax above ~1.7e38 with AVX-512, ~8.5e37 with AVX2; 4096:
// ~2.7e36 / ~1.3e36): then they hold the codes scaled by
// 2^-s, 2^s >= terms, and scale y back by 2^s. Powers of two leave every
// rounding as it was except for terms the scaling pushes below float32's
// normal range, negligible beside an amax that large. Returns s: 0 for
// every other x (the unscaled sums, bit for bit), and for the scalar ISA
// (it scales each weight first).
int gemv_code_shift(float amax, int64_t blocksize, Isa isa);
// y[m, n] = sum_k xp[m, k] * W[n, k] + bias[n] for n in [n0, n1), m in [0, M),
// summed in float32 and rounded once to ydt when stored. Row-aligned layouts
// only (K % blocksize == 0). xp from permute_k (same isa); bias (float32) may
// be null; y: elements of ydt with row stride ldy. Reads W from memory
// once for any M (rows of x in groups of 4 per row of W, which stays in L1).
// code_shift: gemv_code_shift of x's permute_k.
void gemv_4bit_rows(const float* xp, int64_t M, int64_t K, const uint8_t* packed,
                    const float* absmax, int64_t blocksize, QuantType qt, const float* bias,
                    int64_t n0, int64_t n1, void* y, DType ydt, int64_t ldy, Isa isa,
                    int code_shift);

// gemm_4bit's compute="int16" GEMV (cpu/gemv_i16.cpp, which defines the
// numerics): x rounded to int16 per 64 elements, exact int32 sums per
// 64-block, float32 across blocks. Two kernels: AVX-512 with VNNI
// (gemv_i16.cpp) and AVX2 + FMA (gemv_i16_avx2.cpp; 8 float32 lanes instead
// of 16, so the two agree to float32 rounding, not bit for bit). Callers
// check gemv_i16_ok (M <= kGemvI16MaxM, K % 128 == 0, 64 <= blocksize, row-
// aligned, an int16 kernel for the active ISA) and otherwise compute in
// float32, which is within the mode's bound. Up to M = 16 rows of x, in
// groups of 4 per pass over each row of W: measured 1.16-2.03x the float32
// tiles' speed at M = 5-16 and 1.05-1.13x at M = 24-32 (AVX-512 kernel, 2-vCPU
// AMD EPYC with AVX-512, one thread, alternated in one process, 2026-12-02),
// so above 16 the more exact tiles keep it.
constexpr int64_t kGemvI16MaxM = 16;
enum class I16Kernel : int32_t { None = 0, AVX2 = 1, AVX512VNNI = 2 };
// The int16 kernel the kernels take under `isa` on this CPU: AVX512VNNI when
// isa is AVX-512 and the CPU has VNNI, AVX2 for AVX-512 without VNNI and for
// AVX2, None for scalar.
I16Kernel i16_kernel(Isa isa);
const char* i16_kernel_name(I16Kernel k);  // "avx512_vnni", "avx2", "none"
bool gemv_i16_ok(int64_t M, int64_t K, int64_t blocksize, Isa isa);
// round(code[c] * 8192): the int16 code table (c in [0, 16)).
int16_t i16_code(QuantType qt, int c);
// x [M, K] (dt, row stride ldx) -> xq int16 [M, K] in kernel k's order and
// its scales xs float32 (max|x| / 32767 per 64-block, times 2^-13), laid out
// as k's lanes use them: AVX512VNNI [M, K / 8] (per pair of 128-element
// groups, its four 64-blocks' scales 4 times each, block b in lanes 4q + b; 0
// for the missing half of an odd last pair), AVX2 [M, K / 64] (one per
// block). Returns false, with xq / xs unspecified, if x holds an inf or NaN.
bool quantize_x_i16(I16Kernel k, const void* x, DType dt, int64_t M, int64_t K, int64_t ldx,
                    int16_t* xq, float* xs);
// y[m, n] for n in [n0, n1), m < M, from quantize_x_i16(k)'s xq / xs; bias
// (float32) may be null; y: elements of ydt with row stride ldy.
void gemv_4bit_i16_rows(I16Kernel k, const int16_t* xq, const float* xs, int64_t M, int64_t K,
                        const uint8_t* packed, const float* absmax, int64_t blocksize,
                        QuantType qt, const float* bias, int64_t n0, int64_t n1, void* y,
                        DType ydt, int64_t ldy);
// The two kernels behind them (k = AVX2 here; AVX512VNNI in gemv_i16.cpp).
bool quantize_x_i16_avx2(const void* x, DType dt, int64_t M, int64_t K, int64_t ldx, int16_t* xq,
                         float* xs);
void gemv_4bit_i16_rows_avx2(const int16_t* xq, const float* xs, int64_t M, int64_t K,
                             const uint8_t* packed, const float* absmax, int64_t blocksize,
                             QuantType qt, const float* bias, int64_t n0, int64_t n1, void* y,
                             DType ydt, int64_t ldy);

// Rows of W per group of the small-M tiles (common/tiles.h). Callers that
// split [0, N) between threads hand out whole groups, so that a row's sums
// never depend on the split.
constexpr int64_t kTileRows = 4;
// The same product for a few dozen rows of x (the small-M GEMM between the
// GEMV and BLAS, common/tiles.h): rows of W dequantized 4 at a time into a
// cache-resident buffer and multiplied by register tiles of rows of x, so
// each weight is decoded once for all M. Same contract as gemv_4bit_rows; the
// sums are of (code * absmax) * x, the panel path's terms, in another order.
void gemm_4bit_tiles(const float* xp, int64_t M, int64_t K, const uint8_t* packed,
                     const float* absmax, int64_t blocksize, QuantType qt, const float* bias,
                     int64_t n0, int64_t n1, void* y, DType ydt, int64_t ldy, Isa isa);

// out[(n - n0) * K + k'] = W[n, k] for n in [n0, n1), in the chunk-permuted k
// order of permute_k: the row decode the small-M tiles use (gemm_4bit_tiles),
// exposed so that the native tests can hold it to permute_k's order. (The
// large-M BLAS panels once used it too; they now decode rows in W's own
// order, dequantize_4bit_range, and x needs no permuted copy.) Row-aligned
// layouts only.
void dequantize_rows_permuted(const uint8_t* packed, const float* absmax, int64_t K,
                              int64_t blocksize, QuantType qt, int64_t n0, int64_t n1,
                              float* out, Isa isa);

// gemm_f16w (a dense layer with a float16 weight, cpu/gemm_f16w.cpp):
// y[m, n] = sum_k x[m, k] * float(w[n, k]) + bias[n] for n in [n0, n1),
// m in [0, M), summed in float32 and rounded once to ydt. x: float32 [M, K]
// contiguous; w: float16 bit patterns [N, K] contiguous; bias (float32) may
// be null; y: elements of ydt with row stride ldy. Any K >= 1.
void gemv_f16w_rows(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* bias,
                    int64_t n0, int64_t n1, void* y, DType ydt, int64_t ldy, Isa isa);
// The same product through the small-M tiles (common/tiles.h): rows of W
// widened 4 at a time, register tiles of x. Vector tiles need K % 16 == 0
// (AVX-512) or K % 8 == 0 and F16C (AVX2); otherwise the scalar tiles run
// (gemm_f16w_tiles_vectorized says which).
bool gemm_f16w_tiles_vectorized(Isa isa, int64_t K);
void gemm_f16w_tiles(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* bias,
                     int64_t n0, int64_t n1, void* y, DType ydt, int64_t ldy, Isa isa);
// out[i] = float(w[i]) for i < count (float16 bit patterns -> float32, exact).
void widen_f16(const uint16_t* w, int64_t count, float* out, Isa isa);
// out[i] = from_f32<Bf16>(in[i]) for i < count (round to nearest even, NaNs
// quieted), the same bits on every ISA: gemm_4bit's bf16 BLAS panels.
// out holds bfloat16 bit patterns.
void narrow_bf16(const float* in, int64_t count, uint16_t* out, Isa isa);

// y[i] = GELU(x[i]) = x Phi(x) (the exact, erf form) for i in [i0, i1), in
// float32 and rounded once to dt (cpu/activation.cpp). x and y: elements of
// dt; y may be x. Every ISA writes the same bits.
void gelu_range(const void* x, void* y, DType dt, int64_t i0, int64_t i1, Isa isa);

// LayerNorm of rows m in [m0, m1) of x ([M, H], row stride ldx, elements of
// dt) into y (row stride ldy, dt; y may be x): y = (x - mean) * rstd * w + b
// with rstd = 1 / sqrt(var + eps), biased variance, float32 math rounded once
// to dt (cpu/norm.cpp gives the summation order). w, b: float32 [H]. Every
// ISA writes the same bits.
void layer_norm_rows(const void* x, DType dt, int64_t ldx, int64_t H, const float* w,
                     const float* b, float eps, void* y, int64_t ldy, int64_t m0, int64_t m1,
                     Isa isa);
// x[i] = x[i] + a[i] for i in [i0, i1): one float32 add rounded to dt (the
// residual of a block). Every ISA writes the same bits.
void add_inplace(void* x, const void* a, DType dt, int64_t i0, int64_t i1, Isa isa);
}  // namespace cpu

namespace cuda {

// All launchers run on `stream`, allocate nothing and never synchronize the
// host, so they can be captured in a CUDA graph. They return the launch
// status (cudaGetLastError()) as an int (cudaError_t) so that this header
// needs no CUDA include; 0 means success.

// w: numel elements of `dt`. One warp per quant block.
int quantize_4bit(const void* w, DType dt, int64_t numel, int64_t blocksize, QuantType qt,
                  uint8_t* packed, float* absmax, void* stream);

// out: numel elements of `dt`, computed as float32 code * absmax, then cast.
int dequantize_4bit(const uint8_t* packed, const float* absmax, int64_t numel,
                    int64_t blocksize, QuantType qt, void* out, DType dt, void* stream);

// Small-M GEMV: y[M, N] = x[M, K] @ W^T + bias, float32 accumulation.
// x: [M, K] with row stride ldx (elements), y: [M, N] contiguous, bias: [N] or
// null; x, y and bias share `dt`. Requirements (checked by the caller, see
// gemm_4bit_cuda in ops_cuda.cpp): row-aligned layout, K % 32 == 0, packed 16-byte
// aligned, x 16-byte aligned with ldx * sizeof(dt) % 16 == 0, M <= kGemvMaxM.
constexpr int64_t kGemvMaxM = 16;
int gemv_4bit(const void* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* packed,
              const float* absmax, int64_t N, int64_t blocksize, QuantType qt, const void* bias,
              void* y, DType dt, void* stream);

// y[i] = GELU(x[i]) for i < n (float32 math: x * normcdff(x), rounded once
// to dt). x, y: n elements of dt; y may be x.
int gelu(const void* x, void* y, DType dt, int64_t n, void* stream);

}  // namespace cuda
}  // namespace pythia_native
