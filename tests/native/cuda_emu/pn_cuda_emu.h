// A CPU emulation of the slice of CUDA that csrc/cuda/*.cu uses, so that the
// kernels' logic (indexing, bounds, reductions, warp shuffles, barriers, the
// split/combine of flash-decoding) runs in the native tests on a machine
// without a GPU. It is NOT a GPU and NOT the CUDA runtime: it says nothing
// about speed, occupancy, the memory model or graph capture; it runs the
// kernel source as written, one OS thread per CUDA thread.
//
// How a .cu becomes C++ here (CMakeLists.txt, test_cuda_emulated):
//   - cuda_runtime.h / cuda_fp16.h / cuda_bf16.h in this folder shadow the
//     toolkit's and include this header;
//   - cuda_to_cpp.cmake turns each `kernel<...><<<grid, block, smem,
//     stream>>>(args...)` into `::pn_emu::Launch(grid, block, smem,
//     stream).run(kernel<...>, args...)`, and each `__shared__ T name[n];`
//     into a static variable registered with a SharedVar; nothing else in
//     the file changes (a #line directive keeps diagnostics pointing at the
//     .cu).
//
// Execution model of Launch::run (synchronous: the launch returns when the
// grid is done, so "device memory" is plain host memory):
//   - blocks run one after another, in reverse blockIdx order (a kernel that
//     relies on block order, which a GPU does not give, is likelier to show
//     it); within a block every CUDA thread is an OS thread, all started at
//     once, the highest threadIdx first (so a thread 0 that fills shared
//     memory for the others tends to run last: a missing barrier shows);
//   - a __shared__ variable is a static one: one instance per kernel
//     instantiation, which is exactly one per block because blocks never
//     overlap in time. Every registered variable is filled with 0xFF bytes
//     (NaN as float) when first registered and before every block, since
//     shared memory starts undefined on a GPU: a read before the block's own
//     write gives NaN, not the last block's values;
//   - __syncthreads() is a barrier of the whole block. Strict: calling it
//     after a thread of the block has returned aborts (on a GPU that is a
//     hang or undefined behaviour);
//   - __shfl_xor_sync(full mask) is a barrier of the warp around an exchange
//     slot per lane. Strict: only the full mask, only full warps, and no lane
//     of the warp may have returned;
//   - __ldg of a 16-byte vector checks 16-byte alignment (an LDG.128 from a
//     misaligned address faults on a GPU);
//   - a launch configuration outside the hardware limits (0 or > 1024
//     threads per block, a grid dimension of 0, grid y/z > 65535, dynamic
//     shared memory, which no kernel here uses) is refused as the runtime
//     refuses it: the kernel does not run and cudaGetLastError() reports it.
// Any violation prints what happened and aborts, so a test cannot pass over it;
// a barrier that cannot complete (threads waiting at different barriers)
// aborts after g_barrier_timeout_s instead of hanging. test_cuda_emulated checks
// that each of these violations does abort.
// Out-of-bounds accesses are found by running the test under
// AddressSanitizer (PN_SANITIZE=address), data races on shared memory under
// ThreadSanitizer (PN_SANITIZE=thread).
//
// Float semantics: float32 arithmetic in C++ with -ffp-contract=off, so
// __fadd_rn / __fmul_rn / __fdiv_rn / fmaf are the IEEE operations the GPU performs.
// expf, powf and sincosf are glibc's, which differ from CUDA's by an ulp or
// two: the tests of the kernels that call them (rotary, decode attention)
// allow that; quantize and dequantize use none and are compared bit for bit.
#pragma once

#include <math.h>

#include <cmath>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/elements.h"  // the exact float <-> f16 / bf16 conversions

// ------------------------------------------------------------ keywords ---
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

// --------------------------------------------------------- vector types ---
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// The built-in variables: per CUDA thread (= per OS thread) for the indices,
// per launch for the dimensions.
inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

// ------------------------------------------------------------- runtime ---
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

namespace pn_emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr,
               "CUDA emulation: %s (block %u,%u,%u thread %u,%u,%u)\n", what, blockIdx.x,
               blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  std::fflush(stderr);
  std::abort();
}

