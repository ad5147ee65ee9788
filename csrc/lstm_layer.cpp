// The device-agnostic LSTM layer driver. See lstm_layer.h for shapes and the backend contract.
#include "lstm_layer.h"

#include <ATen/ATen.h>

#include <utility>

#include "arg_checks.h"

namespace fused_lstm {
namespace {

// Sizes of one layer call, checked once against every argument.
struct LayerShape {
  int64_t steps;       // T
  int64_t batch;       // N (rows of the first step)
  int64_t rows;        // R = total rows over all steps
  int64_t input_size;  // I
  int64_t hidden;      // H
  int64_t out_hidden;  // Hout
  int64_t directions;  // D
  bool dense;          // input is [T, N, I] rather than packed [R, I]
  std::vector<int64_t> step_rows;    // [T] active rows per step
  std::vector<int64_t> step_offset;  // [T] first row of each step
};

// The tensors of one direction, views into the caller's weight list.
struct DirectionWeights {
  Tensor w_ih;  // [4H, I]
  Tensor w_hh;  // [4H, Hout]
  Tensor b_ih;  // [4H] or undefined
  Tensor b_hh;  // [4H] or undefined
  Tensor w_hr;  // [Hout, H] or undefined
};

int64_t weights_per_direction(bool has_biases, bool has_projections) {
  return 2 + (has_biases ? 2 : 0) + (has_projections ? 1 : 0);
}

DirectionWeights direction_weights(at::TensorList weights, int64_t d, bool has_biases, bool has_projections) {
  const int64_t k = weights_per_direction(has_biases, has_projections);
  const at::TensorList w = weights.slice(d * k, k);
  DirectionWeights out;
  out.w_ih = w[0];
  out.w_hh = w[1];
  if (has_biases) {
    out.b_ih = w[2];
    out.b_hh = w[3];
  }
  if (has_projections) out.w_hr = w[k - 1];
  return out;
}

LayerShape check_layer(const Tensor& input, const c10::optional<Tensor>& batch_sizes, const Tensor& h0,
                       const Tensor& c0, at::TensorList weights, bool has_biases, bool has_projections,
                       bool bidirectional) {
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "fused_lstm: input must be a floating point tensor, got ",
              input.scalar_type());
  LayerShape s;
  s.directions = bidirectional ? 2 : 1;
  s.dense = !batch_sizes.has_value();
  TORCH_CHECK(input.dim() == (s.dense ? 3 : 2), "fused_lstm: expected ", s.dense ? "dense input [T, N, I]" :
              "packed input [R, I]", ", got a ", input.dim(), "-D tensor");
  TORCH_CHECK(h0.dim() == 3, "fused_lstm: expected h0 [D, N, Hout], got a ", h0.dim(), "-D tensor");
  s.batch = h0.size(1);
  s.input_size = input.size(-1);
  const int64_t k = weights_per_direction(has_biases, has_projections);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == k * s.directions, "fused_lstm: expected ",
              k * s.directions, " weight tensors, got ", weights.size());
  const DirectionWeights w0 = direction_weights(weights, 0, has_biases, has_projections);
  TORCH_CHECK(w0.w_ih.dim() == 2 && w0.w_ih.size(0) % 4 == 0, "fused_lstm: w_ih must be [4H, I], got ",
              w0.w_ih.sizes());
  s.hidden = w0.w_ih.size(0) / 4;
  s.out_hidden = has_projections ? w0.w_hr.size(0) : s.hidden;

