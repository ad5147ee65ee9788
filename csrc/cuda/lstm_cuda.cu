// CUDA backend of the LSTM layer and cell: the drivers of ../lstm_layer.cpp and ../cell_step.cpp over
//   - cuBLAS products with cuDNN's precision policy (cublas_matmul.cuh) for the layer, ATen's (torch.matmul's
//     policy, as torch.nn.LSTMCell's) for the cell,
//   - the fused pointwise step kernels (pointwise_kernels.cuh),
//   - the two directions of a bidirectional layer on two streams, their steps enqueued alternately.
// Everything is enqueued on the current stream of the input's device (or a side stream ordered after
// it and joined back before returning); nothing in the time loop allocates or synchronises the host.
// Built twice: by nvcc for CUDA tensors, and as host C++ under the CUDA emulator (gpu_runtime.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <exception>

#include "../cell_step.h"
#include "../lstm_layer.h"
#include "cublas_matmul.cuh"
#include "gpu_runtime.h"
#include "persistent/persistent.h"
#include "pointwise_kernels.cuh"

namespace fused_lstm {
namespace {

class CudaBackend final : public LayerBackend {
 public:
  using LayerBackend::LayerBackend;

  void matmul(const Tensor& out, const Tensor& a, const Tensor& b, bool accumulate,
              const Tensor& bias) const override {
    if (precision() == ProductPrecision::Matmul) {  // the cell: ATen's products, as torch.nn.LSTMCell's
      LayerBackend::matmul(out, a, b, accumulate, bias);
      return;
    }
    if (bias.defined()) {  // out = bias + a @ b as a broadcast copy then an accumulating product
      out.copy_(bias.unsqueeze(0).expand_as(out));
      accumulate = true;
    }
    // cuBLAS for every layout the driver produces; ATen (its own cuBLAS path, torch.matmul's TF32
    // policy) only for a layout transposed_operand rejects, which the driver never passes today.
    if (!cuda::cublas_matmul(out, a, b, accumulate)) LayerBackend::matmul(out, a, b, accumulate);
  }

  void step_forward(const StepForwardArgs& args) const override { cuda::launch_step_forward(args); }

  // The persistent kernel when FUSED_LSTM_PERSISTENT asks for it (see persistent/persistent.h), on gates
  // that already hold the input projection (cuBLAS computes it).
  bool recurrence_forward(const RecurrenceForwardArgs& args) const override {
    return args.projected && persistent_try_forward(args, cooperative_order_);
  }
  // The persistent backward kernel under the same switches (the backward op's recurrence, or
  // FUSED_LSTM_PERSISTENT), on the workspace the forward saved.
  bool recurrence_backward(const RecurrenceBackwardArgs& args) const override {
    return persistent_try_backward(args, recurrence() == RecurrencePath::Persistent, cooperative_order_);
  }
  std::string path_name(bool whole_recurrence) const override {
    return whole_recurrence ? "cuda:persistent" : "cuda:standard";
  }

  void step_backward(const StepBackwardArgs& args) const override { cuda::launch_step_backward(args); }

  // Direction 0 runs on the current stream, direction 1 on fused_lstm's side stream of the device, and the
  // host enqueues their steps alternately, so the two recurrences (each a chain of small dependent launches)
  // overlap on the GPU even when the host is what limits them: enqueued one direction after the other, the
  // side stream would get its first step only once the host had enqueued all of direction 0's.
  //
  //   host:    P0 P1 S0(0) S1(0) S0(1) S1(1) ... S0(T-1) S1(T-1) E0 E1   (P prologue, S(i) step i, E epilogue)
  //   current: --[ready]-- P0 -- S0(0) -- S0(1) -- ... -- E0 .............. wait(done) --> later work
  //   side:        wait(ready) -- P1 -- S1(0) -- S1(1) -- ... -- E1 -- [done] --'
  //
  // A direction whose whole recurrence a hook ran (the persistent kernel) has no steps; the other's then
  // simply follow one another. Memory: every tensor a pass writes, and every input it reads, is allocated
  // by the driver on the current stream before this call and is released only after it returns, i.e. after
  // the current stream has been made to wait for the side stream; so no block is freed while the side
  // stream may still use it and no record_stream is needed. Temporaries direction 1 creates itself (the
  // b_ih + b_hh sum; in inference, its gates buffer) are allocated while the side stream is current, so the
  // caching allocator hands their blocks on only to later work of that stream. Under CUDA graph capture the
  // event record/wait pair forks the side stream into the capture and joins it back, so it is captured as
  // two parallel branches. Persistent kernels of the two directions are kept apart by cooperative_order_,
  // not by giving up the second stream: everything else still overlaps.
  void for_each_direction(c10::ArrayRef<DirectionPass*> passes) const override {
    if (passes.size() < 2) {
      LayerBackend::for_each_direction(passes);
      return;
    }
    TORCH_CHECK(passes.size() == 2, "fused_lstm: expected 1 or 2 directions, got ", passes.size());
    DirectionPass& direction0 = *passes[0];
    DirectionPass& direction1 = *passes[1];
    const gpu::Stream current = gpu::current_stream();
    const gpu::Stream side = gpu::side_stream(current.device_index());
    const auto on_side = [&side](const auto& work) {
      const gpu::StreamGuard guard(side);  // cuBLAS and ATen ops inside go to the side stream
      work();
    };
    gpu::Event inputs_ready, side_done;
    inputs_ready.record(current);
    inputs_ready.block(side);
    // Join the side stream back even if a pass throws half-way: its enqueued work may use tensors the
    // unwinding frees.
    auto join = [&] {
      side_done.record(side);
      side_done.block(current);
    };
    try {
      const int64_t steps0 = direction0.prologue();
      int64_t steps1 = 0;
      on_side([&] { steps1 = direction1.prologue(); });
      for (int64_t i = 0; i < std::max(steps0, steps1); ++i) {
        if (i < steps0) direction0.step(i);
        if (i < steps1) on_side([&] { direction1.step(i); });
      }
      direction0.epilogue();
      on_side([&] { direction1.epilogue(); });
    } catch (...) {
      join();
      throw;
    }
    join();
  }

 private:
  // Two cooperative launches, each sized to fill the GPU, must not run side by side (a grid is only
  // guaranteed co-resident when it has the device to itself): the second waits for the first.
  mutable CooperativeOrder cooperative_order_;
};

}  // namespace

TORCH_LIBRARY_IMPL(FUSED_LSTM_GPU_OPS, FUSED_LSTM_GPU_DISPATCH, m) {
  m.impl("lstm_layer", &LayerOps<CudaBackend, gpu::DeviceGuard>::forward);
  m.impl("lstm_layer_backward", &LayerOps<CudaBackend, gpu::DeviceGuard>::backward);
  m.impl("lstm_cell", &CellOps<CudaBackend, gpu::DeviceGuard>::forward);
  m.impl("lstm_cell_backward", &CellOps<CudaBackend, gpu::DeviceGuard>::backward);
}

}  // namespace fused_lstm
