// The fused pointwise passes of one LSTM time step on CUDA: one thread per (row, hidden unit) element,
// the cell math itself from ../lstm_cell.h (cell_forward / cell_backward), so this file only decides
// which element a thread owns and where that element lives in memory. Semantics are those of the CPU
// loops in ../cpu/step_spans.h, element for element.
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

// Forward of one step for `elements` = rows x H (row, unit) pairs; the operands as StepForwardArgs says
// (lstm_layer.h), each with its own row stride. Without a projection h_next IS h_state (Hout == H): thread
// (b, j) then reads h_state[b, j] before it writes h_next[b, j], the same element, and no other thread
// touches it, so the in-place update is race-free (and neither pointer may be __restrict__: restrict on
// aliasing pointers would let the compiler move the store above the load). Only units j < Hout of h_state
// and h_prev_saved exist. The checks for absent operands depend only on kernel arguments, so they are uniform
// across the grid: a predicated branch, not divergence. Lifting them to template flags would quadruple the
// instantiations (and the build time) for no measurable gain in a latency-bound kernel.
template <typename scalar_t>
__global__ void __launch_bounds__(kPointwiseThreads)
    step_forward_kernel(const StepForwardArgs a, uint32_t elements, HiddenDivider hidden_div) {
  using acc_t = at::opmath_type<scalar_t>;
  const uint32_t idx = blockIdx.x * kPointwiseThreads + threadIdx.x;
  if (idx >= elements) return;
  const auto row_unit = hidden_div.divmod(idx);
  const int64_t b = row_unit.div, j = row_unit.mod, H = hidden_div.divisor;

  scalar_t* g = a.gates.row<scalar_t>(b) + j;
  scalar_t* c_state = a.c_state.row<scalar_t>(b) + j;
  // Save h before h_next (possibly the same element) is written below.
  if (a.h_prev_saved && j < a.out_hidden) a.h_prev_saved.row<scalar_t>(b)[j] = a.h_state.row<const scalar_t>(b)[j];
  const scalar_t c = *c_state;
  if (a.c_prev_saved) a.c_prev_saved.row<scalar_t>(b)[j] = c;

  acc_t c_next, h;
  const Gates<acc_t> gate = cell_forward<acc_t>(static_cast<acc_t>(g[0]), static_cast<acc_t>(g[H]),
                                                static_cast<acc_t>(g[2 * H]), static_cast<acc_t>(g[3 * H]),
                                                static_cast<acc_t>(c), &c_next, &h);
  g[0] = static_cast<scalar_t>(gate.i);
  g[H] = static_cast<scalar_t>(gate.f);
  g[2 * H] = static_cast<scalar_t>(gate.g);
  g[3 * H] = static_cast<scalar_t>(gate.o);
  *c_state = static_cast<scalar_t>(c_next);
  a.h_next.row<scalar_t>(b)[j] = static_cast<scalar_t>(h);
  if (a.output) a.output.row<scalar_t>(b)[j] = static_cast<scalar_t>(h);
}

// Backward of one step for `elements` = rows x H (row, unit) pairs; the operands as StepBackwardArgs says.
// No two operands alias (the driver passes distinct buffers); dc_state is read and written through one
// pointer, element (b, j) only by thread (b, j).
template <typename scalar_t>
__global__ void __launch_bounds__(kPointwiseThreads)
    step_backward_kernel(const StepBackwardArgs a, uint32_t elements, HiddenDivider hidden_div) {
  using acc_t = at::opmath_type<scalar_t>;
  const uint32_t idx = blockIdx.x * kPointwiseThreads + threadIdx.x;
  if (idx >= elements) return;
  const auto row_unit = hidden_div.divmod(idx);
  const int64_t b = row_unit.div, j = row_unit.mod, H = hidden_div.divisor;

  const scalar_t* __restrict__ g = a.gates.row<const scalar_t>(b) + j;
  scalar_t* __restrict__ dc_state = a.dc_state.row<scalar_t>(b) + j;
  const Gates<acc_t> gate{static_cast<acc_t>(g[0]), static_cast<acc_t>(g[H]), static_cast<acc_t>(g[2 * H]),
                          static_cast<acc_t>(g[3 * H])};
  acc_t dh_j = static_cast<acc_t>(a.dh.row<const scalar_t>(b)[j]);
  if (a.d_output) dh_j += static_cast<acc_t>(a.d_output.row<const scalar_t>(b)[j]);
  acc_t dc_prev, h;
  const GateGrads<acc_t> grad = cell_backward<acc_t>(gate, static_cast<acc_t>(a.c_prev.row<const scalar_t>(b)[j]),
                                                     dh_j, static_cast<acc_t>(*dc_state), &dc_prev, &h);
  scalar_t* __restrict__ dg = a.d_gates.row<scalar_t>(b) + j;
  dg[0] = static_cast<scalar_t>(grad.i);
  dg[H] = static_cast<scalar_t>(grad.f);
  dg[2 * H] = static_cast<scalar_t>(grad.g);
  dg[3 * H] = static_cast<scalar_t>(grad.o);
  *dc_state = static_cast<scalar_t>(dc_prev);
  if (a.h_next) a.h_next.row<scalar_t>(b)[j] = static_cast<scalar_t>(h);
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
  TORCH_CHECK(a.h_next.data != a.h_state.data || a.out_hidden == a.hidden,
              "fused_lstm: h_next may alias h_state only without a projection");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fused_lstm_step_forward_cuda", [&] {
    gpu::launch("step_forward_kernel", &step_forward_kernel<scalar_t>, kPointwiseBounds, pointwise_shape(elements),
                a, elements, HiddenDivider(static_cast<uint32_t>(a.hidden)));
  });
}

// Enqueues the backward step on the current stream. Allocates nothing and never synchronises.
inline void launch_step_backward(const StepBackwardArgs& a) {
  const uint32_t elements = check_elements(a.rows, a.hidden);
  if (elements == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fused_lstm_step_backward_cuda", [&] {
    gpu::launch("step_backward_kernel", &step_backward_kernel<scalar_t>, kPointwiseBounds,
                pointwise_shape(elements), a, elements, HiddenDivider(static_cast<uint32_t>(a.hidden)));
  });
}

}  // namespace cuda
}  // namespace fused_lstm
