// Scalar element conversions for the three storage types of the CPU kernels:
// exact to float32, round-to-nearest-even from float32 (NaN stays NaN). The
// vector kernels widen in registers instead; these serve the scalar paths,
// the tails and the per-row epilogues. Torch-free, like every kernel header.
#pragma once
#include <cstdint>
#include <cstring>

#include "common/kernels.h"

namespace pythia_native {
namespace cpu {

struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

inline float to_f32(float v) { return v; }
inline float to_f32(Bf16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_f32(F16 v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1fu;
  const uint32_t mant = v.bits & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (mant << 13);  // normal: rebias 15 -> 127
  } else {
    // zero or subnormal: mant * 2^-24, exact in float32
    const float f = static_cast<float>(mant) * 5.9604644775390625e-08f;
    std::memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
inline T from_f32(float f);
template <>
inline float from_f32<float>(float f) {
  return f;
}
template <>
inline Bf16 from_f32<Bf16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return Bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return Bf16{static_cast<uint16_t>(u >> 16)};
}
template <>
inline F16 from_f32<F16>(float f) {
  // Round to nearest even (F. Giesen's float_to_half_fast3_rtne).
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  uint16_t o;
  if (u >= (143u << 23)) {  // >= 65536 (or inf / nan): overflows to inf
    o = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < (113u << 23)) {  // below 2^-14: fp16 subnormal or zero
    float a;
    std::memcpy(&a, &u, 4);
    a += 0.5f;  // aligns the 10 mantissa bits at the bottom; the FPU rounds
    uint32_t r;
    std::memcpy(&r, &a, 4);
    o = static_cast<uint16_t>(r - 0x3f000000u);
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mant_odd;
    o = static_cast<uint16_t>(u >> 13);
  }
  return F16{static_cast<uint16_t>(o | sign)};
}

// y[i] = v rounded to dt (the GEMV epilogues: one store per output element).
inline void store_out(void* y, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::F32: static_cast<float*>(y)[i] = v; break;
    case DType::BF16: static_cast<Bf16*>(y)[i] = from_f32<Bf16>(v); break;
    case DType::F16: static_cast<F16*>(y)[i] = from_f32<F16>(v); break;
  }
}

}  // namespace cpu
}  // namespace pythia_native
