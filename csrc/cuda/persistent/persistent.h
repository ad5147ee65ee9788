// The persistent recurrences on CUDA: one cooperative kernel launch runs a whole direction's time loop,
// forward or backward (see DESIGN.md, "The persistent path", and persistent_forward.cuh /
// persistent_backward.cuh for how the kernels work).
//
// The CUDA backend calls persistent_try_forward from its LayerBackend::recurrence_forward override; the
// other functions are the pieces it is made of, public so that a caller can decide differently.
#pragma once

#include <cstdint>
#include <string>

#include "../../lstm_layer.h"
#include "../gpu_runtime.h"

namespace fused_lstm {

// Which path the forward recurrence takes, from the environment variable FUSED_LSTM_PERSISTENT:
//   unset, "" or "0"         Never: always the standard per-step path. The default until a GPU run has
//                            verified the persistent kernel and measured where it wins.
//   "1"                      Always: the persistent kernel; a shape it does not support is an error
//                            (RuntimeError with the reason), never a silent fallback.
//   "auto"                   Auto: the persistent kernel when persistent_supported and
//                            persistent_preferred both say so, else the standard path.
// Anything else is an error. The variable is read on every call (a getenv, negligible next to a layer)
// so that a process, or a test with monkeypatch.setenv, can switch modes at any time.
enum class PersistentMode { Never, Auto, Always };
PersistentMode persistent_mode();

// Whether the persistent kernel can run this direction's recurrence: CUDA tensors of float32, float16 or
// bfloat16; 1 <= N <= 64 batch rows; the device supports cooperative launches; and the plan fits: every
// block's slice of W_hh (with a projection also its slice of W_hr) plus the staged h_{t-1} fit in its shared
// memory with all blocks of the grid (or cluster) co-resident. Projections (proj_size) add a second barrier
// per step. When false and why_not is given, *why_not says why.
bool persistent_supported(const RecurrenceForwardArgs& a, std::string* why_not);

// The Auto decision: a plan exists and the cost model (cost_model.h) predicts the whole direction faster on
// the persistent kernel than on the standard path. A PREDICTION until the model is fitted to a GPU run.
bool persistent_preferred(const RecurrenceForwardArgs& a);

// Keeps cooperative launches made on different streams (the two directions of a layer) one after the other:
// each persistent grid is sized to fill the GPU, and grids that share it are not guaranteed co-resident.
class CooperativeOrder {
 public:
  // Makes the current stream wait for the launch last recorded here, if any.
  void wait_for_previous() {
    if (pending_) last_.block(gpu::current_stream());
  }
  // Marks the launch just enqueued on the current stream.
  void record_launch() {
    last_.record(gpu::current_stream());
    pending_ = true;
  }

 private:
  gpu::Event last_;
  bool pending_ = false;
};

// Runs the recurrence with the persistent kernel on the current stream: same results and side effects as
// the driver's per-step loop (gates, output, h_state, c_state, c_prev_saved, h_prev_saved). TORCH_CHECKs
// that persistent_supported holds. Allocates one small exchange buffer [2, N, Hout] (and with a projection
// [N, H] for h' before W_hr) before the launch; no host synchronisation.
void persistent_recurrence_forward(const RecurrenceForwardArgs& a, CooperativeOrder& order);

// The whole policy in one call, for LayerBackend::recurrence_forward: runs the persistent kernel and
// returns true when the mode says so (Always, or a.required: or throws the reason it cannot; Auto:
// supported and preferred), else returns false so the driver walks the steps itself.
bool persistent_try_forward(const RecurrenceForwardArgs& a, CooperativeOrder& order);

// The same for the backward recurrence (LayerBackend::recurrence_backward): the persistent backward kernel
// fuses each step's pointwise backward with its d_gates @ W_hh product, W_hh on chip; the weight gradients
// stay the driver's GEMMs after the loop; with a projection it also writes the driver's dh_total and h_next
// (RecurrenceBackwardArgs), from which the driver computes grad_w_hr. `required`: the op's recurrence was
// 'persistent'. Same modes and
// the same Auto heuristic as forward; support as for forward, with its own shared-memory plan (the staged
// d_gates are [N, 4H], so it supports a smaller H than forward for the same N).
bool persistent_supported(const RecurrenceBackwardArgs& a, std::string* why_not);
void persistent_recurrence_backward(const RecurrenceBackwardArgs& a, CooperativeOrder& order);
bool persistent_try_backward(const RecurrenceBackwardArgs& a, bool required, CooperativeOrder& order);

// Introspection for tests and benchmarks (also exposed as torch.ops.fused_lstm.persistent_max_hidden and
// torch.ops.fused_lstm.persistent_launches, and under torch.ops.fused_lstm_emu in the emulated build):
//   the largest hidden size H (no projection) the persistent forward (or backward) kernel supports for
//   `batch` rows of `dtype` on CUDA device `device`, or 0 when it supports none;
int64_t persistent_max_hidden(at::ScalarType dtype, int64_t batch, c10::DeviceIndex device, bool backward = false);
//   how many persistent kernels this process has launched (to assert that a test took the path).
int64_t persistent_launches();
// (and torch.ops.fused_lstm.persistent_plan: the plan a shape gets, for tests that walk its branches.)

}  // namespace fused_lstm
