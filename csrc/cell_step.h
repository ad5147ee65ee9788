// One LSTMCell step as its own op, over the same backend as the layer driver (lstm_layer.h).
//
// A layer call with T = 1 would compute the same numbers, but a cell is called once per time step from a
// Python loop, so every fixed cost counts: the layer's autograd wrapper takes a list of weights (pytree
// packing both ways) and its driver sets up workspaces, directions and step tables. The cell op takes
// flat arguments and does two products and one pointwise pass forward; backward, one pointwise pass,
// four products and the bias sum.
//
// Shapes (N = batch, I = input size, H = hidden size):
//   input [N, I], hx [N, H], cx [N, H], w_ih [4H, I], w_hh [4H, H], b_ih [4H] / b_hh [4H] (optional)
//   forward returns h' [N, H], c' [N, H] and gates [N, 4H], the post-activation gates (i, f, g, o) that
//   the backward needs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "lstm_layer.h"

namespace fused_lstm {

std::tuple<Tensor, Tensor, Tensor> lstm_cell_forward(const Tensor& input, const Tensor& hx, const Tensor& cx,
                                                     const Tensor& w_ih, const Tensor& w_hh,
                                                     const c10::optional<Tensor>& b_ih,
                                                     const c10::optional<Tensor>& b_hh, const LayerBackend& backend);

// Gradients of lstm_cell_forward. grad_h / grad_c [N, H] may be undefined (no gradient reaches that
// output). Returns (grad_input [N, I], grad_hx [N, H], grad_cx [N, H], grad_w_ih [4H, I],
// grad_w_hh [4H, H], grad_b_ih [4H], grad_b_hh [4H]); the bias gradients are equal, [0] without biases;
// grad_input (the weight and bias gradients) [0] and not computed without need_input_grad
// (need_weight_grads).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_cell_backward(
    const c10::optional<Tensor>& grad_h, const c10::optional<Tensor>& grad_c, const Tensor& input,
    const Tensor& hx, const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh, const Tensor& gates,
    bool has_biases, bool need_input_grad, bool need_weight_grads, const LayerBackend& backend);

// The registered kernels of a backend, run under DeviceGuard for the input's device (as LayerOps), with
// torch.nn.LSTMCell's precision policy for the products.
template <class Backend, class DeviceGuard = NoDeviceGuard>
struct CellOps {
  static std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& input, const Tensor& hx, const Tensor& cx,
                                                    const Tensor& w_ih, const Tensor& w_hh,
                                                    const c10::optional<Tensor>& b_ih,
                                                    const c10::optional<Tensor>& b_hh) {
    const DeviceGuard guard(input.device());
    return lstm_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh,
                             Backend(RecurrencePath::Auto, ProductPrecision::Matmul));
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward(
      const c10::optional<Tensor>& grad_h, const c10::optional<Tensor>& grad_c, const Tensor& input,
      const Tensor& hx, const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh, const Tensor& gates,
      bool has_biases, bool need_input_grad, bool need_weight_grads) {
    const DeviceGuard guard(input.device());
    return lstm_cell_backward(grad_h, grad_c, input, hx, cx, w_ih, w_hh, gates, has_biases, need_input_grad,
                              need_weight_grads, Backend(RecurrencePath::Auto, ProductPrecision::Matmul));
  }
};

}  // namespace fused_lstm
