// Whether this CPU runs the register-tiled float32 kernels (packed_gemm.h, dot_gemm.h, recurrence_cpu.h).
// They are written in 16-float GCC vectors, one zmm register each in the AVX-512 (x86-64-v4) build of a
// kernel. Without AVX-512 GCC has no register for such a vector and keeps every one in memory: the AVX2
// clone of the recurrence ran 37x slower than the AVX-512 one at batch 64, H = 256 (12x at batch 1). So
// on other CPUs (AVX2 or older x86, ARM, or a compiler without the ISA clones) the CPU backend uses ATen's
// GEMMs and the per-step loop instead: correct everywhere, as fast as ATen's BLAS there.
#pragma once

namespace fused_lstm {

// Detected once per process (x86-64-v4: AVX-512 F, BW, DQ and VL), unless set_cpu_vector_kernels says so.
bool cpu_vector_kernels();

// Overrides the detection, so that tests can run both paths on one machine; returns the previous value.
// Forcing the kernels on without AVX-512 is correct but slow (see above).
bool set_cpu_vector_kernels(bool enabled);

}  // namespace fused_lstm
