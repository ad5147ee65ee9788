#include "cpu_features.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstring>

namespace fused_lstm {
namespace {

CpuKernels detect() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  // The kernels are compiled for these two ISA levels (simd.h, run_kernel), so the whole level is required:
  // GCC may use any of its instructions (BMI2, MOVBE, ... besides the vector ones).
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return CpuKernels::avx512;
  if (__builtin_cpu_supports("x86-64-v3")) return CpuKernels::avx2;
#endif
  return CpuKernels::aten;
}

std::atomic<CpuKernels>& selected() {
  static std::atomic<CpuKernels> kernels{supported_cpu_kernels()};
  return kernels;
}

}  // namespace

CpuKernels supported_cpu_kernels() {
  static const CpuKernels supported = detect();
  return supported;
}

CpuKernels cpu_kernels() { return selected().load(std::memory_order_relaxed); }

CpuKernels set_cpu_kernels(CpuKernels kernels) {
  const CpuKernels supported = supported_cpu_kernels();
  TORCH_CHECK(static_cast<int>(kernels) <= static_cast<int>(supported), "fused_lstm: this CPU cannot run the '",
              cpu_kernels_name(kernels), "' kernels (it supports up to '", cpu_kernels_name(supported), "')");
  return selected().exchange(kernels);
}

const char* cpu_kernels_name(CpuKernels kernels) {
  switch (kernels) {
    case CpuKernels::avx512: return "avx512";
    case CpuKernels::avx2: return "avx2";
    default: return "aten";
  }
}

constexpr CpuKernels kAllCpuKernels[] = {CpuKernels::aten, CpuKernels::avx2, CpuKernels::avx512};

CpuKernels cpu_kernels_from_name(const char* name) {
  for (const CpuKernels kernels : kAllCpuKernels) {
    if (std::strcmp(name, cpu_kernels_name(kernels)) == 0) return kernels;
  }
  C10_THROW_ERROR(ValueError,
                  c10::str("fused_lstm: unknown CPU kernels '", name, "'; expected 'aten', 'avx2' or 'avx512'"));
}

std::vector<std::string> supported_cpu_kernel_names() {
  std::vector<std::string> names;
  for (const CpuKernels kernels : kAllCpuKernels) {
    if (static_cast<int>(kernels) <= static_cast<int>(supported_cpu_kernels())) {
      names.emplace_back(cpu_kernels_name(kernels));
    }
  }
  return names;
}

}  // namespace fused_lstm