  if (s.dense) {
    s.steps = input.size(0);
    TORCH_CHECK(input.size(1) == s.batch, "fused_lstm: input has batch ", input.size(1), " but h0 has batch ",
                s.batch);
    s.step_rows.assign(s.steps, s.batch);
  } else {
    const Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.device().is_cpu() && bs.scalar_type() == at::kLong && bs.dim() == 1,
                "fused_lstm: batch_sizes must be a 1-D int64 CPU tensor, got ", bs.scalar_type(), " on ",
                bs.device(), " with ", bs.dim(), " dims");
    s.steps = bs.size(0);
    const Tensor bs_contig = bs.contiguous();
    const int64_t* p = bs_contig.data_ptr<int64_t>();
    s.step_rows.assign(p, p + s.steps);
    TORCH_CHECK(s.steps == 0 || s.step_rows[0] == s.batch, "fused_lstm: batch_sizes[0] (", s.step_rows[0],
                ") must equal the batch size of h0 (", s.batch, ")");
    for (int64_t t = 1; t < s.steps; ++t) {
      TORCH_CHECK(s.step_rows[t] >= 0 && s.step_rows[t] <= s.step_rows[t - 1],
                  "fused_lstm: batch_sizes must be non-increasing, got ", c10::IntArrayRef(s.step_rows));
    }
  }
  TORCH_CHECK(s.steps > 0, "Expected sequence length to be larger than 0 in RNN");
  s.step_offset.resize(s.steps);
  int64_t rows = 0;
  for (int64_t t = 0; t < s.steps; ++t) {
    s.step_offset[t] = rows;
    rows += s.step_rows[t];
  }
  s.rows = rows;
  if (!s.dense) {
    TORCH_CHECK(input.size(0) == s.rows, "fused_lstm: packed input has ", input.size(0),
                " rows but batch_sizes sum to ", s.rows);
  }

  const int64_t D = s.directions, N = s.batch, H = s.hidden, Hout = s.out_hidden, I = s.input_size;
  check_same(h0, input, "h0");
  check_same(c0, input, "c0");
  check_shape(h0, {D, N, Hout}, "h0");
  check_shape(c0, {D, N, H}, "c0");
  for (int64_t d = 0; d < D; ++d) {
    const DirectionWeights w = direction_weights(weights, d, has_biases, has_projections);
    check_same(w.w_ih, input, "w_ih");
    check_shape(w.w_ih, {4 * H, I}, "w_ih");
    check_same(w.w_hh, input, "w_hh");
    check_shape(w.w_hh, {4 * H, Hout}, "w_hh");
    if (has_biases) {
      check_same(w.b_ih, input, "b_ih");
      check_shape(w.b_ih, {4 * H}, "b_ih");
      check_same(w.b_hh, input, "b_hh");
      check_shape(w.b_hh, {4 * H}, "b_hh");
    }
    if (has_projections) {
      check_same(w.w_hr, input, "w_hr");
      check_shape(w.w_hr, {Hout, H}, "w_hr");
    }
  }
  return s;
}

}  // namespace

StepRows rows_at(const Tensor& matrix, int64_t row) {
  if (!matrix.defined()) return {};
  TORCH_INTERNAL_ASSERT(matrix.dim() == 2 && (matrix.stride(1) == 1 || matrix.size(1) <= 1),
                        "fused_lstm: a step operand must be a matrix with contiguous columns");
  return {static_cast<char*>(matrix.data_ptr()) + row * matrix.stride(0) * matrix.element_size(), matrix.stride(0)};
}

StepForwardArgs StepForwardArgs::row_range(int64_t first, int64_t count) const {
  const int64_t bytes = c10::elementSize(dtype);
  const auto down = [&](const StepRows& m) -> StepRows {
    return m ? StepRows{static_cast<char*>(m.data) + first * m.row_stride * bytes, m.row_stride} : m;
  };
  return {dtype, count, hidden, out_hidden, down(gates), down(c_state), down(h_state), down(h_next),
          down(output), down(c_prev_saved), down(h_prev_saved)};
}

void LayerBackend::matmul(const Tensor& out, const Tensor& a, const Tensor& b, bool accumulate,
                          const Tensor& bias) const {
  TORCH_INTERNAL_ASSERT(!(accumulate && bias.defined()), "fused_lstm: matmul takes a bias only when not accumulating");
  Tensor& result = const_cast<Tensor&>(out);
  if (accumulate) {
    result.addmm_(a, b);
  } else if (bias.defined()) {
    at::addmm_out(result, bias, a, b);
  } else {
    at::mm_out(result, a, b);
  }
}

