// bfloat16 products of few rows (csrc/cpu/bf16_dot_gemm.cpp), first against a matrix held with its reduction index contiguous (W [Nc, K], as nn.LSTM holds its
// weights): out = a @ W^T, W read in place, as dot_gemm.h does for float32. Under autocast a cell step's
// products have a handful of rows, and ATen's bfloat16 addmm costs ~30 µs a call there (oneDNN reorders W every
// call); vdpbf16ps over contiguous k pairs needs no reorder. The planner picks it (cpu_plan.h, plan_product).
#pragma once

#include <ATen/core/Tensor.h>

namespace fused_lstm {

// out[M, Nc] (accumulate ? += : =) a[M, K] @ w[Nc, K]^T (+ bias [Nc] when defined and not accumulating), all
// bfloat16 with unit stride along their last dimension. Sums in float32 (the bias and, when accumulating, out's
// old value included) and rounds each output once to bfloat16 (to nearest even, as c10::BFloat16 does).
// Runs only where cpu_bf16_kernels() is not aten (AVX512-BF16, cpu_features.h).
void bf16_dot_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& w, bool accumulate,
                     const at::Tensor& bias);

// bf16_dot_matmul's product on AMX tiles, W read in place as the A operand (16 of its rows a tile) against a^T;
// a has at most 16 rows, K is a multiple of 32, a and w have unit stride along k. Runs only where
// cpu_bf16_kernels() is amx.
void bf16_amx_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& w, bool accumulate,
                     const at::Tensor& bias);

// bf16_rowmajor_matmul's product on AMX tiles: a (at most 16 rows, unit stride along k) in place as A tiles,
// b's rows paired on the fly into B tiles; K is a multiple of 32. Runs only where cpu_bf16_kernels() is amx.
void bf16_amx_rowmajor_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                              const at::Tensor& bias);

// out[M, Nc] (accumulate ? += : =) a[M, K] @ b[K, Nc] (+ bias), b's rows read in place: the backward's small
// products d_gates @ W and, with a = d_gates^T (any strides), the weight gradients of a few rows. Widens b to
// float32 and sums with FMAs (b's k pairs are not adjacent, as vdpbf16ps needs); rounds each output once.
// out and b have unit stride along their last dimension. Runs only where cpu_bf16_kernels() is not aten.
void bf16_rowmajor_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                          const at::Tensor& bias);

}  // namespace fused_lstm
