// One LSTM layer (one or two directions) as a device-agnostic driver over a small backend interface.
//
// The driver owns the algorithm (input projection as one GEMM, the time loop, deferred weight-gradient
// GEMMs); a backend supplies the matrix products and the two fused pointwise steps. The CPU backend lives
// in csrc/cpu/, the CUDA backend in csrc/cuda/; both share the cell math of lstm_cell.h.
//
// Shapes (D = 2 if bidirectional else 1, H = hidden size, Hout = proj_size if projecting else H):
//   input:       dense [T, N, I] (batch_sizes undefined) or packed [R, I] with batch_sizes [T]
//                (int64, CPU, non-increasing, sum = R). Dense is treated as packed with N rows per step.
//   h0:          [D, N, Hout]     c0: [D, N, H]
//   weights:     per direction, in torch.nn.LSTM order: w_ih [4H, I], w_hh [4H, Hout],
//                (b_ih [4H], b_hh [4H] if has_biases), (w_hr [Hout, H] if has_projections)
//   output:      dense [T, N, D*Hout] or packed [R, D*Hout]; direction d owns columns [d*Hout, (d+1)*Hout)
//   h_n, c_n:    like h0, c0
// Workspaces kept for backward (empty [0] tensors when need_workspace is false):
//   gates:       [D, R, 4H] post-activation gates, order i, f, g, o
//   c_prev:      [D, R, H]  the cell state each row's step started from
//   h_prev:      [D, R, Hout] the hidden state each row's step started from
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <string>
#include <tuple>
#include <vector>

