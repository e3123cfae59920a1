// The harness of the native kernel tests (no test framework): CHECK counts
// results and prints each failure with its values and the current context
// g_ctx; main() prints "N passed, M failed" and exits non-zero on a failure.
#pragma once
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "common/kernels.h"

namespace native_test {

inline int64_t g_passed = 0;
inline int64_t g_failed = 0;
inline std::string g_ctx;  // what is being tested, printed with each failure
constexpr int64_t kMaxReportedFailures = 100;

inline void report_failure(const char* file, int line, const char* cond, const char* fmt, ...) {
  ++g_failed;
  if (g_failed > kMaxReportedFailures) {
    if (g_failed == kMaxReportedFailures + 1) std::printf("(further failures not shown)\n");
    return;
  }
  std::printf("FAIL %s:%d [%s] %s: ", file, line, g_ctx.c_str(), cond);
  va_list ap;
  va_start(ap, fmt);
  std::vprintf(fmt, ap);
  va_end(ap);
  std::printf("\n");
  std::fflush(stdout);
}

inline std::string fmt(const char* f, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

inline long long ll(int64_t v) { return static_cast<long long>(v); }

// Names for the failure contexts, and bitwise equality of floats (NaN == NaN
// when the bits match, -0 != +0).
inline const char* dt_name(pythia_native::DType dt) {
  using pythia_native::DType;
  return dt == DType::F32 ? "f32" : dt == DType::BF16 ? "bf16" : "f16";
}
inline const char* qt_name(pythia_native::QuantType qt) {
  return qt == pythia_native::QuantType::NF4 ? "nf4" : "fp4";
}
inline bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

// best_isa() and every ISA below it.
inline std::vector<pythia_native::cpu::Isa> supported_isas() {
  using pythia_native::cpu::Isa;
  std::vector<Isa> out;
  for (int i = static_cast<int>(pythia_native::cpu::best_isa()); i >= 0; --i) {
    out.push_back(static_cast<Isa>(i));
  }
  return out;
}

// The last line of a test binary and its exit status.
inline int summary() {
  std::printf("%lld passed, %lld failed\n", ll(g_passed), ll(g_failed));
  return g_failed == 0 ? 0 : 1;
}

}  // namespace native_test

// CHECK(cond, printf-format, values...): the values are evaluated only on failure.
#define CHECK(cond, ...)                                                           \
  do {                                                                             \
    if (cond) {                                                                    \
      ++native_test::g_passed;                                                     \
    } else {                                                                       \
      native_test::report_failure(__FILE__, __LINE__, #cond, __VA_ARGS__);         \
    }                                                                              \
  } while (0)
