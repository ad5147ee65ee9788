// The emulated cuBLAS: the part of cuBLAS's API that csrc/cuda/cublas_matmul.cuh calls, with cuBLAS's names,
// types and column-major semantics, computed on the CPU. Declared in namespace fused_lstm so that the CUDA
// sources find it where the real build finds cuBLAS; cudaDataType_t comes from the toolkit's
// library_types.h, as in the real build.
//
// cublasGemmEx checks what cuBLAS checks (sizes >= 0; lda, ldb, ldc at least the rows of the stored
// matrices; supported type combinations) and returns CUBLAS_STATUS_INVALID_VALUE / _NOT_SUPPORTED with
// the reason kept for FUSED_LSTM_BLAS_CHECK to report. Semantics:
//   C = alpha * op(A) @ op(B) + beta * C, alpha / beta of the compute type (float, or double for 64F);
//   beta == 0 never reads C (it may hold NaN);
//   16-bit data are multiplied and summed in float32, the result rounded once to the storage type;
//   CUBLAS_COMPUTE_32F_FAST_TF32, or CUBLAS_COMPUTE_32F under CUBLAS_TF32_TENSOR_OP_MATH, rounds both
//   inputs to TF32 (10 explicit mantissa bits, to nearest) first, as tensor cores do.
#pragma once

#include <library_types.h>

#include <cstdint>
#include <string>

namespace fused_lstm {

struct EmulatedBlasHandle;
using cublasHandle_t = EmulatedBlasHandle*;

// Values as in cublas_api.h.
enum cublasStatus_t { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_INVALID_VALUE = 7, CUBLAS_STATUS_NOT_SUPPORTED = 15 };
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 };
enum cublasMath_t {
  CUBLAS_DEFAULT_MATH = 0,
  CUBLAS_PEDANTIC_MATH = 2,
  CUBLAS_TF32_TENSOR_OP_MATH = 3,
  CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION = 16,
};
enum cublasComputeType_t { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_64F = 70, CUBLAS_COMPUTE_32F_FAST_TF32 = 77 };
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1 };

cublasStatus_t cublasGetMathMode(cublasHandle_t handle, cublasMath_t* mode);
cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode);
cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                            int k, const void* alpha, const void* A, cudaDataType_t Atype, int lda, const void* B,
                            cudaDataType_t Btype, int ldb, const void* beta, void* C, cudaDataType_t Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t algo);

namespace emu {
// The handle of this process's emulated device (one: streams are synchronous here).
cublasHandle_t blas_handle();
// Why the last emulated cuBLAS call on this thread failed.
const std::string& blas_last_error();
// GEMM calls made since the process started (for tests that must see a call site run).
int64_t blas_calls();
}  // namespace emu

}  // namespace fused_lstm