void LayerBackend::weight_gradients(const Tensor& grad_w_ih, const Tensor& grad_w_hh, const Tensor& grad_bias,
                                    const Tensor& d_gates, const Tensor& input, const Tensor& h_prev) const {
  matmul(grad_w_ih, d_gates.t(), input, /*accumulate=*/false);
  matmul(grad_w_hh, d_gates.t(), h_prev, /*accumulate=*/false);
  if (grad_bias.defined()) at::sum_out(const_cast<Tensor&>(grad_bias), d_gates, /*dim=*/{0});
}

Tensor LayerBackend::empty_weight_gradient(const Tensor& w) const {
  return at::empty_like(w, at::MemoryFormat::Contiguous);
}

void LayerBackend::for_each_direction(c10::ArrayRef<DirectionPass*> passes) const {
  for (DirectionPass* pass : passes) pass->run();
}

RecurrencePath parse_recurrence_path(c10::string_view name) {
  if (name == "auto") return RecurrencePath::Auto;
  if (name == "standard") return RecurrencePath::Standard;
  if (name == "persistent") return RecurrencePath::Persistent;
  TORCH_CHECK(false, "fused_lstm: recurrence must be 'auto', 'standard' or 'persistent', got '", name, "'");
}

bool LayerBackend::recurrence_forward(const RecurrenceForwardArgs& args) const {
  TORCH_CHECK(!args.required, "fused_lstm: recurrence='persistent' is not available on this device");
  return false;
}

bool LayerBackend::recurrence_backward(const RecurrenceBackwardArgs&) const { return false; }

namespace {
thread_local std::string last_path;  // per thread: concurrent callers do not see each other's calls
}  // namespace

std::string last_forward_path() { return last_path; }
void record_forward_path(std::string path) { last_path = std::move(path); }

namespace {

// What the directions of one forward call share: the checked shape, the inputs, and the buffers they write
// (direction d only slice d of each).
struct ForwardLayer {
  const LayerShape& s;
  const LayerBackend& backend;
  at::TensorList weights;
  bool has_biases, has_projections, need_workspace;
  Tensor input;             // [R, I]
  Tensor output;            // [R, D*Hout]
  Tensor h_n, c_n;          // [D, N, Hout], [D, N, H]: the running state, h0 and c0 in
  Tensor gates;             // [D, R, 4H] workspace, or [0, R, 4H] in inference
  Tensor c_prev, h_prev;    // [D, R, H], [D, R, Hout] workspace, or [0] in inference
  Tensor projection_input;  // [D, N, H] h' before w_hr, or undefined without projections
};

// Direction d's forward pass: the input projection (or the backend's whole recurrence) in the prologue, then
// one step body per time step, walking time backwards for d = 1.
class ForwardDirection final : public DirectionPass {
 public:
  ForwardDirection(const ForwardLayer& layer, int64_t d)
      : l_(layer),
        d_(d),
        reverse_(d == 1),
        w_(direction_weights(layer.weights, d, layer.has_biases, layer.has_projections)),
        h_state_(layer.h_n[d]),
        c_state_(layer.c_n[d]),
        output_(layer.output.narrow(1, d * layer.s.out_hidden, layer.s.out_hidden)),
        w_hh_t_(w_.w_hh.t()) {}

  // Whether the backend ran the whole recurrence (recurrence_forward).
  bool whole_recurrence() const { return whole_recurrence_; }

