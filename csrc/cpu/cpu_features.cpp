#include "cpu_features.h"

#include <atomic>

namespace fused_lstm {
namespace {

bool detect_avx512() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  // The kernels' ISA clones exist only in GCC x86 builds (step_spans.h, FUSED_LSTM_SIMD_CLONES).
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> enabled{detect_avx512()};
  return enabled;
}

}  // namespace

bool cpu_vector_kernels() { return enabled_flag().load(std::memory_order_relaxed); }

bool set_cpu_vector_kernels(bool enabled) { return enabled_flag().exchange(enabled); }

}  // namespace fused_lstm