namespace fused_lstm {

using at::Tensor;

// One matrix operand of a step kernel: row b of the step's rows starts `row_stride` elements after row b - 1,
// its columns are contiguous. Null data: the operand is absent.
struct StepRows {
  void* data = nullptr;
  int64_t row_stride = 0;
  C10_HOST_DEVICE explicit operator bool() const { return data != nullptr; }
  template <typename T>
  C10_HOST_DEVICE T* row(int64_t b) const {
    return static_cast<T*>(data) + b * row_stride;
  }
};

// Row `row` of a matrix (2-D, unit column stride) as a StepRows operand; absent for an undefined tensor.
StepRows rows_at(const Tensor& matrix, int64_t row);

// Arguments of the fused pointwise forward of one time step for `rows` active batch rows, each operand with
// its own row stride. `dtype` is the storage type of every operand.
struct StepForwardArgs {
  at::ScalarType dtype;
  int64_t rows, hidden, out_hidden;
  StepRows gates;         // [rows, 4H]: pre-activations in, post-activations out
  StepRows c_state;       // [rows, H]: c in, c' out
  StepRows h_state;       // [rows, Hout]: h (read only to save it in h_prev_saved)
  StepRows h_next;        // [rows, H]: receives h' (the state itself when not projecting)
  StepRows output;        // [rows, Hout] or absent: also receives h' (absent when projecting)
  StepRows c_prev_saved;  // [rows, H] or absent: receives c
  StepRows h_prev_saved;  // [rows, Hout] or absent: receives h
  // The arguments of rows [first, first + count) of this step (every operand moved down `first` of its rows).
  StepForwardArgs row_range(int64_t first, int64_t count) const;
};

// Arguments of the fused pointwise backward of one time step, likewise.
struct StepBackwardArgs {
  at::ScalarType dtype;
  int64_t rows, hidden;
  StepRows gates;     // [rows, 4H] saved post-activation gates
  StepRows c_prev;    // [rows, H] saved cell state the step started from
  StepRows dh;        // [rows, H] gradient reaching h' from later steps (or through the projection)
  StepRows d_output;  // [rows, H] or absent: added to dh (absent when projecting)
  StepRows dc_state;  // [rows, H]: gradient of c' in, gradient of c out
  StepRows d_gates;   // [rows, 4H]: gradient of the pre-activations
  StepRows h_next;    // [rows, H] or absent: receives the recomputed h' (projection weight gradient)
};

// Which path the forward time loop takes (the op's `recurrence` argument):
//   Auto:       the backend decides (CPU: its fused recurrence where it applies; CUDA: the persistent
//               kernel only as FUSED_LSTM_PERSISTENT says, which defaults to never);
//   Standard:   the driver's per-step loop (a GEMM and a pointwise step per step);
//   Persistent: the backend's whole-recurrence path, or an error saying why it cannot run this layer.
enum class RecurrencePath { Auto, Standard, Persistent };
RecurrencePath parse_recurrence_path(c10::string_view name);

// The whole time loop of one direction's forward pass, for backends that can run it in one go (the
// persistent CUDA kernel). Tensors are views into the driver's buffers; shapes as in the header comment.
struct RecurrenceForwardArgs {
  bool required = false;  // RecurrencePath::Persistent: run it or throw the reason, never return false
  const std::vector<int64_t>* step_rows;    // [T] active rows per step (host)
  const std::vector<int64_t>* step_offset;  // [T] first row of each step (host)
  bool reverse;                             // walk the steps from T-1 down to 0
  // The driver asks twice: first with projected = false, offering the input projection too (gates then
  // the workspace or undefined in inference, holding nothing yet), and, if declined, again after
  // computing it into gates.
  bool projected = true;
  Tensor input;         // [R, I] the layer input
  Tensor w_ih;          // [4H, I]
  Tensor bias;          // [4H] b_ih + b_hh, or undefined
  Tensor gates;         // [R, 4H]: input projection + biases in (when projected); post-activation gates out
  Tensor w_hh;          // [4H, Hout]
  Tensor w_hr;          // [Hout, H] or undefined
  Tensor h_state;       // [N, Hout]: h0 in, h_n out
  Tensor c_state;       // [N, H]: c0 in, c_n out
  Tensor output;        // [R, Hout], row stride D*Hout: this direction's columns of the output
  Tensor c_prev_saved;  // [R, H] or undefined (no workspace)
  Tensor h_prev_saved;  // [R, Hout] or undefined
};

// The whole time loop of one direction's backward pass, for backends that can run it in one go. Walks the
// steps in the opposite order of the forward pass. With a projection (w_hr defined) it also fills the two
// per-row buffers the driver's epilogue computes grad_w_hr = dh_total^T @ h_next from, exactly as its
// per-step loop does; a backend that does not run projections returns false when w_hr is defined.
struct RecurrenceBackwardArgs {
  const std::vector<int64_t>* step_rows;    // [T] active rows per step (host)
  const std::vector<int64_t>* step_offset;  // [T] first row of each step (host)
  bool reverse;                             // the forward pass walked the steps from T-1 down to 0
  Tensor gates;        // [R, 4H] saved post-activation gates
  Tensor c_prev;       // [R, H] saved cell states
  Tensor d_output;     // [R, Hout], row stride D*Hout: this direction's columns of grad_output
  Tensor w_hh;         // [4H, Hout]
  Tensor dh_state;     // [N, Hout]: grad of h_n in, grad of h0 out
  Tensor dc_state;     // [N, H]: grad of c_n in, grad of c0 out
  Tensor d_gates;      // [R, 4H] out: gradients of the pre-activations
  Tensor w_hr;         // [Hout, H], or undefined without a projection
  Tensor dh_total;     // [R, Hout] out (with w_hr): dL/dh per row after w_hr (carried dh + grad_output)
  Tensor h_next;       // [R, H] out (with w_hr): the recomputed h' = o * tanh(c') before w_hr per row
  // Without it dh_state's rows are left undefined once their sequence's first step is done: the product
  // that would carry dh back to h0 (d_gates of that step @ w_hh) is skipped.
  bool need_h0_grad = true;
};

// How many of backward step t's rows (t in forward time, the step's rows first in the batch) need the step's
// dh product, d_gates @ w_hh: all of them when h0's gradient is wanted (each sequence's dh after its first
// step is its row of grad_h0), else only the sequences that go on to an earlier step of theirs. Forward,
// every sequence starts at t = 0; reversed, a sequence starts at its own end, so after step t only the
// step_rows[t + 1] longer ones go on.
inline int64_t carried_rows(const std::vector<int64_t>& step_rows, int64_t t, bool reverse, bool need_h0_grad) {
  const int64_t steps = static_cast<int64_t>(step_rows.size());
  if (need_h0_grad) return step_rows[t];
  if (!reverse) return t > 0 ? step_rows[t] : 0;
  return t + 1 < steps ? step_rows[t + 1] : 0;
}

// One direction's share of a layer's forward or backward pass, cut where a backend may switch to the other
// direction's work:
//   steps = prologue()  everything before the time loop: the input projection, or the whole recurrence when
//                       a recurrence hook takes it (then steps = 0); returns how many step bodies follow;
//   step(i)             step body i, for i = 0 .. steps-1 in that order (i counts the pass's own walk: a
//                       reversed forward pass starts at time T-1);
//   epilogue()          everything after the last step (the backward's weight gradients).
// One pass's calls must come in exactly this order, all on one stream. The passes of different directions
// write disjoint data (each its own slice of every buffer) and share only what they read, so a backend may
// order the calls of different passes among each other as it likes.
class DirectionPass {
 public:
  virtual ~DirectionPass() = default;
  virtual int64_t prologue() = 0;
  virtual void step(int64_t i) = 0;
  virtual void epilogue() {}
  // The pass on its own: the prologue, every step, the epilogue.
  void run() {
    const int64_t steps = prologue();
    for (int64_t i = 0; i < steps; ++i) step(i);
    epilogue();
  }
};

// Whose switches decide how a backend's float32 products may round (on CUDA: TF32 or strict FP32): the
// layer op follows torch.nn.LSTM (the cuDNN RNN switches), the cell op torch.nn.LSTMCell, which is two
// linear layers and so follows torch.matmul's.
enum class ProductPrecision { Rnn, Matmul };

// What a device provides to the driver. Every call is enqueued on the device's current stream. One
// instance serves one op call.
class LayerBackend {
 public:
  explicit LayerBackend(RecurrencePath recurrence = RecurrencePath::Auto,
                        ProductPrecision precision = ProductPrecision::Rnn)
      : recurrence_(recurrence), precision_(precision) {}
  virtual ~LayerBackend() = default;
  // The forward path this call asked for (the driver honours Standard and Persistent; a backend may use it
  // to schedule, e.g. to keep cooperative launches of two directions apart).
  RecurrencePath recurrence() const { return recurrence_; }
  ProductPrecision precision() const { return precision_; }
  // out = a @ b + bias (bias [cols] broadcast over rows, or none when undefined); with accumulate,
  // out += a @ b (bias must be undefined). `a` and `b` may be transposed views.
  virtual void matmul(const Tensor& out, const Tensor& a, const Tensor& b, bool accumulate,
                      const Tensor& bias = Tensor()) const;
  // The weight and bias gradients of one direction, from all its rows at once:
  //   grad_w_ih = d_gates^T @ input, grad_w_hh = d_gates^T @ h_prev, grad_bias = d_gates summed over rows
  //   d_gates [R, 4H], input [R, I], h_prev [R, Hout]; out: grad_w_ih [4H, I], grad_w_hh [4H, Hout] and
  //   grad_bias [4H] (undefined without biases). The default is two matmuls and a sum.
  virtual void weight_gradients(const Tensor& grad_w_ih, const Tensor& grad_w_hh, const Tensor& grad_bias,
                                const Tensor& d_gates, const Tensor& input, const Tensor& h_prev) const;
  // An uninitialised contiguous tensor shaped like the weight w, for its gradient. The default is
  // at::empty_like; the CPU recycles the storage of earlier steps' gradients (cpu/recycled_gradients.h).
  virtual Tensor empty_weight_gradient(const Tensor& w) const;
  virtual void step_forward(const StepForwardArgs& args) const = 0;
  virtual void step_backward(const StepBackwardArgs& args) const = 0;
  // Runs the pass of each direction (passes[d] is direction d's; one or two of them). The default runs them
  // one after the other, each whole (DirectionPass::run). A device may interleave their calls as
  // DirectionPass allows, e.g. to overlap the two recurrences on two streams; when it returns, or throws,
  // all of their work must be finished or ordered before the current stream's later work. What a pass
  // allocates lives until the pass is destroyed, after this returns.
  virtual void for_each_direction(c10::ArrayRef<DirectionPass*> passes) const;
  // Runs the whole forward recurrence of one direction and returns true, or returns false (the default)
  // to let the driver walk the steps itself with matmul + step_forward.
  virtual bool recurrence_forward(const RecurrenceForwardArgs& args) const;
  // Likewise for the backward recurrence (with projections too: see RecurrenceBackwardArgs).
  virtual bool recurrence_backward(const RecurrenceBackwardArgs& args) const;
  // A name for the path a forward call took, for diagnostics and the benchmark ("cuda:standard", ...).
  virtual std::string path_name(bool whole_recurrence) const = 0;

