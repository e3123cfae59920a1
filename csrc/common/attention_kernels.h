// Raw-pointer API of the attention kernels: rotary embedding + KV-cache write
// (rotary_kv_cache_) and attention of new queries over the cache
// (decode_attention). Torch-free, like kernels.h: the CPU kernels build into
// the native tests, the CUDA file compiles in seconds. The torch-aware entry
// points (csrc/attention.cpp, csrc/attention_cuda.cpp) check every argument
// first; the guards here only keep a broken call from writing out of bounds.
//
// Shapes (all element counts; "row" strides in elements):
//   qkv        [B, T, H * 3 * D]  fused query_key_value output, viewed per head
//              as [H, 3, D] (q, k, v interleaved per head: GPT-NeoX order);
//              last dim contiguous, row strides stride_b, stride_t
//   positions  int64 [B, T] contiguous: the rotary angle AND the cache slot of
//              each token; negative = padding
//   k_cache, v_cache  [Bc >= B, H, L, D] contiguous
//   q, out     [B, T, H, D] contiguous; "row" r = (b * T + t) * H + h
//
// Numerics: everything is computed in float32 (rotary, scores, softmax, the
// weighted sum); inputs are converted exactly, outputs rounded to nearest even
// once at the end.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels.h"

namespace pythia_native {

// Largest head dim decode_attention supports (Pythia-1b's 256), and the
// granularity it requires: D % 8 == 0 makes every K/V row a whole number of
// 16-byte vectors in fp16/bf16 (8 elements) and fp32 (4 elements).
constexpr int64_t kAttnMaxHeadDim = 256;
constexpr int64_t kAttnHeadDimMultiple = 8;

// inv_freq[j] = 1 / theta^(2j / R) for j < R / 2, in float32 as
// reference.rope_inv_freq (and transformers) compute it: the float32
// exponent, its power, then the reciprocal. The power is libm's powf here,
// torch's vectorized float32 pow there: the same bits for theta = 10000 and
// the suite's rotary_ndims (8, 16, 20, 32, 64: every Pythia model;
// tests/test_attention.py), at most two ulps apart otherwise (some j of R = 96
// at 10000, of other bases): an angle error of pos * 1.2e-7 relative, below
// 1e-5 up to position 2047, more at ~65k positions. Host code: the CPU
// kernels call it, and the CUDA launcher passes its values to the kernel, so
// both devices rotate by the same angles (_C.rope_inv_freq returns them).
inline void rope_inv_freq(int64_t R, float theta, float* inv_freq) {
  for (int64_t j = 0; j < R / 2; ++j) {
    inv_freq[j] = 1.0f / std::pow(theta, static_cast<float>(2 * j) / static_cast<float>(R));
  }
}

namespace cpu {

// Rotary + cache write for the tokens i in [i0, i1) of the flattened [B, T]
// (token i is (b, t) = (i / T, i % T)). For each head: q and k get rotate-half
// rotary on their first rotary_ndims dims (angle pos * inv_freq[j], inv_freq[j]
// = 1 / theta^(2j / rotary_ndims), float32 as rope_inv_freq in reference.py);
// k and v are written at cache[b, h, pos]; q goes to q_out[b, t, h]. A token
// with pos < 0 (padding) gets its q unrotated and writes nothing; pos >= L is
// refused by the entry point and skipped here. qkv, caches and q_out share dt.
// Tokens with equal (b, pos) write the same slot; which one lands is
// unspecified (tokens run in parallel), as in the reference's index_put.
// Isa: the rotation of AVX512 / AVX2 rounds exactly as the scalar loop (a
// product each, then the sum), so every ISA writes the same bits.
void rotary_kv_cache_tokens(const void* qkv, DType dt, int64_t T, int64_t stride_b,
                            int64_t stride_t, const int64_t* positions, int64_t H, int64_t D,
                            int64_t L, int64_t rotary_ndims, float rope_theta, void* k_cache,
                            void* v_cache, void* q_out, int64_t i0, int64_t i1, Isa isa);

// Attention of the rows r in [r0, r1) (r = (b * T + t) * H + h) over the
// cache: row r attends to slots 0 .. min(positions[b, t], L - 1) of sequence
// b, head h; scores = (q . k) * scale; a negative position gives zeros.
// q, caches and out share dt. One pass over the keys (online softmax, blocks
// of kKeyBlock keys), float32 throughout. Requires D % 8 == 0, D <= 256.
// Isa: AVX512 runs the AVX-512 kernel (float32 FMAs: a bf16 dot-product
// instruction would round q to bf16), AVX2 the AVX2 one (fp16
// caches need F16C, present on every AVX2 CPU; checked, scalar otherwise).
void decode_attention_rows(const void* q, const void* k_cache, const void* v_cache, DType dt,
                           const int64_t* positions, int64_t T, int64_t H, int64_t L, int64_t D,
                           float scale, void* out, int64_t r0, int64_t r1, Isa isa);

}  // namespace cpu

namespace cuda {

// Launchers: run on `stream`, allocate nothing, never synchronize the host,
// and take no launch parameter from device memory, so that a decode step can
// be captured once in a CUDA graph and replayed while `positions` changes.
// They return cudaGetLastError() as an int (0 = success).

// CTA (token, c) does elements [128 c, 128 c + 128) of the token's [H, D];
// inv_freq comes from rope_inv_freq on the host, as a kernel argument (so a
// graph replays it). Requires rotary_ndims <= kAttnMaxHeadDim. A token whose
// position is >= L cannot be refused without
// a host sync: its k/v are NOT written (no out-of-bounds write) and its q is
// rotated as for any position. Callers keep positions < L (the CPU op checks).
int rotary_kv_cache(const void* qkv, DType dt, int64_t B, int64_t T, int64_t stride_b,
                    int64_t stride_t, const int64_t* positions, int64_t H, int64_t D, int64_t L,
                    int64_t rotary_ndims, float rope_theta, void* k_cache, void* v_cache,
                    void* q_out, void* stream);

// Flash-decoding: the L slots are cut into decode_attention_splits(L) chunks
// of kDecodeSplitKeys keys; CTA (row, split) writes a partial (max, sum, acc)
// for its chunk and a combine kernel merges the splits of each row with
// log-sum-exp weights. The grid depends on B, T, H and L only, never on the
// positions: a CTA whose chunk starts past its row's position writes an empty
// partial (max = -inf) and exits. Positions >= L attend to all L slots.
// workspace: float32, decode_attention_workspace(B * T * H, L, D) elements.
// k_cache and v_cache must be 16-byte aligned (rows are read with 16-byte
// loads; D % 8 == 0 keeps every row aligned). Requires D % 8 == 0, D <= 256.
constexpr int64_t kDecodeSplitKeys = 128;
inline int64_t decode_attention_splits(int64_t L) {
  return (L + kDecodeSplitKeys - 1) / kDecodeSplitKeys;
}
inline int64_t decode_attention_workspace(int64_t rows, int64_t L, int64_t D) {
  return rows * decode_attention_splits(L) * (D + 2);
}
int decode_attention(const void* q, const void* k_cache, const void* v_cache, DType dt,
                     const int64_t* positions, int64_t B, int64_t T, int64_t H, int64_t L,
                     int64_t D, float scale, float* workspace, void* out, void* stream);

}  // namespace cuda
}  // namespace pythia_native
