// CPU backend of the LSTM layer and its op registration. On AVX2 and AVX-512 CPUs float32 products go
// through the packed register-tiled kernel (packed_gemm.h) and whole recurrences through the fused
// thread-per-slice loops (recurrence_cpu.h); other dtypes, and float32 on other CPUs (cpu_features.h), use
// ATen's GEMMs and the per-step pointwise spans (step_spans.h), split across threads with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <deque>
#include <type_traits>
#include <utility>
#include <vector>

#include "../cell_step.h"
#include "../lstm_layer.h"
#include "bf16_dot_gemm.h"
#include "bf16_recurrence.h"
#include "cpu_features.h"
#include "cpu_limits.h"
#include "cpu_plan.h"
#include "dot_gemm.h"
#include "packed_gemm.h"
#include "recycled_gradients.h"
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

// The pointwise step of one storage type over a span of units of one row, as a kernel (simd.h): float32 math
// (16-bit types on float32 copies) in the explicit vectors its instruction set runs best (kPointwiseLanes),
// float64 in the scalar loop that `omp simd` vectorises for that set.
template <typename scalar_t>
constexpr int span_lanes(int isa_lanes) {
  return std::is_same_v<scalar_t, double> ? 0 : isa_lanes;
}
template <typename scalar_t>
struct ForwardSpan {
  template <typename Isa>
  FUSED_LSTM_ALWAYS_INLINE static void run(const StepForwardArgs& a, int64_t b, int64_t j0, int64_t j1) {
    forward_span<scalar_t, span_lanes<scalar_t>(Isa::kPointwiseLanes)>(a, b, j0, j1);
  }
};
template <typename scalar_t>
struct BackwardSpan {
  template <typename Isa>
  FUSED_LSTM_ALWAYS_INLINE static void run(const StepBackwardArgs& a, int64_t b, int64_t j0, int64_t j1) {
    backward_span<scalar_t, span_lanes<scalar_t>(Isa::kPointwiseLanes)>(a, b, j0, j1);
  }
};

// Runs the step's spans in parallel, each through Span<scalar_t> for the step's dtype.
template <template <typename> class Span, typename Args>
void run_spans(const Args& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fused_lstm_step_cpu", [&] {
    for_each_row_span(a.rows, a.hidden, [&](int64_t b, int64_t j0, int64_t j1) {
      run_kernel_or_baseline<Span<scalar_t>>(a, b, j0, j1);
    });
  });
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
    shape.bf16_dot_kernels = out.scalar_type() == at::kBFloat16 && a.scalar_type() == at::kBFloat16 &&
                             out.stride(1) == 1 && cpu_bf16_kernels() != CpuBf16Kernels::aten;
    shape.bf16_amx = shape.bf16_dot_kernels && cpu_bf16_kernels() == CpuBf16Kernels::amx;
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
      case cpu_plan::ProductKernel::bf16_amx: bf16_amx_matmul(out, a, b.t(), accumulate, bias); return;
      case cpu_plan::ProductKernel::bf16_amx_rowmajor: bf16_amx_rowmajor_matmul(out, a, b, accumulate, bias); return;
      case cpu_plan::ProductKernel::bf16_dot: bf16_dot_matmul(out, a, b.t(), accumulate, bias); return;
      case cpu_plan::ProductKernel::bf16_rowmajor: bf16_rowmajor_matmul(out, a, b, accumulate, bias); return;
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
  Tensor empty_weight_gradient(const Tensor& w) const override { return empty_recycled_gradient(w); }
  void step_forward(const StepForwardArgs& a) const override { run_spans<ForwardSpan>(a); }
  void step_backward(const StepBackwardArgs& a) const override { run_spans<BackwardSpan>(a); }
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
    // The fused backward recurrences have no projection: with one the driver's per-step loop runs.
    if (a.w_hr.defined()) return false;
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