 private:
  RecurrencePath recurrence_;
  ProductPrecision precision_;
};

// The path the last forward op call (layer or cell) on this thread took (path_name of its backend), or ""
// before the first call.
std::string last_forward_path();
// Sets what last_forward_path returns on this thread (each forward op calls it once).
void record_forward_path(std::string path);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_forward(
    const Tensor& input, const c10::optional<Tensor>& batch_sizes, const Tensor& h0, const Tensor& c0,
    at::TensorList weights, bool has_biases, bool has_projections, bool bidirectional, bool need_workspace,
    const LayerBackend& backend);

// Gradients of lstm_layer_forward. grad_output is shaped like output, grad_h_n/grad_c_n like h0/c0.
// Returns (grad_input, grad_h0, grad_c0, grad_weights) with grad_weights in the order of `weights`;
// without need_input_grad (need_weight_grads, need_h0_grad) grad_input (each grad_weights entry, grad_h0)
// is an empty [0] tensor and its products are skipped: the first layer's input is usually data, frozen
// weights need none, and h0 is usually zeros or a detached state (its product is 1/T of the recurrence's).
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> lstm_layer_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& input,
    const c10::optional<Tensor>& batch_sizes, const Tensor& h0, const Tensor& c0, at::TensorList weights,
    bool has_biases, bool has_projections, bool bidirectional, const Tensor& gates, const Tensor& c_prev,
    const Tensor& h_prev, bool need_input_grad, bool need_weight_grads, bool need_h0_grad,
    const LayerBackend& backend);

