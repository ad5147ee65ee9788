#include "cpu_features.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

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

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// XCR0: which register states the OS saves on a context switch (xgetbv 0).
uint64_t os_saved_states() {
  uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

// Linux gives a process the AMX tile data state (XFEATURE_XTILEDATA, 18) only when asked: without it the
// first tile instruction faults.
bool os_grants_amx() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

CpuBf16Kernels detect_bf16() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if (supported_cpu_kernels() != CpuKernels::avx512) return CpuBf16Kernels::aten;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return CpuBf16Kernels::aten;
  const bool avx512_bf16 = (eax >> 5) & 1;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return CpuBf16Kernels::aten;
  const bool amx = ((edx >> 22) & 1) && ((edx >> 24) & 1);  // AMX-BF16, AMX-TILE
  constexpr uint64_t kTileStates = (uint64_t{1} << 17) | (uint64_t{1} << 18);  // XTILECFG, XTILEDATA
  // The AMX kernel converts and runs its pointwise step with AVX512-BF16 too, so it needs both.
  if (amx && avx512_bf16 && (os_saved_states() & kTileStates) == kTileStates && os_grants_amx()) {
    return CpuBf16Kernels::amx;
  }
  if (avx512_bf16) return CpuBf16Kernels::avx512_bf16;
#endif
  return CpuBf16Kernels::aten;
}

std::atomic<CpuBf16Kernels>& selected_bf16() {
  static std::atomic<CpuBf16Kernels> kernels{supported_cpu_bf16_kernels()};
  return kernels;
}

}  // namespace

CpuBf16Kernels supported_cpu_bf16_kernels() {
  static const CpuBf16Kernels supported = detect_bf16();
  return supported;
}

CpuBf16Kernels cpu_bf16_kernels() {
  return cpu_kernels() == CpuKernels::avx512 ? selected_bf16().load(std::memory_order_relaxed) : CpuBf16Kernels::aten;
}

CpuBf16Kernels set_cpu_bf16_kernels(CpuBf16Kernels kernels) {
  const CpuBf16Kernels supported = supported_cpu_bf16_kernels();
  TORCH_CHECK(static_cast<int>(kernels) <= static_cast<int>(supported), "fused_lstm: this CPU cannot run the '",
              cpu_bf16_kernels_name(kernels), "' bfloat16 kernel (it supports up to '",
              cpu_bf16_kernels_name(supported), "')");
  return selected_bf16().exchange(kernels);
}

const char* cpu_bf16_kernels_name(CpuBf16Kernels kernels) {
  switch (kernels) {
    case CpuBf16Kernels::amx: return "amx";
    case CpuBf16Kernels::avx512_bf16: return "avx512_bf16";
    default: return "aten";
  }
}

constexpr CpuBf16Kernels kAllCpuBf16Kernels[] = {CpuBf16Kernels::aten, CpuBf16Kernels::avx512_bf16,
                                                 CpuBf16Kernels::amx};

CpuBf16Kernels cpu_bf16_kernels_from_name(const char* name) {
  for (const CpuBf16Kernels kernels : kAllCpuBf16Kernels) {
    if (std::strcmp(name, cpu_bf16_kernels_name(kernels)) == 0) return kernels;
  }
  C10_THROW_ERROR(ValueError, c10::str("fused_lstm: unknown CPU bfloat16 kernel '", name,
                                       "'; expected 'aten', 'avx512_bf16' or 'amx'"));
}

std::vector<std::string> supported_cpu_bf16_kernel_names() {
  std::vector<std::string> names;
  for (const CpuBf16Kernels kernels : kAllCpuBf16Kernels) {
    if (static_cast<int>(kernels) <= static_cast<int>(supported_cpu_bf16_kernels())) {
      names.emplace_back(cpu_bf16_kernels_name(kernels));
    }
  }
  return names;
}

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
