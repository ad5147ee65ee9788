// out = a @ b (or out += a @ b) for the LSTM driver, straight through cuBLAS so the precision policy is
// cuDNN's rather than torch.matmul's:
//   float32:         TF32 tensor cores when torch allows TF32 for cuDNN RNNs (torch.backends.cudnn.allow_tf32,
//                    or torch.backends.cudnn.rnn.fp32_precision = "tf32"; the default), strict FP32 otherwise
//   float16/bfloat16: FP32 accumulation, reduced-precision split-K reductions disallowed
//   float64:         FP64
// Uses torch's cuBLAS handle for the current device and stream (it carries torch's per-stream workspace),
// so nothing is allocated here and everything is ordered on the current stream. Every GEMM of the CUDA
// backend goes through cublas_matmul's one cublasGemmEx call, which the emulated build runs on the CPU
// with cuBLAS's exact semantics (csrc/emu/blas.h).
//
// Included by lstm_cuda.cu only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

#include "gpu_runtime.h"
#include "precision.h"

namespace fused_lstm {
namespace cuda {

// How cuBLAS (column-major) addresses the transpose of a 2-D tensor t [r, c] indexed row-major.
struct BlasOperand {
  cublasOperation_t op;  // applied by cuBLAS to the stored matrix to obtain t^T
  int64_t ld;            // leading dimension of the stored matrix
};

// t is row-major (unit column stride): t^T is the column-major c x r matrix at the same address with
// leading dimension stride(0); op N. t is column-major (unit row stride, e.g. x.t() of a contiguous x):
// t itself is the column-major r x c matrix with leading dimension stride(1); op T turns it into t^T.
// Strides of size-1 dimensions are meaningless, so they are ignored (and ld set to its minimum).
// Anything else (general strides, overlapping rows) has no cuBLAS form: nullopt.
// Requires r, c >= 1.
inline std::optional<BlasOperand> transposed_operand(const at::Tensor& t) {
  const int64_t r = t.size(0), c = t.size(1), s0 = t.stride(0), s1 = t.stride(1);
  if ((c == 1 || s1 == 1) && (r == 1 || s0 >= c)) return BlasOperand{CUBLAS_OP_N, r == 1 ? c : s0};
  if ((r == 1 || s0 == 1) && (c == 1 || s1 >= r)) return BlasOperand{CUBLAS_OP_T, c == 1 ? r : s1};
  return std::nullopt;
}

struct BlasTypes {
  cudaDataType_t data;
  cublasComputeType_t compute;
  bool reduced_precision_input;  // fp16 / bf16: forbid reduced-precision reductions
};

inline std::optional<BlasTypes> blas_types(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return BlasTypes{CUDA_R_32F, rnn_allows_tf32() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F, false};
    case at::kDouble:
      return BlasTypes{CUDA_R_64F, CUBLAS_COMPUTE_64F, false};
    case at::kHalf:
      return BlasTypes{CUDA_R_16F, CUBLAS_COMPUTE_32F, true};
    case at::kBFloat16:
      return BlasTypes{CUDA_R_16BF, CUBLAS_COMPUTE_32F, true};
    default:
      return std::nullopt;
  }
}

// Sets the handle's math mode for one call and puts the previous one back (torch also resets it on
// every getCurrentCUDABlasHandle(), but a guard keeps this call from leaking state either way).
class MathModeGuard {
 public:
  MathModeGuard(cublasHandle_t handle, cublasMath_t mode) : handle_(handle) {
    FUSED_LSTM_BLAS_CHECK(cublasGetMathMode(handle_, &previous_));
    FUSED_LSTM_BLAS_CHECK(cublasSetMathMode(handle_, mode));
  }
  ~MathModeGuard() { cublasSetMathMode(handle_, previous_); }  // no throw from a destructor
  MathModeGuard(const MathModeGuard&) = delete;
  MathModeGuard& operator=(const MathModeGuard&) = delete;

