// CPU backend of the LSTM layer and its op registration. On AVX2 and AVX-512 CPUs float32 products go
// through the packed register-tiled kernel (packed_gemm.h) and whole recurrences through the fused
// thread-per-slice loops (recurrence_cpu.h); other dtypes, and float32 on other CPUs (cpu_features.h), use
// ATen's GEMMs and the per-step pointwise spans (step_spans.h), split across threads with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <deque>
#include <utility>
#include <vector>

#include "../cell_step.h"
#include "../lstm_layer.h"
#include "bf16_recurrence.h"
#include "cpu_features.h"
#include "cpu_limits.h"
#include "cpu_plan.h"
#include "dot_gemm.h"
#include "packed_gemm.h"
#include "recurrence_cpu.h"
#include "step_spans.h"

namespace fused_lstm {
namespace {

// Calls fn(row, first_unit, end_unit) over the rows x hidden grid, in parallel chunks of at least
// kPointwiseGrain elements (cpu_limits.h).
template <typename Fn>
void for_each_row_span(int64_t rows, int64_t hidden, const Fn& fn) {
  at::parallel_for(0, rows * hidden, cpu_limits::kPointwiseGrain, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end;) {
      const int64_t row = idx / hidden, j0 = idx % hidden;
      const int64_t j1 = std::min(hidden, j0 + (end - idx));
      fn(row, j0, j1);
      idx += j1 - j0;
    }
  });
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

// float32 with the kernels built per instruction set (cpu_features.h): the pointwise form that set runs best
// (simd.h, kPointwiseLanes).
struct ForwardSpanVectors {
  template <typename Isa>
  FUSED_LSTM_ALWAYS_INLINE static void run(const StepForwardArgs& a, int64_t b, int64_t j0, int64_t j1) {
    forward_span<float, Isa::kPointwiseLanes>(a, b, j0, j1);
  }
};
struct BackwardSpanVectors {
  template <typename Isa>
  FUSED_LSTM_ALWAYS_INLINE static void run(const StepBackwardArgs& a, int64_t b, int64_t j0, int64_t j1) {
    backward_span<float, Isa::kPointwiseLanes>(a, b, j0, j1);
  }
};
void forward_span_float_vectors(const StepForwardArgs& a, int64_t b, int64_t j0, int64_t j1) {
  run_kernel<ForwardSpanVectors>(a, b, j0, j1);
}
void backward_span_float_vectors(const StepBackwardArgs& a, int64_t b, int64_t j0, int64_t j1) {
  run_kernel<BackwardSpanVectors>(a, b, j0, j1);
}

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

// Identifies a right-hand matrix operand within one op call (weights and saved tensors do not change
// during a call, so their packed panels can be reused by every step).
struct OperandKey {
  const void* data;
  int64_t rows, cols, row_stride, col_stride;
  bool operator==(const OperandKey& o) const {
    return data == o.data && rows == o.rows && cols == o.cols && row_stride == o.row_stride &&
           col_stride == o.col_stride;
  }
};

// One instance per op call.
class CpuBackend final : public LayerBackend {
 public:
  using LayerBackend::LayerBackend;

