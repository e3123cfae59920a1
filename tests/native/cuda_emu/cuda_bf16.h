// Shadows the CUDA toolkit's header in the emulated build of csrc/cuda/*.cu
// (see pn_cuda_emu.h): __nv_bfloat16 as a 16-bit pattern, with the exact
// conversions of common/elements.h (round to nearest even from float).
#pragma once
#include "cuda_fp16.h"

struct __nv_bfloat16 {
  unsigned short __x;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  return pythia_native::cpu::to_f32(pythia_native::cpu::Bf16{h.__x});
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16{pythia_native::cpu::from_f32<pythia_native::cpu::Bf16>(f).bits};
}
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