  int64_t prologue() override {
    const LayerShape& s = l_.s;
    const int64_t H = s.hidden, Hout = s.out_hidden;
    const Tensor bias = l_.has_biases ? w_.b_ih + w_.b_hh : Tensor();
    RecurrenceForwardArgs whole;
    whole.required = l_.backend.recurrence() == RecurrencePath::Persistent;
    whole.step_rows = &s.step_rows;
    whole.step_offset = &s.step_offset;
    whole.reverse = reverse_;
    whole.projected = false;
    whole.input = l_.input;
    whole.w_ih = w_.w_ih;
    whole.bias = bias;
    whole.gates = l_.need_workspace ? l_.gates[d_] : Tensor();
    whole.w_hh = w_.w_hh;
    whole.w_hr = w_.w_hr;
    whole.h_state = h_state_;
    whole.c_state = c_state_;
    whole.output = output_;
    if (l_.need_workspace) {
      whole.c_prev_saved = l_.c_prev[d_];
      whole.h_prev_saved = l_.h_prev[d_];
    }
    const bool try_whole = l_.backend.recurrence() != RecurrencePath::Standard;
    if (try_whole && l_.backend.recurrence_forward(whole)) {
      whole_recurrence_ = true;
      return 0;
    }
    gates_ = l_.need_workspace ? l_.gates[d_] : at::empty({s.rows, 4 * H}, l_.input.options());
    l_.backend.matmul(gates_, l_.input, w_.w_ih.t(), /*accumulate=*/false, bias);
    whole.projected = true;
    whole.gates = gates_;
    if (try_whole && l_.backend.recurrence_forward(whole)) {
      whole_recurrence_ = true;
      return 0;
    }
    return s.steps;
  }

  void step(int64_t i) override {
    const LayerShape& s = l_.s;
    const int64_t H = s.hidden, Hout = s.out_hidden;
    const int64_t t = reverse_ ? s.steps - 1 - i : i;
    const int64_t rows = s.step_rows[t], row0 = s.step_offset[t];
    if (rows == 0) return;
    l_.backend.matmul(gates_.narrow(0, row0, rows), h_state_.narrow(0, 0, rows), w_hh_t_, /*accumulate=*/true);
    const StepForwardArgs a{
        .dtype = l_.input.scalar_type(),
        .rows = rows,
        .hidden = H,
        .out_hidden = Hout,
        .gates = rows_at(gates_, row0),
        .c_state = rows_at(c_state_, 0),
        .h_state = rows_at(h_state_, 0),
        .h_next = rows_at(l_.has_projections ? l_.projection_input[d_] : h_state_, 0),
        .output = l_.has_projections ? StepRows{} : rows_at(output_, row0),
        .c_prev_saved = l_.need_workspace ? rows_at(l_.c_prev[d_], row0) : StepRows{},
        .h_prev_saved = l_.need_workspace ? rows_at(l_.h_prev[d_], row0) : StepRows{},
    };
    l_.backend.step_forward(a);
    if (l_.has_projections) {
      const Tensor h_rows = h_state_.narrow(0, 0, rows);
      l_.backend.matmul(h_rows, l_.projection_input[d_].narrow(0, 0, rows), w_.w_hr.t(), /*accumulate=*/false);
      output_.narrow(0, row0, rows).copy_(h_rows);
    }
  }

 private:
  const ForwardLayer& l_;
  const int64_t d_;
  const bool reverse_;  // walks time from T-1 down to 0
  const DirectionWeights w_;
  const Tensor h_state_;  // [N, Hout]
  const Tensor c_state_;  // [N, H]
  const Tensor output_;   // [R, Hout], row stride D*Hout: this direction's columns of the output
  const Tensor w_hh_t_;   // [Hout, 4H]
  Tensor gates_;          // [R, 4H]: the input projection, then post-activation gates (set by the prologue)
  bool whole_recurrence_ = false;
};

// What the directions of one backward call share, as ForwardLayer.
struct BackwardLayer {
  const LayerShape& s;
  const LayerBackend& backend;
  at::TensorList weights;
  bool has_biases, has_projections, need_weight_grads, need_h0_grad;
  Tensor input;                  // [R, I]
  Tensor grad_output;            // [R, D*Hout]
  Tensor gates, c_prev, h_prev;  // the forward's workspace: [D, R, 4H], [D, R, H], [D, R, Hout]
  Tensor d_gates;                // [D, R, 4H] out: gradients of the pre-activations
  Tensor grad_h0, grad_c0;       // [D, N, Hout], [D, N, H]: the running dh and dc, grad_h_n and grad_c_n in
  Tensor dh_total;               // [D, R, Hout] dL/dh per row (after w_hr), or undefined without projections
  Tensor h_next;                 // [D, R, H] recomputed h' before w_hr per row, or undefined
  Tensor dh_projected;           // [D, N, H] dL/dh' (before w_hr) of the current step, or undefined
  at::TensorList grad_weights;   // in the order of weights
};

// Direction d's backward pass: the backend's whole recurrence (if it takes it) in the prologue, else one step
// body per time step in the opposite order of the forward pass; the weight gradients in the epilogue.
class BackwardDirection final : public DirectionPass {
 public:
  BackwardDirection(const BackwardLayer& layer, int64_t d)
      : l_(layer),
        d_(d),
        reverse_(d == 1),
        w_(direction_weights(layer.weights, d, layer.has_biases, layer.has_projections)),
        d_gates_(layer.d_gates[d]),
        dh_state_(layer.grad_h0[d]),
        dc_state_(layer.grad_c0[d]) {}

