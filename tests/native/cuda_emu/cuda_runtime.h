// Shadows the CUDA toolkit's header in the emulated build of csrc/cuda/*.cu
// (see pn_cuda_emu.h); only the native tests put this folder on the path.
#pragma once
#include "pn_cuda_emu.h"