  // The kernel the planner picks (cpu_plan.h, plan_product) from the shape and what this call did with b
  // before: W read in place (dot_gemm.h), b's rows read in place or b packed (packed_gemm.h), or ATen.
  void matmul(const Tensor& out, const Tensor& a, const Tensor& b, bool accumulate,
              const Tensor& bias) const override {
    const OperandKey key{b.data_ptr(), b.size(0), b.size(1), b.stride(0), b.stride(1)};
    cpu_plan::ProductShape shape;
    shape.rows = a.size(0);
    shape.depth = a.size(1);
    shape.cols = b.size(1);
    shape.vector_kernels = out.scalar_type() == at::kFloat && out.stride(1) == 1 && cpu_vector_kernels();
    shape.a_rows_contiguous = a.stride(1) == 1;
    shape.a_transposed = a.stride(0) == 1;
    shape.b_is_w_transposed = b.stride(0) == 1;
    shape.b_rows_contiguous = b.stride(1) == 1;
    const PackedMatrix* cached = shape.vector_kernels ? find(key) : nullptr;
    shape.b_packed_before = cached != nullptr;
    shape.b_in_place_before = shape.vector_kernels && used_in_place(key);
    const cpu_plan::ProductPlan plan = cpu_plan::plan_product(shape);
    if (plan.first_in_place_use) in_place_.push_back(key);
    switch (plan.kernel) {
      case cpu_plan::ProductKernel::dot: dot_matmul(out, a, b.t(), accumulate, bias); return;
      case cpu_plan::ProductKernel::rowmajor: rowmajor_matmul(out, a, b, accumulate, bias); return;
      case cpu_plan::ProductKernel::packed: packed_matmul(out, a, cached ? *cached : pack(key, b), accumulate, bias); return;
      case cpu_plan::ProductKernel::aten: LayerBackend::matmul(out, a, b, accumulate, bias); return;
    }
  }
  // float32 with enough rows: one pass of packed products that gathers each block of d_gates^T once for both
  // weight gradients and sums it for the bias gradient on the way (packed_gemm.h, transposed_matmuls).
  void weight_gradients(const Tensor& grad_w_ih, const Tensor& grad_w_hh, const Tensor& grad_bias,
                        const Tensor& d_gates, const Tensor& input, const Tensor& h_prev) const override {
    const Tensor a = d_gates.t();
    const bool vector_kernels = d_gates.scalar_type() == at::kFloat && a.stride(1) != 1 && cpu_vector_kernels();
    if (!cpu_plan::plan_weight_gradients(a.size(0), a.size(1), input.size(1), h_prev.size(1), vector_kernels,
                                         cpu_plan::this_machine()).packed) {
      LayerBackend::weight_gradients(grad_w_ih, grad_w_hh, grad_bias, d_gates, input, h_prev);
      return;
    }
    const PackedMatrix& packed_input = packed(input);
    const PackedMatrix& packed_h_prev = packed(h_prev);
    transposed_matmuls({grad_w_ih, grad_w_hh}, a, {&packed_input, &packed_h_prev}, grad_bias);
  }
  void step_forward(const StepForwardArgs& a) const override {
    run_spans(a, cpu_vector_kernels() ? forward_span_float_vectors : forward_span_float, forward_span_double,
              forward_span_half, forward_span_bfloat16);
  }
  void step_backward(const StepBackwardArgs& a) const override {
    run_spans(a, cpu_vector_kernels() ? backward_span_float_vectors : backward_span_float, backward_span_double,
              backward_span_half, backward_span_bfloat16);
  }
  // The fused recurrences need the vector kernels (cpu_features.h); without them the driver's per-step loop
  // runs.
  bool recurrence_forward(const RecurrenceForwardArgs& a) const override {
    if (a.h_state.scalar_type() == at::kBFloat16) {  // its own kernels (bf16_recurrence.h)
      const char* kernel = cpu_bf16_recurrence_forward(a);
      if (kernel) bf16_kernel_ = kernel;
      return kernel != nullptr;
    }
    TORCH_CHECK(cpu_vector_kernels() || !a.required, "fused_lstm: recurrence='persistent' on the CPU needs a CPU "
                "with AVX2 and FMA (x86-64-v3) or AVX-512; use recurrence='auto' or 'standard' on this one");
    return cpu_vector_kernels() && cpu_recurrence_forward(a);
  }
  bool recurrence_backward(const RecurrenceBackwardArgs& a) const override {
    if (a.gates.scalar_type() == at::kBFloat16) return cpu_bf16_recurrence_backward(a) != nullptr;
    return cpu_vector_kernels() && cpu_recurrence_backward(a);
  }
  std::string path_name(bool whole_recurrence) const override {
    if (!whole_recurrence) return "cpu:per-step";
    return bf16_kernel_ ? std::string("cpu:fused-recurrence:") + bf16_kernel_ : "cpu:fused-recurrence";
  }

 private:
  // b packed, from this call's cache or packed now.
  const PackedMatrix& packed(const Tensor& b) const {
    const OperandKey key{b.data_ptr(), b.size(0), b.size(1), b.stride(0), b.stride(1)};
    const PackedMatrix* cached = find(key);
    return cached ? *cached : pack(key, b);
  }
  bool used_in_place(const OperandKey& key) const {
    return std::find(in_place_.begin(), in_place_.end(), key) != in_place_.end();
  }
  const PackedMatrix* find(const OperandKey& key) const {
    for (const auto& [k, matrix] : packed_) {
      if (k == key) return &matrix;
    }
    return nullptr;
  }
  const PackedMatrix& pack(const OperandKey& key, const Tensor& b) const {
    packed_.emplace_back(key, pack_matrix(b));
    return packed_.back().second;
  }
  // Operands do not change during a call (weights, the input, saved workspaces), so a packed copy is
  // valid until the backend, which lives for one op call, goes away.
  mutable std::deque<std::pair<OperandKey, PackedMatrix>> packed_;
  // The distinct operands this call has read in place so far.
  mutable std::vector<OperandKey> in_place_;
  // The product kernel of the bfloat16 recurrence, if one ran in this call (for path_name).
  mutable const char* bf16_kernel_ = nullptr;
};

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CPU, m) {
  m.impl("lstm_layer", &LayerOps<CpuBackend>::forward);
  m.impl("lstm_layer_backward", &LayerOps<CpuBackend>::backward);
  m.impl("lstm_cell", &CellOps<CpuBackend>::forward);
  m.impl("lstm_cell_backward", &CellOps<CpuBackend>::backward);
}

}  // namespace fused_lstm