  int64_t prologue() override {
    const LayerShape& s = l_.s;
    // recurrence="standard" walks the steps in backward too; "persistent" reaches the backend through
    // recurrence() (the CUDA backend then runs its persistent kernel or throws why it cannot).
    if (l_.backend.recurrence() == RecurrencePath::Standard) return s.steps;
    RecurrenceBackwardArgs whole;
    whole.step_rows = &s.step_rows;
    whole.step_offset = &s.step_offset;
    whole.reverse = reverse_;
    whole.gates = l_.gates[d_];
    whole.c_prev = l_.c_prev[d_];
    whole.d_output = l_.grad_output.narrow(1, d_ * s.out_hidden, s.out_hidden);
    whole.w_hh = w_.w_hh;
    whole.dh_state = dh_state_;
    whole.dc_state = dc_state_;
    whole.d_gates = d_gates_;
    whole.need_h0_grad = l_.need_h0_grad;
    if (l_.has_projections) {  // the per-step loop's buffers for grad_w_hr (epilogue)
      whole.w_hr = w_.w_hr;
      whole.dh_total = l_.dh_total[d_];  // [R, Hout]
      whole.h_next = l_.h_next[d_];      // [R, H]
    }
    return l_.backend.recurrence_backward(whole) ? 0 : s.steps;
  }

  void step(int64_t i) override {
    const LayerShape& s = l_.s;
    const int64_t H = s.hidden, Hout = s.out_hidden;
    const int64_t t = reverse_ ? i : s.steps - 1 - i;  // the opposite order of this direction's forward pass
    const int64_t rows = s.step_rows[t], row0 = s.step_offset[t];
    if (rows == 0) return;
    const Tensor d_output_rows = l_.grad_output.narrow(0, row0, rows).narrow(1, d_ * Hout, Hout);
    StepBackwardArgs a{
        .dtype = l_.input.scalar_type(),
        .rows = rows,
        .hidden = H,
        .gates = rows_at(l_.gates[d_], row0),
        .c_prev = rows_at(l_.c_prev[d_], row0),
        .dh = rows_at(dh_state_, 0),
        .d_output = rows_at(d_output_rows, 0),
        .dc_state = rows_at(dc_state_, 0),
        .d_gates = rows_at(d_gates_, row0),
    };
    if (l_.has_projections) {
      const Tensor dh_rows = l_.dh_total[d_].narrow(0, row0, rows);
      at::add_out(const_cast<Tensor&>(dh_rows), dh_state_.narrow(0, 0, rows), d_output_rows);
      l_.backend.matmul(l_.dh_projected[d_].narrow(0, 0, rows), dh_rows, w_.w_hr, /*accumulate=*/false);
      a.dh = rows_at(l_.dh_projected[d_], 0);
      a.d_output = {};
      a.h_next = rows_at(l_.h_next[d_], row0);
    }
    l_.backend.step_backward(a);
    const int64_t carried = carried_rows(s.step_rows, t, reverse_, l_.need_h0_grad);
    if (carried > 0) {
      l_.backend.matmul(dh_state_.narrow(0, 0, carried), d_gates_.narrow(0, row0, carried), w_.w_hh,
                        /*accumulate=*/false);
    }
  }

