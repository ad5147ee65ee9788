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

// The x86 builds get AVX2 and AVX-512 clones of the hot loops, picked at load time, so one binary is both
// portable and vectorised (the loops below are written so that `omp simd` can vectorise them).
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

// One non-template entry per storage type, so that each can carry its ISA clones.
#define FUSED_LSTM_SPAN_ENTRIES(scalar_t, name)                                                           \
  FUSED_LSTM_SIMD_CLONES void forward_span_##name(const StepForwardArgs& a, int64_t b, int64_t j0,        \
                                                  int64_t j1) {                                           \
    forward_span<scalar_t>(a, b, j0, j1);                                                                 \
  }                                                                                                       \
  FUSED_LSTM_SIMD_CLONES void backward_span_##name(const StepBackwardArgs& a, int64_t b, int64_t j0,      \
                                                   int64_t j1) {                                          \
    backward_span<scalar_t>(a, b, j0, j1);                                                                \
  }
FUSED_LSTM_SPAN_ENTRIES(float, float)
FUSED_LSTM_SPAN_ENTRIES(double, double)
FUSED_LSTM_SPAN_ENTRIES(at::Half, half)
FUSED_LSTM_SPAN_ENTRIES(at::BFloat16, bfloat16)
#undef FUSED_LSTM_SPAN_ENTRIES

template <typename Args>
using SpanFn = void (*)(const Args&, int64_t, int64_t, int64_t);

template <typename Args>
void run_spans(const Args& a, SpanFn<Args> float_fn, SpanFn<Args> double_fn, SpanFn<Args> half_fn,
               SpanFn<Args> bfloat16_fn) {
  SpanFn<Args> fn = nullptr;
  switch (a.dtype) {
    case at::kFloat: fn = float_fn; break;
    case at::kDouble: fn = double_fn; break;
    case at::kHalf: fn = half_fn; break;
    case at::kBFloat16: fn = bfloat16_fn; break;
    default: TORCH_CHECK(false, "fused_lstm: unsupported dtype ", a.dtype, " on CPU");
  }
  for_each_row_span(a.rows, a.hidden, [&](int64_t b, int64_t j0, int64_t j1) { fn(a, b, j0, j1); });
}

class CpuBackend final : public LayerBackend {
 public:
  void step_forward(const StepForwardArgs& a) const override {
    run_spans(a, forward_span_float, forward_span_double, forward_span_half, forward_span_bfloat16);
  }
  void step_backward(const StepBackwardArgs& a) const override {
    run_spans(a, backward_span_float, backward_span_double, backward_span_half, backward_span_bfloat16);
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
