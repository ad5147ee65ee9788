#include "dot_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu_limits.h"
#include "cpu_plan.h"

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
  // Blocks of kBlock rows x columns, each block's share of a and of w in L2 (cpu_limits.h, cpu_plan.h).
  constexpr int64_t kBlock = cpu_limits::kDotBlock;
  const int64_t col_blocks = (Nc + kBlock - 1) / kBlock;
  const float* a_ptr = a.data_ptr<float>();
  const float* w_ptr = w.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  const int64_t a_rs = a.stride(0), w_rs = w.stride(0), out_rs = out.stride(0);
  // Small products (one time step of a small batch) stay on fewer threads: waking one costs a few µs.
  const cpu_plan::TaskGrid grid = cpu_plan::plan_dot_product(M, K, Nc);
  at::parallel_for(0, grid.tasks, grid.grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rb = task / col_blocks, cb = task % col_blocks;
      const int64_t r0 = rb * kBlock, c0 = cb * kBlock;
      run_kernel<DotBlock>(a_ptr + r0 * a_rs, a_rs, w_ptr + c0 * w_rs, w_rs, K, out_ptr + r0 * out_rs + c0, out_rs,
                           accumulate, bias_ptr ? bias_ptr + c0 : nullptr, std::min(kBlock, M - r0),
                           std::min(kBlock, Nc - c0));
    }
  });
}

}  // namespace fused_lstm
