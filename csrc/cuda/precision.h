// Whether float32 products of the CUDA backend may round their inputs to TF32: the cuBLAS products
// (cublas_matmul.cuh) and the persistent kernels' tensor-core variant follow torch's switch for cuDNN RNNs.
#pragma once

#include <ATen/Context.h>
#include <torch/version.h>

namespace fused_lstm {
namespace cuda {

// Whether float32 products may use TF32, decided as torch's cuDNN RNN decides it.
inline bool rnn_allows_tf32() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  // The per-op query torch's cuDNN RNN makes. The argument-less form is deprecated and throws when the
  // conv and RNN settings differ (torch.backends.cudnn.rnn.fp32_precision set on its own).
  return at::globalContext().allowTF32CuDNN(at::Float32Op::RNN);
#else
  return at::globalContext().allowTF32CuDNN();
#endif
}

}  // namespace cuda
}  // namespace fused_lstm
