// Software prefetch of a stream of weight bytes read front to back, shared by
// the CPU GEMV kernels (torch-free). `before(upto)` asks for every cache line
// up to `ahead` bytes past `upto` that it has not asked for yet, never past
// `end` (the last byte of the thread's rows): one prefetch per 64 bytes of
// the stream, whatever the call granularity.
//
// Why: the hardware prefetchers stop at every 4 KiB page, so without help the
// FMA work and the memory stalls take turns. Measured on weights streamed from
// DRAM (pythia-160m / 1.4b-shaped 4-bit matrices, M = 1) on a 2-core AVX-512
// Xeon VM, one thread:
//  - prefetching a whole row (+ 4 KiB) before each row took the GEMV from 5.6
//    to 6.4-7.9 GB/s (160m shapes) and 6.2 to 7.6-8.2 GB/s (1.4b shapes);
//  - calling before() once per quant block instead, so that the prefetches
//    come one per 64 bytes consumed rather than in bursts of up to a row's
//    length (128 lines at K = 8192, far more than the 16 line-fill buffers),
//    took it further: 8192x2048 4.7 -> 8.2 GB/s, 5120x15360 5.0 -> 8.6,
//    2048x8192 6.5 -> 8.7, 2048x6144 7.5 -> 9.6, 768x2304 6.6 -> 8.6 in a
//    standalone A/B of the two loops (medians of 6-40 passes over 39-50 MB);
//    through the op (medians of 3 alternated processes, each streaming 42 MB
//    of 160m-, 235 MB of 1.4b-shaped and 157 MB of 5120x15360 matrices):
//    1.4b 6.0 -> 7.0 GB/s, 5120x15360 6.2 -> 6.8, 160m +5% on one thread;
//    10.1 -> 11.9, 9.2 -> 11.8 and +5% on two.
// 4 KiB ahead beat 2 and 8 KiB (T1/T2 hints: no better than T0). Weights
// already in cache lose nothing measurable (bench_gemm_4bit, M = 1).
// gemm_f16w's GEMV no longer uses it: each row of a block asks for its own
// lines from inside the block's loop (cpu/gemm_f16w.cpp), and so does the
// int16 GEMV (cpu/gemv_i16.cpp); both read several streams at once (below).
#pragma once
#include <xmmintrin.h>

#include <algorithm>
#include <cstdint>

namespace pythia_native {
namespace cpu {

constexpr int64_t kPrefetchAhead = 4096;

// Several streams at once. One thread reading one stream front to back, with
// or without software prefetch, draws far less from memory than the core can:
// on a 2-vCPU Xeon (family 6 model 167, 105 MB L3, 2026-12-02; 320 MB read
// with 512-bit loads, a standalone loop) one stream gave 6.2-9.0 GB/s and
// four or eight interleaved streams, megabytes apart, 10.1-13.4 GB/s (huge
// pages: no different); two threads, 13.6-17.5 against 19.9-26.7 GB/s. Read the way the GEMVs read W (blocks of four rows
// side by side, two lines of each per step, prefetching ahead): four
// consecutive rows 9.2-10.4 GB/s, four rows a quarter of the matrix apart
// 15.4-16.1 (eight: 16-17; two: 12.2-12.6). So the int16 GEMV at M = 1
// (cpu/gemv_i16.cpp) and gemm_f16w's GEMV (cpu/gemm_f16w.cpp) take the rows of
// a block that far apart, each prefetching kRowAhead bytes (or a row) on
// along its own stream; 2048 measured better than 4096 or one row alone.
// The float32 4-bit GEMV (cpu/gemm_4bit.cpp) at M = 1 takes its pairs of
// rows half the range apart, two streams with the same per-row prefetch
// (1.05-1.34x one stream from DRAM); read as four streams (rows in turn from
// four quarters, a StreamPrefetcher each, 1-8 KiB ahead) it measured
// 0.89-1.03x one stream: its own work, ~8-9 GB/s per core, binds it first.
constexpr int64_t kRowAhead = 2048;

struct StreamPrefetcher {
  const char* next;
  const char* end;
  int64_t ahead;
  StreamPrefetcher(const void* begin, const void* stop, int64_t ahead_bytes)
      : next(static_cast<const char*>(begin)), end(static_cast<const char*>(stop)),
        ahead(ahead_bytes) {}
  // Call before reading bytes that end at `upto`.
  void before(const void* upto) {
    const char* target = std::min(static_cast<const char*>(upto) + ahead, end);
    for (; next < target; next += 64) _mm_prefetch(next, _MM_HINT_T0);
  }
};

}  // namespace cpu
}  // namespace pythia_native