// A barrier wait longer than this is a deadlock (the slowest block here takes
// well under a second, under ThreadSanitizer too). A variable so that the
// test of the timeout itself can shorten it.
inline int g_barrier_timeout_s = 120;

// The __shared__ variables seen so far (address, bytes). A variable registers
// itself the first time its kernel runs (a static SharedVar next to it, see
// cuda_to_cpp.cmake); blocks never run concurrently, so the launcher can
// poison all of them between blocks without a race.
struct SharedRegistry {
  std::mutex mu;
  std::vector<std::pair<void*, size_t>> vars;
};
inline SharedRegistry& shared_registry() {
  static SharedRegistry r;
  return r;
}
struct SharedVar {
  SharedVar(void* p, size_t bytes) {
    std::memset(p, 0xFF, bytes);
    SharedRegistry& r = shared_registry();
    std::lock_guard<std::mutex> lk(r.mu);
    r.vars.emplace_back(p, bytes);
  }
};
inline void poison_shared_memory() {
  SharedRegistry& r = shared_registry();
  std::lock_guard<std::mutex> lk(r.mu);
  for (const auto& v : r.vars) std::memset(v.first, 0xFF, v.second);
}

inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}

// A reusable barrier of n parties that knows which parties have left (a CUDA
// thread that returned). `strict`: waiting while a party has left aborts.
class Barrier {
 public:
  void reset(int n) {
    n_ = n;
    arrived_ = 0;
    left_ = 0;
  }
  int left() {
    std::lock_guard<std::mutex> lk(mu_);
    return left_;
  }
  void leave() {
    std::lock_guard<std::mutex> lk(mu_);
    ++left_;
  }
  // Waits until all n parties arrived; the last one runs on_release (under
  // the lock, before anybody proceeds).
  template <typename F>
  void arrive_and_wait(const char* what, F&& on_release) {
    std::unique_lock<std::mutex> lk(mu_);
    if (left_ != 0) fail(what);
    const uint64_t gen = gen_;
    if (++arrived_ == n_) {
      on_release();
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    const bool done = cv_.wait_for(lk, std::chrono::seconds(g_barrier_timeout_s),
                                   [&] { return gen_ != gen || left_ != 0; });
    if (!done) fail("a barrier wait timed out: threads wait at different barriers (a hang on a GPU)");
    if (gen_ == gen) fail(what);  // a party left while others waited: a hang on a GPU
  }
  void arrive_and_wait(const char* what) {
    arrive_and_wait(what, [] {});
  }
  // leave() that also wakes waiters, so that a wait that can never complete
  // aborts instead of hanging the test.
  void leave_and_wake() {
    std::lock_guard<std::mutex> lk(mu_);
    ++left_;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_ = 0, arrived_ = 0, left_ = 0;
  uint64_t gen_ = 0;
};

constexpr int kWarpSize = 32;

struct Warp {
  Barrier bar;
  int size = 0;                          // lanes that exist (the last warp may be partial)
  unsigned char slot[kWarpSize][8] = {};  // exchange slot per lane
};

// The state of the block being run.
struct Block {
  Barrier sync;  // __syncthreads
  std::vector<Warp> warps;
};
inline thread_local Block* tl_block = nullptr;

inline int linear_tid() {
  return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}

template <typename T>
T shfl_xor(unsigned mask, T v, int lane_mask, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a word");
  if (mask != 0xffffffffu) fail("__shfl_xor_sync: only the full mask is emulated");
  if (width != kWarpSize) fail("__shfl_xor_sync: only width 32 is emulated");
  const int tid = linear_tid();
  Warp& w = tl_block->warps[static_cast<size_t>(tid / kWarpSize)];
  if (w.size != kWarpSize) fail("__shfl_xor_sync with the full mask in a partial warp");
  const int lane = tid % kWarpSize;
  const int src = lane ^ (lane_mask & (kWarpSize - 1));
  std::memcpy(w.slot[lane], &v, sizeof(T));
  w.bar.arrive_and_wait("__shfl_xor_sync after a lane of the warp returned");
  T r;
  std::memcpy(&r, w.slot[src], sizeof(T));
  // Nobody overwrites a slot before every lane has read its partner's.
  w.bar.arrive_and_wait("__shfl_xor_sync after a lane of the warp returned");
  return r;
}

// The launch configuration, and run(kernel, args...) in place of <<<>>>.
class Launch {
 public:
  Launch(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = nullptr)
      : grid_(grid), block_(block), smem_(smem) {
    (void)stream;  // one implicit stream: every launch is synchronous
  }

  template <typename... P, typename... A>
  void run(void (*kernel)(P...), A&&... args) {
    const uint64_t threads = uint64_t{block_.x} * block_.y * block_.z;
    if (threads == 0 || threads > 1024 || block_.z > 64 || grid_.x == 0 || grid_.y == 0 ||
        grid_.z == 0 || grid_.y > 65535 || grid_.z > 65535 || smem_ != 0) {
      last_error() = cudaErrorInvalidConfiguration;
      return;
    }
    // Arguments are converted to the parameter types once, as the runtime
    // copies them into the launch.
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    const int n = static_cast<int>(threads);
    const int n_warps = (n + kWarpSize - 1) / kWarpSize;
    Block block;
    block.warps = std::vector<Warp>(static_cast<size_t>(n_warps));
    const dim3 grid = grid_, bdim = block_;
    for (unsigned bz = grid.z; bz-- > 0;) {
      for (unsigned by = grid.y; by-- > 0;) {
        for (unsigned bx = grid.x; bx-- > 0;) {
          poison_shared_memory();
          block.sync.reset(n);
          for (int w = 0; w < n_warps; ++w) {
            Warp& warp = block.warps[static_cast<size_t>(w)];
            warp.size = (w + 1) * kWarpSize <= n ? kWarpSize : n - w * kWarpSize;
            warp.bar.reset(warp.size);
          }
          std::vector<std::thread> threads_of_block;
          threads_of_block.reserve(static_cast<size_t>(n));
          for (int t = n - 1; t >= 0; --t) {
            threads_of_block.emplace_back([&, t] {
              tl_block = &block;
              blockDim = bdim;
              gridDim = grid;
              blockIdx = dim3(bx, by, bz);
              threadIdx = dim3(static_cast<unsigned>(t) % bdim.x,
                               (static_cast<unsigned>(t) / bdim.x) % bdim.y,
                               static_cast<unsigned>(t) / (bdim.x * bdim.y));
              std::apply(kernel, params);
              // This CUDA thread has returned: barriers it is part of can no
              // longer complete while it is missing.
              block.sync.leave_and_wake();
              block.warps[static_cast<size_t>(t / kWarpSize)].bar.leave_and_wake();
            });
          }
          for (auto& th : threads_of_block) th.join();
        }
      }
    }
  }

 private:
  dim3 grid_, block_;
  size_t smem_;
};

template <typename T>
inline T checked_vector_load(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) fail("misaligned vector load");
  return *p;
}

}  // namespace pn_emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = pn_emu::last_error();
  pn_emu::last_error() = cudaSuccess;
  return e;
}

inline void __syncthreads() {
  pn_emu::tl_block->sync.arrive_and_wait("__syncthreads after a thread of the block returned");
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return pn_emu::shfl_xor(mask, v, lane_mask, width);
}

// Read-only loads: the vectors check their alignment.
template <typename T>
inline T __ldg(const T* p) {
  return pn_emu::checked_vector_load(p);
}

// ----------------------------------------------------- float intrinsics ---
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
// Round-to-nearest IEEE operations (the file is compiled without FMA
// contraction, so these are exactly one rounding each).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
// expf, fabsf, fmaf, fmaxf, powf, sincosf: the C library's, from <math.h>
// (included above), as the global names the kernels call.
// normcdff: CUDA's normal CDF (documented max error 5 ulp), here through
// glibc's erfcf; the two may differ by a few ulp, so the tests compare the
// GELU kernel with a tolerance, not bits.
inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }
