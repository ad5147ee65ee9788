// The emulated cuBLAS (see blas.h).
#include "blas.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace fused_lstm {

struct EmulatedBlasHandle {
  cublasMath_t math_mode = CUBLAS_DEFAULT_MATH;
};

namespace emu {
namespace {
thread_local std::string last_error;
int64_t calls = 0;

cublasStatus_t reject(cublasStatus_t status, std::string reason) {
  last_error = std::move(reason);
  return status;
}

// float32 -> TF32: keep 10 mantissa bits, rounding to nearest (ties away from zero, as cvt.rna.tf32.f32).
float to_tf32(float x) {
  if (!std::isfinite(x)) return x;
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits = (bits + 0x1000u) & 0xFFFFE000u;
  std::memcpy(&x, &bits, 4);
  return x;
}

template <typename T>
double load(const void* base, int64_t index) {
  return static_cast<double>(static_cast<const T*>(base)[index]);
}

double load_as(cudaDataType_t type, const void* base, int64_t index) {
  switch (type) {
    case CUDA_R_32F:
      return load<float>(base, index);
    case CUDA_R_64F:
      return load<double>(base, index);
    case CUDA_R_16F:
      return static_cast<float>(static_cast<const c10::Half*>(base)[index]);
    default:
      return static_cast<float>(static_cast<const c10::BFloat16*>(base)[index]);
  }
}

void store_as(cudaDataType_t type, void* base, int64_t index, double value) {
  switch (type) {
    case CUDA_R_32F:
      static_cast<float*>(base)[index] = static_cast<float>(value);
      break;
    case CUDA_R_64F:
      static_cast<double*>(base)[index] = value;
      break;
    case CUDA_R_16F:
      static_cast<c10::Half*>(base)[index] = static_cast<c10::Half>(static_cast<float>(value));
      break;
    default:
      static_cast<c10::BFloat16*>(base)[index] = static_cast<c10::BFloat16>(static_cast<float>(value));
      break;
  }
}
}  // namespace

cublasHandle_t blas_handle() {
  thread_local EmulatedBlasHandle handle;
  return &handle;
}
const std::string& blas_last_error() { return last_error; }
int64_t blas_calls() { return calls; }
}  // namespace emu

cublasStatus_t cublasGetMathMode(cublasHandle_t handle, cublasMath_t* mode) {
  if (handle == nullptr || mode == nullptr) return emu::reject(CUBLAS_STATUS_INVALID_VALUE, "null handle or mode");
  *mode = handle->math_mode;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
  if (handle == nullptr) return emu::reject(CUBLAS_STATUS_INVALID_VALUE, "null handle");
  handle->math_mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                            int k, const void* alpha, const void* A, cudaDataType_t Atype, int lda, const void* B,
                            cudaDataType_t Btype, int ldb, const void* beta, void* C, cudaDataType_t Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
  using emu::load_as;
  using emu::reject;
  using emu::store_as;
  using emu::to_tf32;
  ++emu::calls;
  if (handle == nullptr) return reject(CUBLAS_STATUS_INVALID_VALUE, "null handle");
  if (algo != CUBLAS_GEMM_DEFAULT) return reject(CUBLAS_STATUS_NOT_SUPPORTED, "only CUBLAS_GEMM_DEFAULT is emulated");
  if ((transa != CUBLAS_OP_N && transa != CUBLAS_OP_T) || (transb != CUBLAS_OP_N && transb != CUBLAS_OP_T)) {
    return reject(CUBLAS_STATUS_INVALID_VALUE, "transa / transb must be N or T for real types");
  }
  if (m < 0 || n < 0 || k < 0) return reject(CUBLAS_STATUS_INVALID_VALUE, "negative m, n or k");
  // Stored shapes (column-major): A is m x k (N) or k x m (T); B is k x n (N) or n x k (T).
  const int a_rows = transa == CUBLAS_OP_N ? m : k, b_rows = transb == CUBLAS_OP_N ? k : n;
  if (lda < std::max(1, a_rows)) {
    return reject(CUBLAS_STATUS_INVALID_VALUE, "lda " + std::to_string(lda) + " < " + std::to_string(a_rows) +
                                                   " rows of the stored A");
  }
  if (ldb < std::max(1, b_rows)) {
    return reject(CUBLAS_STATUS_INVALID_VALUE, "ldb " + std::to_string(ldb) + " < " + std::to_string(b_rows) +
                                                   " rows of the stored B");
  }
  if (ldc < std::max(1, m)) {
    return reject(CUBLAS_STATUS_INVALID_VALUE, "ldc " + std::to_string(ldc) + " < m = " + std::to_string(m));
  }
  if (Atype != Btype || Atype != Ctype) return reject(CUBLAS_STATUS_NOT_SUPPORTED, "mixed A, B, C types");
  const bool fp64 = computeType == CUBLAS_COMPUTE_64F;
  if (fp64 != (Atype == CUDA_R_64F)) return reject(CUBLAS_STATUS_NOT_SUPPORTED, "64F compute needs 64F data and back");
  if (Atype != CUDA_R_32F && Atype != CUDA_R_64F && Atype != CUDA_R_16F && Atype != CUDA_R_16BF) {
    return reject(CUBLAS_STATUS_NOT_SUPPORTED, "data type not emulated");
  }
  if (computeType == CUBLAS_COMPUTE_32F_FAST_TF32 && Atype != CUDA_R_32F) {
    return reject(CUBLAS_STATUS_NOT_SUPPORTED, "FAST_TF32 compute with non-float32 data");
  }
  if (alpha == nullptr || beta == nullptr) return reject(CUBLAS_STATUS_INVALID_VALUE, "null alpha or beta");
  const double alpha_v = fp64 ? *static_cast<const double*>(alpha) : *static_cast<const float*>(alpha);
  const double beta_v = fp64 ? *static_cast<const double*>(beta) : *static_cast<const float*>(beta);
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  const bool tf32 = Atype == CUDA_R_32F && (computeType == CUBLAS_COMPUTE_32F_FAST_TF32 ||
                                            (handle->math_mode & 0xf) == CUBLAS_TF32_TENSOR_OP_MATH);

  std::vector<double> a_row(static_cast<size_t>(k));
  for (int i = 0; i < m; ++i) {
    for (int p = 0; p < k; ++p) {
      // op(A)[i, p]
      const int64_t index = transa == CUBLAS_OP_N ? i + static_cast<int64_t>(p) * lda : p + static_cast<int64_t>(i) * lda;
      const double v = load_as(Atype, A, index);
      a_row[p] = tf32 ? to_tf32(static_cast<float>(v)) : v;
    }
    for (int j = 0; j < n; ++j) {
      double sum_d = 0.0;
      float sum_f = 0.0f;
      for (int p = 0; p < k; ++p) {
        const int64_t index = transb == CUBLAS_OP_N ? p + static_cast<int64_t>(j) * ldb : j + static_cast<int64_t>(p) * ldb;
        double b = load_as(Btype, B, index);
        if (tf32) b = to_tf32(static_cast<float>(b));
        if (fp64) {
          sum_d += a_row[p] * b;
        } else {
          sum_f = std::fma(static_cast<float>(a_row[p]), static_cast<float>(b), sum_f);
        }
      }
      const int64_t c_index = i + static_cast<int64_t>(j) * ldc;
      double result;
      if (fp64) {
        result = alpha_v * sum_d + (beta_v != 0.0 ? beta_v * load_as(Ctype, C, c_index) : 0.0);
      } else {
        float r = static_cast<float>(alpha_v) * sum_f;
        if (beta_v != 0.0) r += static_cast<float>(beta_v) * static_cast<float>(load_as(Ctype, C, c_index));
        result = r;
      }
      store_as(Ctype, C, c_index, result);
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace fused_lstm
