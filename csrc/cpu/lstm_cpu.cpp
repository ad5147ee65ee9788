// CPU backend of the LSTM layer: the fused pointwise steps as loops over (row, hidden unit), split
// across threads with at::parallel_for; matrix products go through ATen (MKL / oneDNN / OpenBLAS).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../lstm_cell.h"
#include "../lstm_layer.h"

namespace fused_lstm {
namespace {

// Elements (row x hidden unit) per task: below this a step runs on one thread, since waking the
// pool costs more than the work.
constexpr int64_t kGrain = 4096;

// Calls fn(row, first_unit, end_unit) over the rows x hidden grid, in parallel chunks.
template <typename Fn>
void for_each_row_span(int64_t rows, int64_t hidden, const Fn& fn) {
  at::parallel_for(0, rows * hidden, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end;) {
      const int64_t row = idx / hidden, j0 = idx % hidden;
      const int64_t j1 = std::min(hidden, j0 + (end - idx));
      fn(row, j0, j1);
      idx += j1 - j0;
    }
  });
}

template <typename scalar_t>
void step_forward_cpu(const StepForwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.hidden, Hout = a.out_hidden;
  auto* gates = static_cast<scalar_t*>(a.gates);
  auto* c_state = static_cast<scalar_t*>(a.c_state);
  const auto* h_state = static_cast<const scalar_t*>(a.h_state);
  auto* h_next = static_cast<scalar_t*>(a.h_next);
  auto* output = static_cast<scalar_t*>(a.output);
  auto* c_prev_saved = static_cast<scalar_t*>(a.c_prev_saved);
  auto* h_prev_saved = static_cast<scalar_t*>(a.h_prev_saved);
  for_each_row_span(a.rows, H, [&](int64_t b, int64_t j0, int64_t j1) {
    scalar_t* g = gates + b * 4 * H;
    scalar_t* c = c_state + b * H;
    // h is saved before the loop below overwrites it (h_next may be the state itself).
    if (h_prev_saved) {
      const int64_t k1 = std::min(j1, Hout);
      for (int64_t j = j0; j < k1; ++j) h_prev_saved[b * Hout + j] = h_state[b * Hout + j];
    }
    if (c_prev_saved) std::copy(c + j0, c + j1, c_prev_saved + b * H + j0);
    for (int64_t j = j0; j < j1; ++j) {
      acc_t c_next, h;
      const Gates<acc_t> gate = cell_forward<acc_t>(g[j], g[H + j], g[2 * H + j], g[3 * H + j], c[j], &c_next, &h);
      g[j] = gate.i;
      g[H + j] = gate.f;
      g[2 * H + j] = gate.g;
      g[3 * H + j] = gate.o;
      c[j] = c_next;
      h_next[b * H + j] = h;
      if (output) output[b * a.output_stride + j] = h;
    }
  });
}

template <typename scalar_t>
void step_backward_cpu(const StepBackwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.hidden;
  const auto* gates = static_cast<const scalar_t*>(a.gates);
  const auto* c_prev = static_cast<const scalar_t*>(a.c_prev);
  const auto* dh = static_cast<const scalar_t*>(a.dh);
  const auto* d_output = static_cast<const scalar_t*>(a.d_output);
  auto* dc_state = static_cast<scalar_t*>(a.dc_state);
  auto* d_gates = static_cast<scalar_t*>(a.d_gates);
  auto* h_next = static_cast<scalar_t*>(a.h_next);
  for_each_row_span(a.rows, H, [&](int64_t b, int64_t j0, int64_t j1) {
    const scalar_t* g = gates + b * 4 * H;
    scalar_t* dg = d_gates + b * 4 * H;
    for (int64_t j = j0; j < j1; ++j) {
      const Gates<acc_t> gate{g[j], g[H + j], g[2 * H + j], g[3 * H + j]};
      acc_t dh_j = dh[b * H + j];
      if (d_output) dh_j += acc_t(d_output[b * a.d_output_stride + j]);
      acc_t dc_prev, h;
      const GateGrads<acc_t> grad = cell_backward<acc_t>(gate, c_prev[b * H + j], dh_j, dc_state[b * H + j], &dc_prev, &h);
      dg[j] = grad.i;
      dg[H + j] = grad.f;
      dg[2 * H + j] = grad.g;
      dg[3 * H + j] = grad.o;
      dc_state[b * H + j] = dc_prev;
      if (h_next) h_next[b * H + j] = h;
    }
  });
}

class CpuBackend final : public LayerBackend {
 public:
  void step_forward(const StepForwardArgs& a) const override {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fused_lstm_step_forward_cpu",
                                    [&] { step_forward_cpu<scalar_t>(a); });
  }
  void step_backward(const StepBackwardArgs& a) const override {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fused_lstm_step_backward_cpu",
                                    [&] { step_backward_cpu<scalar_t>(a); });
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_cpu(
    const Tensor& input, const c10::optional<Tensor>& batch_sizes, const Tensor& h0, const Tensor& c0,
    at::TensorList weights, bool has_biases, bool has_projections, bool bidirectional, bool need_workspace) {
  return lstm_layer_forward(input, batch_sizes, h0, c0, weights, has_biases, has_projections, bidirectional,
                            need_workspace, CpuBackend());
}

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> lstm_layer_backward_cpu(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& input,
    const c10::optional<Tensor>& batch_sizes, const Tensor& h0, const Tensor& c0, at::TensorList weights,
    bool has_biases, bool has_projections, bool bidirectional, const Tensor& gates, const Tensor& c_prev,
    const Tensor& h_prev) {
  return lstm_layer_backward(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, weights, has_biases,
                             has_projections, bidirectional, gates, c_prev, h_prev, CpuBackend());
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CPU, m) {
  m.impl("lstm_layer", &lstm_layer_cpu);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cpu);
}

}  // namespace fused_lstm
