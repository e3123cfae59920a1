// Software prefetch of a stream of weight rows, shared by the CPU GEMV
// kernels (torch-free). Before each row, every cache line up to `ahead` bytes
// past the row's end is asked for, never past `end` (the thread's last row).
//
// Why: measured on weights streamed from DRAM (450 MB of distinct pythia-160m
// / 1.4b-shaped 4-bit matrices, M = 1) on a 2-core AVX-512 Xeon VM, the
// gemm_4bit GEMV went from 5.6 to 6.4-7.9 GB/s on 1 thread and 8.4 to 12-14
// GB/s on 2 for the 160m shapes (6.2 -> 7.6-8.2 and 11.7 -> 13-15 for 1.4b)
// with 2-4 KiB ahead; 8 KiB was worse. The hardware prefetchers alone stop at
// every 4 KiB page, so the FMA work and the memory stalls took turns. Weights
// already in cache lose nothing measurable.
#pragma once
#include <xmmintrin.h>

#include <algorithm>
#include <cstdint>

namespace pythia_native {
namespace cpu {

constexpr int64_t kPrefetchAhead = 4096;

struct RowPrefetcher {
  const char* next;
  const char* end;
  int64_t ahead;
  RowPrefetcher(const void* begin, const void* stop, int64_t ahead_bytes)
      : next(static_cast<const char*>(begin)), end(static_cast<const char*>(stop)),
        ahead(ahead_bytes) {}
  // Call before reading a row that ends at row_end.
  void before(const void* row_end) {
    const char* target = std::min(static_cast<const char*>(row_end) + ahead, end);
    for (; next < target; next += 64) _mm_prefetch(next, _MM_HINT_T0);
  }
};

}  // namespace cpu
}  // namespace pythia_native
