// Autocast kernels of the layer and cell ops, for eager mode and for what torch.compile and torch.export trace.
// Under torch.autocast every floating-point tensor argument on the autocast
// device but float64 (input, states, weights: whatever mix of float32 and 16-bit) is cast to
// torch.get_autocast_dtype(device), then the op runs with autocast off, as torch.nn.LSTM's ops do.
//
// The casts go through at::autocast::cached_cast, torch's own: a float32 leaf that requires grad (a module's
// weight) is cast once per autocast region and reused, and autograd still carries its gradient back to the
// float32 leaf. A loop of LSTMCell steps therefore casts W_ih and W_hh once, not every step: an uncached cast
// of both at H=512 costs about as much as the bfloat16 step itself.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

namespace fused_lstm {
namespace {

template <c10::DeviceType kDevice>
void run_in_autocast_dtype(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  const size_t num_arguments = op.schema().arguments().size();
  for (auto argument = stack->end() - static_cast<std::ptrdiff_t>(num_arguments); argument != stack->end();
       ++argument) {
    if (argument->isTensor()) {
      *argument = at::autocast::cached_cast(dtype, argument->toTensor(), kDevice);
    } else if (argument->isTensorList()) {
      c10::List<at::Tensor> cast;  // a new list: the caller's must keep its tensors
      for (const at::Tensor& tensor : argument->toTensorList().vec()) {
        cast.push_back(at::autocast::cached_cast(dtype, tensor, kDevice));
      }
      *argument = std::move(cast);
    }
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  op.callBoxed(stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, AutocastCPU, m) {
  m.impl("lstm_layer", torch::CppFunction::makeFromBoxedFunction<&run_in_autocast_dtype<c10::DeviceType::CPU>>());
  m.impl("lstm_cell", torch::CppFunction::makeFromBoxedFunction<&run_in_autocast_dtype<c10::DeviceType::CPU>>());
}

TORCH_LIBRARY_IMPL(fused_lstm, AutocastCUDA, m) {
  m.impl("lstm_layer", torch::CppFunction::makeFromBoxedFunction<&run_in_autocast_dtype<c10::DeviceType::CUDA>>());
  m.impl("lstm_cell", torch::CppFunction::makeFromBoxedFunction<&run_in_autocast_dtype<c10::DeviceType::CUDA>>());
}

}  // namespace fused_lstm
