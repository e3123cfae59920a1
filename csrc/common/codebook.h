// The bitsandbytes 4-bit code tables: the one place in the project that holds
// them. C++ and CUDA include this header; Python reads the same values through
// pythia_native._C.code_table(), so there is no second copy to drift.
//
// Format facts (../shared/docs/FORMAT.md):
//   - blocks run over the weight flattened row-major; absmax is float32;
//   - element 2j is the HIGH nibble of byte j, element 2j+1 the LOW nibble;
//   - dequantization is code[index] * absmax[block] in float32.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PN_HOST_DEVICE __host__ __device__
#else
#define PN_HOST_DEVICE
#endif

namespace pythia_native {

enum class QuantType : int32_t { NF4 = 0, FP4 = 1 };

// Index order, float32. NF4 is sorted ascending; FP4 has bit 3 as the sign.
constexpr float kNF4Code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,
    0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

constexpr float kFP4Code[16] = {
    0.0f, 0.0052083335f, 0.6666667f, 1.0f, 0.33333334f, 0.5f, 0.16666667f, 0.25f,
    -0.0f, -0.0052083335f, -0.6666667f, -1.0f, -0.33333334f, -0.5f, -0.16666667f, -0.25f};

// Host only: the tables are host constexpr arrays, and nvcc rejects an
// __host__ __device__ function naming them as soon as a .cu calls it (even
// from host code). Kernels receive the 16 values as a by-value argument.
inline const float* code_table(QuantType qt) {
  return qt == QuantType::NF4 ? kNF4Code : kFP4Code;
}

// What quantization needs: the code values sorted ascending (ties keep index
// order, as a stable sort does), the 15 float32 midpoints between neighbours,
// and the map from sorted position back to the code index.
//
// Rounding rule (the bitsandbytes CPU rule, bucketize with right=False): a
// scaled value s maps to sorted position p = #{i : bounds[i] < s}, so a value
// exactly on a midpoint takes the LOWER code. For FP4 the two zeros sit at
// sorted positions 7 (+0, index 0) and 8 (-0, index 8) with midpoint 0 between
// them: s == 0 and small negatives round to +0 (index 0), small positives in
// (0, 0.0026] to -0 (index 8). Both dequantize to a zero, which is what the
// format guarantees; bitsandbytes' CUDA quantizer picks other zero bytes.
struct QuantBounds {
  float bounds[15];
  uint8_t order[16];  // sorted position -> code index
};

inline QuantBounds make_quant_bounds(QuantType qt) {
  const float* code = code_table(qt);
  QuantBounds qb{};
  // Stable insertion sort of the 16 indices by value (-0.0 == 0.0 keeps order).
  uint8_t idx[16];
  for (int i = 0; i < 16; ++i) idx[i] = static_cast<uint8_t>(i);
  for (int i = 1; i < 16; ++i) {
    uint8_t v = idx[i];
    int j = i - 1;
    while (j >= 0 && code[idx[j]] > code[v]) {
      idx[j + 1] = idx[j];
      --j;
    }
    idx[j + 1] = v;
  }
  for (int i = 0; i < 16; ++i) qb.order[i] = idx[i];
  for (int i = 0; i < 15; ++i) qb.bounds[i] = (code[idx[i]] + code[idx[i + 1]]) / 2.0f;
  return qb;
}

// Index of the code for an already scaled value s in [-1, 1]. A NaN s (a
// block whose absmax is inf scales its values by 1 / inf = 0, so inf * 0) is
// counted above every bound, as torch.bucketize sorts NaN last in
// bitsandbytes' quantizer: the top code, the same bytes (an ordered compare
// put it at the bottom and turned +inf into -inf).
PN_HOST_DEVICE inline uint8_t quantize_scaled(float s, const QuantBounds& qb) {
  int p = 0;
#if defined(__CUDA_ARCH__)  // host compilers warn on an unknown pragma under -Wall
#pragma unroll
#endif
  for (int i = 0; i < 15; ++i) p += !(qb.bounds[i] >= s) ? 1 : 0;  // bounds[i] < s, or s NaN
  return qb.order[p];
}

// The scale step of bitsandbytes' CPU quantizer, reproduced operation by
// operation so that NF4 bytes match: a full block multiplies by the float32
// reciprocal of absmax, the partial last block divides by absmax, both clamp
// to [-1, 1]. absmax is floored at 1e-38 before use; a full all-zero block
// stores absmax 0, a partial one stores the floored value (as bitsandbytes).
constexpr float kAbsmaxFloor = 1e-38f;

PN_HOST_DEVICE inline float clamp_unit(float v) {
  return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
}

// Validity rules shared by every entry point.
constexpr int64_t kMinBlocksize = 32;
constexpr int64_t kMaxBlocksize = 4096;

inline bool valid_blocksize(int64_t bs) {
  return bs >= kMinBlocksize && bs <= kMaxBlocksize && (bs & (bs - 1)) == 0;
}

}  // namespace pythia_native
