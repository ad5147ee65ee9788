// Float32 products against a matrix held with its reduction index contiguous, as nn.LSTM holds its weights
// (W [4H, K], each row one gate unit's weights): out = a @ W^T. The kernel runs along k in vectors and
// reduces each accumulator at the end, so it reads W in place. Packing W for the broadcast kernel
// (packed_gemm.h) reads and writes all of W once per call, which costs more than it saves when few rows
// use it (the planner decides which, cpu_plan.h).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>

#include "cpu_limits.h"
#include "cpu_plan.h"
#include "simd.h"

namespace fused_lstm {

constexpr int kDotCols = 4;  // rows of W (output columns) per tile, by Isa::kDotRows rows of a

// fn(r0, c0, rows, cols) over the blocks of out[M, Nc] that the in-place dot kernels (float32 here, bfloat16 in
// bf16_dot_gemm.cpp) compute, kDotBlock rows x columns each so that a block's share of a and of W stays in L2,
// with the planner's thread split (cpu_plan.h, plan_dot_product: small products stay on fewer threads, waking one
// costs a few µs). fn calls a kernel built for its instruction set (run_kernel, or a target-built block function):
// a lambda's own body is compiled for the baseline ISA.
template <typename Fn>
void for_each_dot_block(int64_t M, int64_t K, int64_t Nc, const Fn& fn) {
  constexpr int64_t kBlock = cpu_limits::kDotBlock;
  const int64_t col_blocks = (Nc + kBlock - 1) / kBlock;
  const cpu_plan::TaskGrid grid = cpu_plan::plan_dot_product(M, K, Nc);
  at::parallel_for(0, grid.tasks, grid.grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r0 = task / col_blocks * kBlock, c0 = task % col_blocks * kBlock;
      fn(r0, c0, std::min(kBlock, M - r0), std::min(kBlock, Nc - c0));
    }
  });
}

// Rows x Cols outputs: out[r * out_row_stride + c] (+)= bias[c] + sum_k a[r * a_row_stride + k] * w[c * w_row_stride + k]
// for r < Rows, c < Cols; bias may be null, and is ignored when accumulating. a and w have unit stride along k.
template <typename Isa, int Rows, int Cols>
FUSED_LSTM_ALWAYS_INLINE void dot_tile(const float* a, int64_t a_row_stride, const float* w, int64_t w_row_stride,
                                       int64_t K, float* out, int64_t out_row_stride, bool accumulate,
                                       const float* bias) {
  constexpr int L = Isa::kLanes;
  vec<L> acc[Rows][Cols] = {};
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    vec<L> wv[Cols];
    for (int c = 0; c < Cols; ++c) wv[c] = load<L>(w + c * w_row_stride + k);
    for (int r = 0; r < Rows; ++r) {
      const vec<L> av = load<L>(a + r * a_row_stride + k);
      for (int c = 0; c < Cols; ++c) acc[r][c] += av * wv[c];
    }
  }
  if (k < K) {
    for (int r = 0; r < Rows; ++r) {
      const vec<L> av = load_partial<L>(a + r * a_row_stride + k, K - k);
      for (int c = 0; c < Cols; ++c) acc[r][c] += av * load_partial<L>(w + c * w_row_stride + k, K - k);
    }
  }
  for (int r = 0; r < Rows; ++r) {
    float* o = out + r * out_row_stride;
    if constexpr (Cols == 4) {
      vec4 sums = reduce_add4<L>(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
      if (accumulate || bias) {
        vec4 previous;
        std::memcpy(&previous, accumulate ? o : bias, sizeof(previous));
        sums += previous;
      }
      std::memcpy(o, &sums, sizeof(sums));
    } else {
      for (int c = 0; c < Cols; ++c) {
        const float sum = reduce_add4<L>(acc[r][c], vec<L>{}, vec<L>{}, vec<L>{})[0];
        o[c] = sum + (accumulate ? o[c] : bias ? bias[c] : 0.0f);
      }
    }
  }
}

// The last `rest` (< Isa::kDotRows) rows with a tile of exactly that many rows.
template <typename Isa, int Rows, int Cols>
FUSED_LSTM_ALWAYS_INLINE void dot_tile_rest(const float* a, int64_t a_row_stride, const float* w, int64_t w_row_stride,
                                            int64_t K, float* out, int64_t out_row_stride, bool accumulate,
                                            const float* bias, int64_t rest) {
  if constexpr (Rows > 0) {
    if (rest == Rows) {
      dot_tile<Isa, Rows, Cols>(a, a_row_stride, w, w_row_stride, K, out, out_row_stride, accumulate, bias);
    } else {
      dot_tile_rest<Isa, Rows - 1, Cols>(a, a_row_stride, w, w_row_stride, K, out, out_row_stride, accumulate, bias,
                                         rest);
    }
  }
}

// dot_tile<.., Cols> over `rows` rows in tiles of Isa::kDotRows (the remainder with a smaller tile).
template <typename Isa, int Cols>
FUSED_LSTM_ALWAYS_INLINE void dot_rows(const float* a, int64_t a_row_stride, const float* w, int64_t w_row_stride,
                                       int64_t K, float* out, int64_t out_row_stride, bool accumulate,
                                       const float* bias, int64_t rows) {
  constexpr int kRows = Isa::kDotRows;
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) {
    dot_tile<Isa, kRows, Cols>(a + r * a_row_stride, a_row_stride, w, w_row_stride, K, out + r * out_row_stride,
                               out_row_stride, accumulate, bias);
  }
  dot_tile_rest<Isa, kRows - 1, Cols>(a + r * a_row_stride, a_row_stride, w, w_row_stride, K, out + r * out_row_stride,
                                      out_row_stride, accumulate, bias, rows - r);
}

// A rows x cols block in tiles of Isa::kDotRows x kDotCols (smaller at the edges). Each W tile (kDotCols rows of
// W) stays in L1 while every row tile of a passes over it. (No lambdas here: a lambda's body would be
// compiled for the baseline ISA, not the calling kernel's.)
template <typename Isa>
FUSED_LSTM_ALWAYS_INLINE void dot_block(const float* a, int64_t a_row_stride, const float* w, int64_t w_row_stride,
                                        int64_t K, float* out, int64_t out_row_stride, bool accumulate,
                                        const float* bias, int64_t rows, int64_t cols) {
  int64_t c = 0;
  for (; c + kDotCols <= cols; c += kDotCols) {
    dot_rows<Isa, kDotCols>(a, a_row_stride, w + c * w_row_stride, w_row_stride, K, out + c, out_row_stride, accumulate,
                       bias ? bias + c : nullptr, rows);
  }
  for (; c < cols; ++c) {
    dot_rows<Isa, 1>(a, a_row_stride, w + c * w_row_stride, w_row_stride, K, out + c, out_row_stride, accumulate,
                bias ? bias + c : nullptr, rows);
  }
}

// out[M, Nc] (accumulate ? += : =) a[M, K] @ w[Nc, K]^T (+ bias [Nc] when defined and not accumulating), in
// parallel over blocks of rows and columns. out, a and w have unit stride along their last dimension.
void dot_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& w, bool accumulate,
                const at::Tensor& bias);

}  // namespace fused_lstm
