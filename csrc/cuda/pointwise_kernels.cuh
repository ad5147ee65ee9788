// The fused pointwise passes of one LSTM time step on CUDA: one thread per (row, hidden unit) element,
// the cell math itself from ../lstm_cell.h (cell_forward / cell_backward), so this file only decides
// which element a thread owns and where that element lives in memory. Semantics are those of the CPU
// loops in ../cpu/lstm_cpu.cpp, element for element.
//
// Included by lstm_cuda.cu only (one translation unit keeps the nvcc build short).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>  // before IntegerDivider.cuh, which uses C10_HOST_DEVICE without including it
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

#include "../lstm_cell.h"
#include "../lstm_layer.h"
#include "gpu_runtime.h"

namespace fused_lstm {
namespace cuda {

// Threads per block of both pointwise kernels. A step touches rows x H elements with no reuse, so the
// kernels are bound by memory latency; 256 threads give the scheduler 8 warps per block to hide it and
// keep small steps (one batch row, a few hundred units) in one or two blocks. __launch_bounds__ uses
// the same constant so the register allocator targets exactly this block size.
constexpr int kPointwiseThreads = 256;
constexpr gpu::LaunchBounds kPointwiseBounds{kPointwiseThreads};

// Element index -> (row, hidden unit) without a 64-bit division: the magic-number 32-bit divider that
// ATen's TensorIterator uses. Callers check rows * H fits in int32 (see check_elements).
using HiddenDivider = at::cuda::detail::IntDivider<uint32_t>;

// Forward of one step for `elements` = rows x H (row, unit) pairs.
//   gates:        [rows, 4H], row stride 4H, order i, f, g, o: pre-activations in, post-activations out
//   c_state:      [rows, H], row stride H: c in, c' out
//   h_state:      [rows, Hout], row stride Hout: h, read only to save it into h_prev_saved
//   h_next:       [rows, H], row stride H: receives h'. Without a projection this IS h_state (Hout == H):
//                 thread (b, j) then reads h_state[b, j] before it writes h_next[b, j], the same element,
//                 and no other thread touches it, so the in-place update is race-free. Neither pointer
//                 is __restrict__ for that reason (restrict on aliasing pointers would let the compiler
//                 move the store above the load).
//   output:       [rows, H], row stride output_stride, or null (when projecting): also receives h'
//   c_prev_saved: [rows, H], row stride H, or null: receives c
//   h_prev_saved: [rows, Hout], row stride Hout, or null: receives h (only units j < Hout exist)
// The null checks depend only on kernel arguments, so they are uniform across the grid: a predicated
// branch, not divergence. Lifting them to template flags would quadruple the instantiations (and the
// build time) for no measurable gain in a latency-bound kernel.
template <typename scalar_t>
__global__ void __launch_bounds__(kPointwiseThreads)
    step_forward_kernel(scalar_t* __restrict__ gates, scalar_t* __restrict__ c_state, const scalar_t* h_state,
                        scalar_t* h_next, scalar_t* __restrict__ output, int64_t output_stride,
                        scalar_t* __restrict__ c_prev_saved, scalar_t* __restrict__ h_prev_saved,
                        uint32_t elements, HiddenDivider hidden_div, int64_t out_hidden) {
  using acc_t = at::opmath_type<scalar_t>;
  const uint32_t idx = blockIdx.x * kPointwiseThreads + threadIdx.x;
  if (idx >= elements) return;
  const auto row_unit = hidden_div.divmod(idx);
  const int64_t b = row_unit.div, j = row_unit.mod, H = hidden_div.divisor;

  scalar_t* g = gates + b * 4 * H + j;
  const int64_t state = b * H + j;
  // Save h before h_next (possibly the same element) is written below.
  if (h_prev_saved != nullptr && j < out_hidden) h_prev_saved[b * out_hidden + j] = h_state[b * out_hidden + j];
  const scalar_t c = c_state[state];
  if (c_prev_saved != nullptr) c_prev_saved[state] = c;

  acc_t c_next, h;
  const Gates<acc_t> gate = cell_forward<acc_t>(static_cast<acc_t>(g[0]), static_cast<acc_t>(g[H]),
                                                static_cast<acc_t>(g[2 * H]), static_cast<acc_t>(g[3 * H]),
                                                static_cast<acc_t>(c), &c_next, &h);
  g[0] = static_cast<scalar_t>(gate.i);
  g[H] = static_cast<scalar_t>(gate.f);
  g[2 * H] = static_cast<scalar_t>(gate.g);
  g[3 * H] = static_cast<scalar_t>(gate.o);
  c_state[state] = static_cast<scalar_t>(c_next);
  h_next[state] = static_cast<scalar_t>(h);
  if (output != nullptr) output[b * output_stride + j] = static_cast<scalar_t>(h);
}

// Backward of one step for `elements` = rows x H (row, unit) pairs. No two arguments alias (the driver
// passes distinct buffers), hence __restrict__ throughout; dc_state is read and written through one
// pointer, element (b, j) only by thread (b, j).
//   gates:           [rows, 4H], row stride 4H: saved post-activation gates, order i, f, g, o
//   c_prev:          [rows, H], row stride H: saved cell state the step started from
//   dh:              [rows, H], row stride H: gradient reaching h' from later steps / the projection
//   d_output:        [rows, H], row stride d_output_stride, or null: added to dh
//   dc_state:        [rows, H], row stride H: gradient of c' in, gradient of c out
//   d_gates:         [rows, 4H], row stride 4H: gradient of the pre-activations
//   h_next:          [rows, H], row stride H, or null: receives the recomputed h'
template <typename scalar_t>
__global__ void __launch_bounds__(kPointwiseThreads)
    step_backward_kernel(const scalar_t* __restrict__ gates, const scalar_t* __restrict__ c_prev,
                         const scalar_t* __restrict__ dh, const scalar_t* __restrict__ d_output,
                         int64_t d_output_stride, scalar_t* __restrict__ dc_state, scalar_t* __restrict__ d_gates,
                         scalar_t* __restrict__ h_next, uint32_t elements, HiddenDivider hidden_div) {
  using acc_t = at::opmath_type<scalar_t>;
  const uint32_t idx = blockIdx.x * kPointwiseThreads + threadIdx.x;
  if (idx >= elements) return;
  const auto row_unit = hidden_div.divmod(idx);
  const int64_t b = row_unit.div, j = row_unit.mod, H = hidden_div.divisor;

  const scalar_t* g = gates + b * 4 * H + j;
  const int64_t state = b * H + j;
  const Gates<acc_t> gate{static_cast<acc_t>(g[0]), static_cast<acc_t>(g[H]), static_cast<acc_t>(g[2 * H]),
                          static_cast<acc_t>(g[3 * H])};
  acc_t dh_j = static_cast<acc_t>(dh[state]);
  if (d_output != nullptr) dh_j += static_cast<acc_t>(d_output[b * d_output_stride + j]);
  acc_t dc_prev, h;
  const GateGrads<acc_t> grad = cell_backward<acc_t>(gate, static_cast<acc_t>(c_prev[state]), dh_j,
                                                     static_cast<acc_t>(dc_state[state]), &dc_prev, &h);
  scalar_t* dg = d_gates + b * 4 * H + j;
  dg[0] = static_cast<scalar_t>(grad.i);
  dg[H] = static_cast<scalar_t>(grad.f);
  dg[2 * H] = static_cast<scalar_t>(grad.g);
  dg[3 * H] = static_cast<scalar_t>(grad.o);
  dc_state[state] = static_cast<scalar_t>(dc_prev);
  if (h_next != nullptr) h_next[state] = static_cast<scalar_t>(h);
}

// rows x H as the kernels' 32-bit element count (one step of one direction: 2^31 elements would be
// 8 GiB of fp32 cell state alone, far beyond any real batch).
inline uint32_t check_elements(int64_t rows, int64_t hidden) {
  TORCH_CHECK(rows >= 0 && hidden > 0, "fused_lstm: bad step shape rows=", rows, " hidden=", hidden);
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max() / hidden, "fused_lstm: a time step of ", rows,
              " rows x ", hidden, " hidden units exceeds the CUDA kernels' 32-bit element index");
  return static_cast<uint32_t>(rows * hidden);
}

inline gpu::LaunchShape pointwise_shape(uint32_t elements) {
  gpu::LaunchShape shape;
  shape.grid = dim3((elements + kPointwiseThreads - 1) / kPointwiseThreads);
  shape.block = dim3(kPointwiseThreads);
  return shape;
}

// Enqueues the forward step on the current stream. Allocates nothing and never synchronises.
inline void launch_step_forward(const StepForwardArgs& a) {
  const uint32_t elements = check_elements(a.rows, a.hidden);
  if (elements == 0) return;
  TORCH_CHECK(a.out_hidden > 0 && a.out_hidden <= a.hidden, "fused_lstm: out_hidden (", a.out_hidden,
              ") must be in [1, hidden (", a.hidden, ")]");
  TORCH_CHECK(a.h_next != a.h_state || a.out_hidden == a.hidden,
              "fused_lstm: h_next may alias h_state only without a projection");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fused_lstm_step_forward_cuda", [&] {
    gpu::launch("step_forward_kernel", &step_forward_kernel<scalar_t>, kPointwiseBounds, pointwise_shape(elements),
        static_cast<scalar_t*>(a.gates), static_cast<scalar_t*>(a.c_state),
        static_cast<const scalar_t*>(a.h_state), static_cast<scalar_t*>(a.h_next),
        static_cast<scalar_t*>(a.output), a.output_stride, static_cast<scalar_t*>(a.c_prev_saved),
        static_cast<scalar_t*>(a.h_prev_saved), elements, HiddenDivider(static_cast<uint32_t>(a.hidden)),
        a.out_hidden);
  });
}

// Enqueues the backward step on the current stream. Allocates nothing and never synchronises.
inline void launch_step_backward(const StepBackwardArgs& a) {
  const uint32_t elements = check_elements(a.rows, a.hidden);
  if (elements == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fused_lstm_step_backward_cuda", [&] {
    gpu::launch("step_backward_kernel", &step_backward_kernel<scalar_t>, kPointwiseBounds, pointwise_shape(elements),
        static_cast<const scalar_t*>(a.gates), static_cast<const scalar_t*>(a.c_prev),
        static_cast<const scalar_t*>(a.dh), static_cast<const scalar_t*>(a.d_output), a.d_output_stride,
        static_cast<scalar_t*>(a.dc_state), static_cast<scalar_t*>(a.d_gates), static_cast<scalar_t*>(a.h_next),
        elements, HiddenDivider(static_cast<uint32_t>(a.hidden)));
  });
}

}  // namespace cuda
}  // namespace fused_lstm
