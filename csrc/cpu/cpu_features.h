// Which float32 kernels the CPU backend runs on this CPU. fused_lstm's register-tiled kernels (packed_gemm.h,
// dot_gemm.h, recurrence_cpu.h) are built for two instruction sets (simd.h): AVX-512 (x86-64-v4: F, BW, DQ,
// VL) and AVX2 with FMA (x86-64-v3). Elsewhere (older x86, ARM, a compiler without GCC's target attributes)
// float32 takes ATen's GEMMs and the per-step loop, as the other dtypes always do.
#pragma once

#include <string>
#include <vector>

namespace fused_lstm {

enum class CpuKernels { aten = 0, avx2 = 1, avx512 = 2 };  // ordered: each runs where the next does

// The kernels in use: the best this CPU supports, detected once per process, unless set_cpu_kernels says else.
CpuKernels cpu_kernels();

// The best kernels this CPU supports.
CpuKernels supported_cpu_kernels();

// Selects the kernels (for tests and measurements: one machine runs every supported set); returns the previous
// selection. Throws (c10::Error) for a set this CPU cannot run: its instructions would fault.
CpuKernels set_cpu_kernels(CpuKernels kernels);

// Whether float32 runs fused_lstm's own kernels, whichever instruction set.
inline bool cpu_vector_kernels() { return cpu_kernels() != CpuKernels::aten; }

// ---- bfloat16 (csrc/cpu/bf16_recurrence.h) ----
// The product kernel of the bfloat16 recurrence, ordered: each runs where the next does. avx512_bf16 needs the
// avx512 kernels (x86-64-v4) and AVX512_BF16 (vdpbf16ps: AMD Zen 4/5, Intel Cooper Lake and Sapphire Rapids
// on); amx needs AMX-TILE and AMX-BF16 (Intel Sapphire Rapids on) and the kernel's permission to use the tile
// state (Linux: arch_prctl ARCH_REQ_XCOMP_PERM, asked once per process). aten: ATen's GEMM per step.
enum class CpuBf16Kernels { aten = 0, avx512_bf16 = 1, amx = 2 };

// The bfloat16 kernel in use: the best this CPU supports unless set_cpu_bf16_kernels says else, and never more
// than the float32 kernels in use allow (aten unless cpu_kernels() is avx512).
CpuBf16Kernels cpu_bf16_kernels();
CpuBf16Kernels supported_cpu_bf16_kernels();
// For tests and measurements (both kernels run on an AMX CPU); returns the previous selection. Throws
// (c10::Error) for a kernel this CPU cannot run.
CpuBf16Kernels set_cpu_bf16_kernels(CpuBf16Kernels kernels);
const char* cpu_bf16_kernels_name(CpuBf16Kernels kernels);  // "aten", "avx512_bf16", "amx"
CpuBf16Kernels cpu_bf16_kernels_from_name(const char* name);
std::vector<std::string> supported_cpu_bf16_kernel_names();

// "aten", "avx2", "avx512", and back (throws c10::Error naming the choices for any other name).
const char* cpu_kernels_name(CpuKernels kernels);
CpuKernels cpu_kernels_from_name(const char* name);

// The names of the sets this CPU can run, from "aten" up to supported_cpu_kernels().
std::vector<std::string> supported_cpu_kernel_names();

}  // namespace fused_lstm
