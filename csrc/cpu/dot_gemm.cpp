#include "dot_gemm.h"

namespace fused_lstm {
namespace {

struct DotBlock {
  template <typename Isa>
  FUSED_LSTM_ALWAYS_INLINE static void run(const float* a, int64_t a_row_stride, const float* w, int64_t w_row_stride,
                                           int64_t K, float* out, int64_t out_row_stride, bool accumulate,
                                           const float* bias, int64_t rows, int64_t cols) {
    dot_block<Isa>(a, a_row_stride, w, w_row_stride, K, out, out_row_stride, accumulate, bias, rows, cols);
  }
};

}  // namespace

void dot_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& w, bool accumulate,
                const at::Tensor& bias) {
  const int64_t M = a.size(0), Nc = w.size(0), K = a.size(1);
  if (M == 0 || Nc == 0) return;
  const float* bias_ptr = bias.defined() && !accumulate ? bias.data_ptr<float>() : nullptr;
  const float* a_ptr = a.data_ptr<float>();
  const float* w_ptr = w.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  const int64_t a_rs = a.stride(0), w_rs = w.stride(0), out_rs = out.stride(0);
  for_each_dot_block(M, K, Nc, [&](int64_t r0, int64_t c0, int64_t rows, int64_t cols) {
    run_kernel<DotBlock>(a_ptr + r0 * a_rs, a_rs, w_ptr + c0 * w_rs, w_rs, K, out_ptr + r0 * out_rs + c0, out_rs,
                         accumulate, bias_ptr ? bias_ptr + c0 : nullptr, rows, cols);
  });
}

}  // namespace fused_lstm
