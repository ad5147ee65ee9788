// The fused pointwise step of the CPU backend over a span of hidden units of one batch row, shared by the
// per-step backend (lstm_cpu.cpp) and the fused recurrence (recurrence_cpu.cpp). Arguments as in
// StepForwardArgs / StepBackwardArgs (csrc/lstm_layer.h); the math is csrc/lstm_cell.h.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>

#include "../lstm_cell.h"
#include "../lstm_layer.h"

namespace fused_lstm {

// The x86 builds get AVX2 and AVX-512 clones of the hot loops, picked at load time, so one binary is both
// portable and vectorised (the loops below are written so that `omp simd` can vectorise them). The register-
// tiled kernels instead get one build per instruction set from templates (simd.h, run_kernel).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSED_LSTM_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FUSED_LSTM_SIMD_CLONES
#endif
#define FUSED_LSTM_ALWAYS_INLINE inline __attribute__((always_inline))

// Forward of hidden units [j0, j1) of batch row b. Arguments as in StepForwardArgs.
template <typename scalar_t>
FUSED_LSTM_ALWAYS_INLINE void forward_span(const StepForwardArgs& a, int64_t b, int64_t j0, int64_t j1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.hidden, Hout = a.out_hidden;
  scalar_t* g = static_cast<scalar_t*>(a.gates) + b * 4 * H;
  scalar_t* c = static_cast<scalar_t*>(a.c_state) + b * H;
  scalar_t* h_next = static_cast<scalar_t*>(a.h_next) + b * H;
  scalar_t* output = a.output ? static_cast<scalar_t*>(a.output) + b * a.output_stride : nullptr;
  // h is saved before the loop below overwrites it (h_next may be the state itself).
  if (a.h_prev_saved) {
    const scalar_t* h = static_cast<const scalar_t*>(a.h_state) + b * Hout;
    scalar_t* saved = static_cast<scalar_t*>(a.h_prev_saved) + b * Hout;
    std::copy(h + j0, h + std::min(j1, Hout), saved + j0);
  }
  if (a.c_prev_saved) std::copy(c + j0, c + j1, static_cast<scalar_t*>(a.c_prev_saved) + b * H + j0);
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    acc_t c_next, h;
    const Gates<acc_t> gate = cell_forward<acc_t>(g[j], g[H + j], g[2 * H + j], g[3 * H + j], c[j], &c_next, &h);
    g[j] = gate.i;
    g[H + j] = gate.f;
    g[2 * H + j] = gate.g;
    g[3 * H + j] = gate.o;
    c[j] = c_next;
    h_next[j] = h;
  }
  if (output) std::copy(h_next + j0, h_next + j1, output + j0);
}

// Backward of hidden units [j0, j1) of batch row b. Arguments as in StepBackwardArgs.
template <typename scalar_t>
FUSED_LSTM_ALWAYS_INLINE void backward_span(const StepBackwardArgs& a, int64_t b, int64_t j0, int64_t j1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.hidden;
  const scalar_t* g = static_cast<const scalar_t*>(a.gates) + b * 4 * H;
  const scalar_t* c_prev = static_cast<const scalar_t*>(a.c_prev) + b * H;
  const scalar_t* dh = static_cast<const scalar_t*>(a.dh) + b * H;
  const scalar_t* d_output = a.d_output ? static_cast<const scalar_t*>(a.d_output) + b * a.d_output_stride : nullptr;
  scalar_t* dc = static_cast<scalar_t*>(a.dc_state) + b * H;
  scalar_t* dg = static_cast<scalar_t*>(a.d_gates) + b * 4 * H;
  scalar_t* h_next = a.h_next ? static_cast<scalar_t*>(a.h_next) + b * H : nullptr;
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    const Gates<acc_t> gate{g[j], g[H + j], g[2 * H + j], g[3 * H + j]};
    const acc_t dh_j = d_output ? acc_t(dh[j]) + acc_t(d_output[j]) : acc_t(dh[j]);
    acc_t dc_prev, h;
    const GateGrads<acc_t> grad = cell_backward<acc_t>(gate, c_prev[j], dh_j, dc[j], &dc_prev, &h);
    dg[j] = grad.i;
    dg[H + j] = grad.f;
    dg[2 * H + j] = grad.g;
    dg[3 * H + j] = grad.o;
    dc[j] = dc_prev;
    if (h_next) h_next[j] = h;
  }
}

}  // namespace fused_lstm
