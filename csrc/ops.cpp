// Op schemas of the fused_lstm library and the Python module fused_lstm._C.
// Each backend registers its own kernels (csrc/cpu/, csrc/cuda/), so the CPU path is the same op on
// another device.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/cpu_features.h"
#include "cpu/cpu_plan_bindings.h"
#include "cpu/recycled_gradients.h"
#include "lstm_layer.h"
#include "op_schemas.h"

namespace fused_lstm {

TORCH_LIBRARY(fused_lstm, m) { define_ops(m); }

}  // namespace fused_lstm

#ifndef FUSED_LSTM_CUDA_ARCHS
#define FUSED_LSTM_CUDA_ARCHS ""
#endif
#ifndef FUSED_LSTM_TORCH_VERSION
#define FUSED_LSTM_TORCH_VERSION ""
#endif
#ifndef FUSED_LSTM_CUDA_VERSION
#define FUSED_LSTM_CUDA_VERSION ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_lstm C++/CUDA kernels; the ops are registered under torch.ops.fused_lstm";
  m.def("last_path", &fused_lstm::last_forward_path,
        "The path the last forward op call (layer or cell) on this thread took, e.g. 'cuda:standard'");
  // The CPU planner: cpu_machine, cpu_kernel_limits, cpu_plan_* (csrc/cpu/cpu_plan_bindings.cpp).
  fused_lstm::register_cpu_plan_bindings(m);
  m.def("build_info", [] {
    pybind11::dict info;
#ifdef FUSED_LSTM_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cuda_archs"] = FUSED_LSTM_CUDA_ARCHS;
    info["cuda_version"] = FUSED_LSTM_CUDA_VERSION;
    info["torch_version"] = FUSED_LSTM_TORCH_VERSION;
    info["compiler"] = __VERSION__;
    // Which CPU float32 kernels this process runs (csrc/cpu/cpu_features.h).
    info["cpu_kernels"] = fused_lstm::cpu_kernels_name(fused_lstm::cpu_kernels());
    info["cpu_kernels_supported"] = fused_lstm::cpu_kernels_name(fused_lstm::supported_cpu_kernels());
    info["cpu_bf16_kernels"] = fused_lstm::cpu_bf16_kernels_name(fused_lstm::cpu_bf16_kernels());
    return info;
  });
  m.def(
      "_set_cpu_kernels",
      [](const std::string& name) {
        const auto previous = fused_lstm::set_cpu_kernels(fused_lstm::cpu_kernels_from_name(name.c_str()));
        return std::string(fused_lstm::cpu_kernels_name(previous));
      },
      pybind11::arg("name"),
      "Selects the CPU float32 kernels: 'avx512', 'avx2' or 'aten' (csrc/cpu/cpu_features.h), any this CPU "
      "supports; returns the previous selection. For tests and measurements: the best supported set is "
      "selected at import.");
  m.def("_supported_cpu_kernels", &fused_lstm::supported_cpu_kernel_names,
        "The CPU float32 kernel sets this CPU can run, for _set_cpu_kernels.");
  m.def("_kept_gradient_blocks", &fused_lstm::kept_gradient_blocks,
        "How many freed weight-gradient blocks the CPU keeps now for later steps of a backward pass "
        "(csrc/cpu/recycled_gradients.h); 0 outside a backward pass.");
}
