// CUDA backend of the LSTM layer and cell: the drivers of ../lstm_layer.cpp and ../cell_step.cpp over
//   - cuBLAS products with cuDNN's precision policy (cublas_matmul.cuh) for the layer, ATen's (torch.matmul's
//     policy, as torch.nn.LSTMCell's) for the cell,
//   - the fused pointwise step kernels (pointwise_kernels.cuh),
//   - the two directions of a bidirectional layer on two streams.
// Everything is enqueued on the current stream of the input's device (or a side stream ordered after
// it and joined back before returning); nothing in the time loop allocates or synchronises the host.
// Built twice: by nvcc for CUDA tensors, and as host C++ under the CUDA emulator (gpu_runtime.h).
#include <ATen/ATen.h>
#include <torch/library.h>

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
  std::string path_name(bool whole_recurrence) const override {
    return whole_recurrence ? "cuda:persistent" : "cuda:standard";
  }

  void step_backward(const StepBackwardArgs& args) const override { cuda::launch_step_backward(args); }

  // Direction 0 runs on the current stream, direction 1 on fused_lstm's side stream of the device, so the
  // two recurrences (each a chain of small dependent launches) overlap on the GPU:
  //
  //   current: --[ready]-- fn(0) ......................... wait(done) --> later work
  //   side:          wait(ready) -- fn(1) -- [done] ------'
  //
  // Memory: every tensor fn writes, and every input it reads, is allocated by the driver on the current
  // stream before this call and is released only after it returns, i.e. after the current stream has been
  // made to wait for the side stream; so no block is freed while the side stream may still use it and no
  // record_stream is needed. Temporaries fn(1) creates itself (e.g. the b_ih + b_hh sum) are allocated
  // on, used on and freed on the side stream. Under CUDA graph capture the event record/wait pair forks
  // the side stream into the capture and joins it back, so it is captured as two parallel branches.
  // Persistent kernels of the two directions are kept apart by cooperative_order_, not by giving up the
  // second stream: everything else still overlaps.
  void for_each_direction(int64_t directions, const std::function<void(int64_t)>& fn) const override {
    if (directions < 2) {
      for (int64_t d = 0; d < directions; ++d) fn(d);
      return;
    }
    TORCH_CHECK(directions == 2, "fused_lstm: expected 1 or 2 directions, got ", directions);
    const gpu::Stream current = gpu::current_stream();
    const gpu::Stream side = gpu::side_stream(current.device_index());
    gpu::Event inputs_ready, side_done;
    inputs_ready.record(current);
    inputs_ready.block(side);
    // Join the side stream back even if fn throws half-way: its enqueued work may use tensors the
    // unwinding frees.
    auto join = [&] {
      side_done.record(side);
      side_done.block(current);
    };
    try {
      fn(0);
      const gpu::StreamGuard on_side(side);  // cuBLAS and ATen ops inside fn(1) go to it
      fn(1);
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