 private:
  cublasHandle_t handle_;
  cublasMath_t previous_ = CUBLAS_DEFAULT_MATH;
};

inline bool fits_int(int64_t v) { return v >= 0 && v <= std::numeric_limits<int>::max(); }

// out [m, n] = a [m, k] @ b [k, n] (+ out when accumulate), enqueued on the current stream.
// out: row-major rows (unit column stride; any row stride >= n, e.g. a row-narrowed view of a contiguous
//      tensor); a, b: row-major or column-major (transposed views), see transposed_operand.
// Returns false, having done nothing, for a layout or dtype it does not handle (the caller falls back to
// ATen); zero-size products are handled here (k == 0 without accumulate zeroes out).
//
// cuBLAS is column-major, so it computes the transposed identity out^T [n, m] = b^T [n, k] @ a^T [k, m]:
// the row-major out is the column-major out^T with ld = out.stride(0), and likewise for a and b.
inline bool cublas_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (out.dim() != 2 || a.dim() != 2 || b.dim() != 2) return false;
  const at::ScalarType dtype = out.scalar_type();
  if (a.scalar_type() != dtype || b.scalar_type() != dtype) return false;
  if (!gpu::on_device(out) || a.device() != out.device() || b.device() != out.device()) return false;
  if (out.is_conj() || a.is_conj() || b.is_conj() || out.is_neg() || a.is_neg() || b.is_neg()) return false;
  const std::optional<BlasTypes> types = blas_types(dtype);
  if (!types) return false;
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  TORCH_CHECK(b.size(0) == k && out.size(0) == m && out.size(1) == n, "fused_lstm: matmul shapes ",
              out.sizes(), " = ", a.sizes(), " @ ", b.sizes(), " do not match");

  if (m == 0 || n == 0) return true;
  if (k == 0) {
    if (!accumulate) out.zero_();
    return true;
  }
  const std::optional<BlasOperand> out_t = transposed_operand(out);
  const std::optional<BlasOperand> a_t = transposed_operand(a);
  const std::optional<BlasOperand> b_t = transposed_operand(b);
  // The result cannot be transposed by cuBLAS: out must be row-major.
  if (!out_t || out_t->op != CUBLAS_OP_N || !a_t || !b_t) return false;
  if (!fits_int(m) || !fits_int(n) || !fits_int(k) || !fits_int(out_t->ld) || !fits_int(a_t->ld) ||
      !fits_int(b_t->ld)) {
    return false;
  }

  cublasHandle_t handle = gpu::blas_handle();  // bound to the current stream
  cublasMath_t mode = CUBLAS_DEFAULT_MATH;
  if (types->reduced_precision_input) {
    // cuDNN accumulates fp16/bf16 RNN products in fp32 throughout; forbid cuBLAS's reduced-precision
    // split-K reductions, whatever torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction says.
    mode = static_cast<cublasMath_t>(mode | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
  }
  const MathModeGuard math_mode(handle, mode);
  const float alpha_f = 1.0f, beta_f = accumulate ? 1.0f : 0.0f;
  const double alpha_d = 1.0, beta_d = accumulate ? 1.0 : 0.0;
  const bool fp64 = types->compute == CUBLAS_COMPUTE_64F;
  // beta == 0 means cuBLAS never reads out, so uninitialised (even NaN) memory is fine.
  FUSED_LSTM_BLAS_CHECK(cublasGemmEx(
      handle, b_t->op, a_t->op, static_cast<int>(n), static_cast<int>(m), static_cast<int>(k),
      fp64 ? static_cast<const void*>(&alpha_d) : static_cast<const void*>(&alpha_f),
      b.const_data_ptr(), types->data, static_cast<int>(b_t->ld),
      a.const_data_ptr(), types->data, static_cast<int>(a_t->ld),
      fp64 ? static_cast<const void*>(&beta_d) : static_cast<const void*>(&beta_f),
      out.data_ptr(), types->data, static_cast<int>(out_t->ld), types->compute, CUBLAS_GEMM_DEFAULT));
  return true;
}

}  // namespace cuda
}  // namespace fused_lstm