// The registered kernels of a backend (its TORCH_LIBRARY_IMPL maps the op schemas onto these), run
// under DeviceGuard for the input's device.
struct NoDeviceGuard {
  explicit NoDeviceGuard(c10::Device) {}
};

template <class Backend, class DeviceGuard = NoDeviceGuard>
struct LayerOps {
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> forward(
      const Tensor& input, const c10::optional<Tensor>& batch_sizes, const Tensor& h0, const Tensor& c0,
      at::TensorList weights, bool has_biases, bool has_projections, bool bidirectional, bool need_workspace,
      c10::string_view recurrence) {
    const DeviceGuard guard(input.device());
    return lstm_layer_forward(input, batch_sizes, h0, c0, weights, has_biases, has_projections, bidirectional,
                              need_workspace, Backend(parse_recurrence_path(recurrence)));
  }

  static std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> backward(
      const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& input,
      const c10::optional<Tensor>& batch_sizes, const Tensor& h0, const Tensor& c0, at::TensorList weights,
      bool has_biases, bool has_projections, bool bidirectional, const Tensor& gates, const Tensor& c_prev,
      const Tensor& h_prev, bool need_input_grad, bool need_weight_grads, bool need_h0_grad,
      c10::string_view recurrence) {
    const DeviceGuard guard(input.device());
    return lstm_layer_backward(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, weights, has_biases,
                               has_projections, bidirectional, gates, c_prev, h_prev, need_input_grad,
                               need_weight_grads, need_h0_grad, Backend(parse_recurrence_path(recurrence)));
  }
};

}  // namespace fused_lstm
