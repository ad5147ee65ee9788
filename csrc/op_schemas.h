// The schemas of fused_lstm's ops, defined once for every library that registers them: torch.ops.fused_lstm
// (ops.cpp) and its emulated CUDA twin torch.ops.fused_lstm_emu (emu/module.cpp).
#pragma once

#include <torch/library.h>

namespace fused_lstm {

inline void define_ops(torch::Library& m) {
  // One layer, both directions in one call. Shapes in lstm_layer.h; `recurrence` picks the forward path
  // ("auto", "standard", "persistent": RecurrencePath in lstm_layer.h). Returns
  // (output, h_n, c_n, gates, c_prev, h_prev); the last three are the backward workspace, empty
  // [0] tensors when need_workspace is false.
  m.def(
      "lstm_layer(Tensor input, Tensor? batch_sizes, Tensor h0, Tensor c0, Tensor[] weights, bool has_biases, "
      "bool has_projections, bool bidirectional, bool need_workspace, str recurrence=\"auto\") "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Returns (grad_input, grad_h0, grad_c0, grad_weights); grad_input (resp. every grad_weights entry, grad_h0)
  // is an empty [0] tensor when need_input_grad (resp. need_weight_grads, need_h0_grad) is false, and its
  // products are skipped. `recurrence` is the forward call's: "standard" walks the steps, "persistent" requires
  // the backend's whole-recurrence backward where it has one (CUDA), "auto" lets the backend decide.
  m.def(
      "lstm_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, "
      "Tensor? batch_sizes, Tensor h0, Tensor c0, Tensor[] weights, bool has_biases, bool has_projections, "
      "bool bidirectional, Tensor gates, Tensor c_prev, Tensor h_prev, bool need_input_grad=True, "
      "bool need_weight_grads=True, bool need_h0_grad=True, str recurrence=\"auto\") "
      "-> (Tensor, Tensor, Tensor, Tensor[])");
  // One LSTMCell step (shapes in cell_step.h). Returns (h', c', gates); gates, the post-activation gates,
  // are what lstm_cell_backward needs.
  m.def(
      "lstm_cell(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) "
      "-> (Tensor, Tensor, Tensor)");
  // Returns (grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh); the bias gradients
  // are empty [0] tensors when has_biases is false, grad_input / the weight and bias gradients when
  // need_input_grad / need_weight_grads is false. grad_h / grad_c may be None (no gradient reaches them).
  m.def(
      "lstm_cell_backward(Tensor? grad_h, Tensor? grad_c, Tensor input, Tensor hx, Tensor cx, Tensor w_ih, "
      "Tensor w_hh, Tensor gates, bool has_biases, bool need_input_grad=True, bool need_weight_grads=True) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace fused_lstm
