// Shadows the CUDA toolkit's header in the emulated build of csrc/cuda/*.cu
// (see pn_cuda_emu.h): __half as a 16-bit pattern, with the exact conversions
// of common/elements.h (round to nearest even from float).
#pragma once
#include "pn_cuda_emu.h"

struct __half {
  unsigned short __x;
};
inline float __half2float(__half h) { return pythia_native::cpu::to_f32(pythia_native::cpu::F16{h.__x}); }
inline __half __float2half_rn(float f) {
  return __half{pythia_native::cpu::from_f32<pythia_native::cpu::F16>(f).bits};
}
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