  // Weight gradients as a few large GEMMs over all rows.
  void epilogue() override {
    if (!l_.need_weight_grads) return;
    const int64_t k = weights_per_direction(l_.has_biases, l_.has_projections);
    const at::TensorList gw = l_.grad_weights.slice(d_ * k, k);
    l_.backend.weight_gradients(gw[0], gw[1], l_.has_biases ? gw[2] : Tensor(), d_gates_, l_.input, l_.h_prev[d_]);
    if (l_.has_biases) gw[3].copy_(gw[2]);
    if (l_.has_projections) {
      l_.backend.matmul(gw[k - 1], l_.dh_total[d_].t(), l_.h_next[d_], /*accumulate=*/false);  // [Hout, H]
    }
  }

 private:
  const BackwardLayer& l_;
  const int64_t d_;
  const bool reverse_;  // the forward pass walked time from T-1 down to 0
  const DirectionWeights w_;
  const Tensor d_gates_;   // [R, 4H]
  const Tensor dh_state_;  // [N, Hout]
  const Tensor dc_state_;  // [N, H]
};

// Makes one Pass per direction of the layer and runs them as the backend schedules them; returns them, for
// their results.
template <class Pass, class Layer>
std::vector<Pass> run_directions(const Layer& layer) {
  std::vector<Pass> passes;
  passes.reserve(layer.s.directions);  // never reallocated: `schedule` points into it
  std::vector<DirectionPass*> schedule;
  for (int64_t d = 0; d < layer.s.directions; ++d) {
    passes.emplace_back(layer, d);
    schedule.push_back(&passes.back());
  }
  layer.backend.for_each_direction(schedule);
  return passes;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_forward(
    const Tensor& input_arg, const c10::optional<Tensor>& batch_sizes, const Tensor& h0, const Tensor& c0,
    at::TensorList weights, bool has_biases, bool has_projections, bool bidirectional, bool need_workspace,
    const LayerBackend& backend) {
  const LayerShape s = check_layer(input_arg, batch_sizes, h0, c0, weights, has_biases, has_projections,
                                   bidirectional);
  const int64_t D = s.directions, N = s.batch, H = s.hidden, Hout = s.out_hidden, R = s.rows;
  const Tensor input = input_arg.contiguous().view({R, s.input_size});  // [R, I]
  const auto opts = input.options();

  // Everything the directions write is allocated before they start, so a backend may run them on other
  // streams without outputs crossing streams.
  Tensor output = at::empty({R, D * Hout}, opts);
  // The running state lives in h_n / c_n: rows of finished sequences simply stop being updated.
  Tensor h_n = h0.contiguous().clone();  // [D, N, Hout]
  Tensor c_n = c0.contiguous().clone();  // [D, N, H]
  // Pre-activations of every step, turned into post-activation gates in place (the workspace; in
  // inference a direction's buffer is made only if the backend does not fuse the input projection).
  Tensor gates = at::empty({need_workspace ? D : 0, R, 4 * H}, opts);
  Tensor c_prev = need_workspace ? at::empty({D, R, H}, opts) : at::empty({0}, opts);
  Tensor h_prev = need_workspace ? at::empty({D, R, Hout}, opts) : at::empty({0}, opts);
  Tensor projection_input = has_projections ? at::empty({D, N, H}, opts) : Tensor();  // h' before w_hr

  const ForwardLayer layer{s, backend, weights,
                           has_biases, has_projections, need_workspace,
                           input, output, h_n, c_n, gates, c_prev, h_prev, projection_input};
  bool whole_recurrence = false;
  for (const ForwardDirection& pass : run_directions<ForwardDirection>(layer)) {
    whole_recurrence = whole_recurrence || pass.whole_recurrence();
  }

  record_forward_path(backend.path_name(whole_recurrence));
  if (!need_workspace) gates = at::empty({0}, opts);
  if (s.dense) output = output.view({s.steps, N, D * Hout});
  return {output, h_n, c_n, gates, c_prev, h_prev};
}

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> lstm_layer_backward(
    const Tensor& grad_output_arg, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& input_arg,
    const c10::optional<Tensor>& batch_sizes, const Tensor& h0, const Tensor& c0, at::TensorList weights,
    bool has_biases, bool has_projections, bool bidirectional, const Tensor& gates, const Tensor& c_prev,
    const Tensor& h_prev, bool need_input_grad, bool need_weight_grads, bool need_h0_grad,
    const LayerBackend& backend) {
  const LayerShape s = check_layer(input_arg, batch_sizes, h0, c0, weights, has_biases, has_projections,
                                   bidirectional);
  const int64_t D = s.directions, N = s.batch, H = s.hidden, Hout = s.out_hidden, R = s.rows, I = s.input_size;
  TORCH_CHECK(gates.numel() == D * R * 4 * H && c_prev.numel() == D * R * H && h_prev.numel() == D * R * Hout,
              "fused_lstm: lstm_layer_backward needs the workspace of a forward call made with "
              "need_workspace=True");
  const Tensor input = input_arg.contiguous().view({R, I});
  const Tensor grad_output = grad_output_arg.contiguous().view({R, D * Hout});
  check_same(grad_output, input, "grad_output");
  check_shape(grad_h_n, h0.sizes(), "grad_h_n");
  check_shape(grad_c_n, c0.sizes(), "grad_c_n");
  const Tensor gates_ws = gates.contiguous().view({D, R, 4 * H});
  const Tensor c_prev_ws = c_prev.contiguous().view({D, R, H});
  const Tensor h_prev_ws = h_prev.contiguous().view({D, R, Hout});
  const auto opts = input.options();

  // Everything the directions write is allocated before they start, so a backend may run them on
  // other streams without outputs crossing streams.
  Tensor d_gates = at::empty({D, R, 4 * H}, opts);
  Tensor grad_h0 = grad_h_n.to(opts, /*non_blocking=*/false, /*copy=*/true).contiguous();  // running dh
  Tensor grad_c0 = grad_c_n.to(opts, /*non_blocking=*/false, /*copy=*/true).contiguous();  // running dc
  Tensor dh_total = has_projections ? at::empty({D, R, Hout}, opts) : Tensor();  // dL/dh per row (after w_hr)
  Tensor h_next = has_projections ? at::empty({D, R, H}, opts) : Tensor();      // h' before w_hr per row
  Tensor dh_projected = has_projections ? at::empty({D, N, H}, opts) : Tensor();
  std::vector<Tensor> grad_weights;
  grad_weights.reserve(weights.size());
  for (const Tensor& w : weights) {
    grad_weights.push_back(need_weight_grads ? backend.empty_weight_gradient(w) : at::empty({0}, opts));
  }

  const BackwardLayer layer{s, backend, weights,
                            has_biases, has_projections, need_weight_grads, need_h0_grad,
                            input, grad_output, gates_ws, c_prev_ws, h_prev_ws, d_gates, grad_h0, grad_c0,
                            dh_total, h_next, dh_projected, grad_weights};
  run_directions<BackwardDirection>(layer);

  Tensor grad_input = at::empty({0}, opts);
  if (need_input_grad) {
    grad_input = at::empty({R, I}, opts);
    for (int64_t d = 0; d < D; ++d) {
      const DirectionWeights w = direction_weights(weights, d, has_biases, has_projections);
      backend.matmul(grad_input, d_gates[d], w.w_ih, /*accumulate=*/d > 0);  // [R, I]
    }
    if (s.dense) grad_input = grad_input.view({s.steps, N, I});
  }
  if (!need_h0_grad) grad_h0 = at::empty({0}, opts);
  return {grad_input, grad_h0, grad_c0, grad_weights};
}

}  // namespace fused_lstm
