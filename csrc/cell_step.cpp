// The device-agnostic LSTMCell step. See cell_step.h for shapes.
#include "cell_step.h"

#include <ATen/ATen.h>

#include <vector>

#include "arg_checks.h"

namespace fused_lstm {
namespace {

// t is a [rows, cols] matrix on input's device with its dtype.
void check_matrix(const Tensor& t, const Tensor& input, int64_t rows, int64_t cols, const char* name) {
  check_same(t, input, name);
  check_shape(t, {rows, cols}, name);
}

// Checks every argument against input [N, I] and w_ih [4H, I]; returns H.
int64_t check_cell(const Tensor& input, const Tensor& hx, const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh) {
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "fused_lstm: input must be a floating point tensor, got ",
              input.scalar_type());
  TORCH_CHECK(input.dim() == 2, "fused_lstm: expected cell input [N, I], got a ", input.dim(), "-D tensor");
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % 4 == 0, "fused_lstm: w_ih must be [4H, I], got ", w_ih.sizes());
  const int64_t N = input.size(0), I = input.size(1), H = w_ih.size(0) / 4;
  check_matrix(w_ih, input, 4 * H, I, "w_ih");
  check_matrix(w_hh, input, 4 * H, H, "w_hh");
  check_matrix(hx, input, N, H, "hx");
  check_matrix(cx, input, N, H, "cx");
  return H;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> lstm_cell_forward(const Tensor& input_arg, const Tensor& hx_arg,
                                                     const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh,
                                                     const c10::optional<Tensor>& b_ih,
                                                     const c10::optional<Tensor>& b_hh, const LayerBackend& backend) {
  const int64_t H = check_cell(input_arg, hx_arg, cx, w_ih, w_hh);
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "fused_lstm: b_ih and b_hh must be given together");
  Tensor bias;
  if (b_ih.has_value()) {
    check_same(*b_ih, input_arg, "b_ih");
    check_shape(*b_ih, {4 * H}, "b_ih");
    check_same(*b_hh, input_arg, "b_hh");
    check_shape(*b_hh, {4 * H}, "b_hh");
    bias = *b_ih + *b_hh;
  }
  const Tensor input = input_arg.contiguous(), hx = hx_arg.contiguous();
  const int64_t N = input.size(0);
  const auto opts = input.options();
  Tensor gates = at::empty({N, 4 * H}, opts);  // pre-activations, then post-activation gates in place
  Tensor h_next = at::empty({N, H}, opts);
  Tensor c_next = cx.clone(at::MemoryFormat::Contiguous);  // the pointwise step advances c in place
  if (N > 0) {
    backend.matmul(gates, input, w_ih.t(), /*accumulate=*/false, bias);
    backend.matmul(gates, hx, w_hh.t(), /*accumulate=*/true);
    // One step of N rows: every operand from its row 0.
    const StepForwardArgs a{
        .dtype = input.scalar_type(), .rows = N, .hidden = H, .out_hidden = H,
        .gates = rows_at(gates, 0),
        .c_state = rows_at(c_next, 0),
        .h_state = rows_at(hx, 0),
        .h_next = rows_at(h_next, 0),
    };
    backend.step_forward(a);
  }
  record_forward_path(backend.path_name(/*whole_recurrence=*/false));
  return {h_next, c_next, gates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_cell_backward(
    const c10::optional<Tensor>& grad_h, const c10::optional<Tensor>& grad_c, const Tensor& input_arg,
    const Tensor& hx_arg, const Tensor& cx_arg, const Tensor& w_ih, const Tensor& w_hh, const Tensor& gates_arg,
    bool has_biases, bool need_input_grad, bool need_weight_grads, const LayerBackend& backend) {
  const int64_t H = check_cell(input_arg, hx_arg, cx_arg, w_ih, w_hh);
  const Tensor input = input_arg.contiguous(), hx = hx_arg.contiguous(), cx = cx_arg.contiguous();
  const int64_t N = input.size(0);
  check_matrix(gates_arg, input, N, 4 * H, "gates");
  const Tensor gates = gates_arg.contiguous();
  const auto opts = input.options();
  if (grad_h.has_value()) check_matrix(*grad_h, input, N, H, "grad_h");
  if (grad_c.has_value()) check_matrix(*grad_c, input, N, H, "grad_c");
  // [N, H] each: the gradient reaching h', the gradient of c' advanced in place into that of cx, and the
  // gradient of hx (zero in: no gradient reaches h' from a later step); then [N, 4H] for the gates.
  const Tensor dh = grad_h.has_value() ? grad_h->contiguous() : at::zeros({N, H}, opts);
  Tensor grad_cx = grad_c.has_value() ? grad_c->clone(at::MemoryFormat::Contiguous) : at::zeros({N, H}, opts);
  Tensor grad_hx = at::zeros({N, H}, opts);
  Tensor d_gates = at::empty({N, 4 * H}, opts);
  // A one-step backward recurrence: the backend's whole-recurrence path, where it has one, computes d_gates
  // and grad_hx = d_gates @ w_hh in one pass (on the CPU, w_hh in cache-sized chunks).
  const std::vector<int64_t> step_rows{N}, step_offset{0};
  RecurrenceBackwardArgs whole;
  whole.step_rows = &step_rows;
  whole.step_offset = &step_offset;
  whole.reverse = false;
  whole.gates = gates;
  whole.c_prev = cx;
  whole.d_output = dh;
  whole.w_hh = w_hh;
  whole.dh_state = grad_hx;
  whole.dc_state = grad_cx;
  whole.d_gates = d_gates;
  if (N > 0 && !backend.recurrence_backward(whole)) {
    const StepBackwardArgs a{
        .dtype = input.scalar_type(), .rows = N, .hidden = H,
        .gates = rows_at(gates, 0),
        .c_prev = rows_at(cx, 0),
        .dh = rows_at(dh, 0),
        .dc_state = rows_at(grad_cx, 0),
        .d_gates = rows_at(d_gates, 0),
    };
    backend.step_backward(a);
    backend.matmul(grad_hx, d_gates, w_hh, /*accumulate=*/false);  // [N, H]
  }
  // Each output its own tensor, empty ones too: outputs of an op must not alias each other.
  const auto nothing = [&] { return at::empty({0}, opts); };
  Tensor grad_input = nothing();
  if (need_input_grad) {
    grad_input = at::empty({N, input.size(1)}, opts);
    if (N > 0) backend.matmul(grad_input, d_gates, w_ih, /*accumulate=*/false);  // [N, I]
  }
  Tensor grad_w_ih = nothing(), grad_w_hh = nothing(), grad_b_ih = nothing(), grad_b_hh = nothing();
  if (need_weight_grads && N > 0) {
    grad_w_ih = backend.empty_weight_gradient(w_ih);
    grad_w_hh = backend.empty_weight_gradient(w_hh);
    backend.matmul(grad_w_ih, d_gates.t(), input, /*accumulate=*/false);  // [4H, I]
    backend.matmul(grad_w_hh, d_gates.t(), hx, /*accumulate=*/false);     // [4H, H]
  } else if (need_weight_grads) {  // an empty batch: zero gradients, as from any product over no rows
    grad_w_ih = at::zeros_like(w_ih, at::MemoryFormat::Contiguous);
    grad_w_hh = at::zeros_like(w_hh, at::MemoryFormat::Contiguous);
  }
  if (need_weight_grads && has_biases) {
    // Two tensors, not one returned twice: autograd may keep each as its parameter's .grad.
    grad_b_ih = d_gates.sum(0);
    grad_b_hh = grad_b_ih.clone();
  }
  return {grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh};
}

}  // namespace fused_lstm
