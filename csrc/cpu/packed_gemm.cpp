#include "packed_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_limits.h"
#include "cpu_plan.h"

namespace fused_lstm {

namespace {

// Rows [row_begin, row_end) of out's 64 columns from first_col against one panel of those columns (panel
// row k at panel + k * panel_stride, K rows) and their 64 biases (or null): the one entry into the
// register-tiled kernel for both packed panels and a row-major matrix read in place.
struct PanelProduct {
  template <typename Isa>
  FUSED_LSTM_ALWAYS_INLINE static void run(const float* a, int64_t a_row_stride, int64_t a_col_stride,
                                           const float* panel, const PanelLayout& layout, int64_t K, int64_t cols,
                                           int64_t first_col, float* out, int64_t out_row_stride, bool accumulate,
                                           const float* bias, int64_t row_begin, int64_t row_end) {
    int64_t valid[4];
    for (int g = 0; g < 4; ++g) valid[g] = std::clamp<int64_t>(cols - first_col - g * kGroup, 0, kGroup);
    const PanelOperand operand[1] = {{a + row_begin * a_row_stride, a_row_stride, a_col_stride, panel, K, layout}};
    panel_rows<Isa>(operand, out + row_begin * out_row_stride + first_col, out_row_stride, kGroup, valid, accumulate,
                    bias, row_end - row_begin);
  }
};

void panel_product(const float* a, int64_t a_row_stride, int64_t a_col_stride, const float* panel,
                   const PanelLayout& layout, int64_t K, int64_t cols, int64_t first_col, float* out,
                   int64_t out_row_stride, bool accumulate, const float* bias, int64_t row_begin, int64_t row_end) {
  run_kernel<PanelProduct>(a, a_row_stride, a_col_stride, panel, layout, K, cols, first_col, out, out_row_stride,
                           accumulate, bias, row_begin, row_end);
}

// The products with nothing to multiply: no rows, no columns, or no k (out = bias, or 0, or unchanged).
// Returns whether it handled the call.
bool empty_product(const at::Tensor& out, int64_t M, int64_t K, int64_t cols, bool accumulate,
                   const at::Tensor& bias) {
  if (M == 0 || cols == 0) return true;
  if (K != 0) return false;
  if (!accumulate) bias.defined() ? void(out.copy_(bias.expand_as(out))) : void(out.zero_());
  return true;
}

// bias [cols] zero-padded to whole 64-column panels, so the kernel can load full vectors of it; empty when
// bias is undefined.
std::vector<float> padded_bias(const at::Tensor& bias, int64_t cols) {
  if (!bias.defined()) return {};
  const at::Tensor contiguous = bias.contiguous();
  std::vector<float> padded((cols + kPanel - 1) / kPanel * kPanel, 0.0f);
  std::copy(contiguous.data_ptr<float>(), contiguous.data_ptr<float>() + cols, padded.data());
  return padded;
}

// One right operand of transposed_products and where its product goes: out [M, b.cols] at out_row_stride,
// bias [padded to whole panels] or null.
struct TransposedTarget {
  const PackedMatrix* b;
  float* out;
  int64_t out_row_stride;
  const float* bias;
};

using cpu_limits::kGatherRows;  // rows of a per transposed_products task, at most (sizes the buffers below)

// block[(k - k0) * block_stride + r] = a[r * a_rs + k * a_cs] for r < rows (<= kGatherRows), k in [k0, k1),
// and sums[r] += the same elements when sums is not null. The sums run in three levels (16 k, the chunk,
// the caller's total), as at::sum's cascade does: one running float sum over a sequence's thousands of
// rows had ~10x its error.
FUSED_LSTM_SIMD_CLONES void gather_block(const float* a, int64_t a_rs, int64_t a_cs, int64_t rows, int64_t k0,
                                         int64_t k1, float* block, int64_t block_stride, float* sums) {
  constexpr int64_t kSumRun = 16;
  float chunk_sums[kGatherRows] = {};
  for (int64_t run = k0; run < k1; run += kSumRun) {
    float run_sums[kGatherRows] = {};
    for (int64_t k = run; k < std::min(k1, run + kSumRun); ++k) {
      const float* column = a + k * a_cs;
      float* dst = block + (k - k0) * block_stride;
      if (a_rs == 1) {  // d_gates^T: each k copies a contiguous piece of a d_gates row
        std::copy(column, column + rows, dst);
      } else {
        for (int64_t r = 0; r < rows; ++r) dst[r] = column[r * a_rs];
      }
      if (sums) {
        for (int64_t r = 0; r < rows; ++r) run_sums[r] += dst[r];
      }
    }
    for (int64_t r = 0; sums && r < rows; ++r) chunk_sums[r] += run_sums[r];
  }
  for (int64_t r = 0; sums && r < rows; ++r) sums[r] += chunk_sums[r];
}

// out_i (accumulate ? += : =) a[M, K] @ b_i (+ bias_i) for every target, with a transposed (a_cs != 1: the
// weight gradients' d_gates^T, K = all rows of the sequence), and row_sums[m] = sum_k a[m, k] when not null.
// The kernel reads a row by row along k, so each task gathers a block of its rows for a chunk of k into a
// buffer, stored k-major ([k][rows]: each k copies contiguous elements of a's column; the kernel broadcasts
// from it with row stride 1), then runs it against every target's panels' matching chunks, which stay in
// cache for the block's row tiles (block sizes: cpu_limits.h, kGatherRows, kGatherChunkK). The gather walks
// a's column-major storage a block's width per row of d_gates and costs a fair share of the products it
// feeds: hence one gather for all targets (within the planner's budget, transposed_matmuls) and the row sums
// on the way.
void transposed_products(const float* a, int64_t a_rs, int64_t a_cs, int64_t M, c10::ArrayRef<TransposedTarget> targets,
                         bool accumulate, float* row_sums) {
  constexpr int64_t kChunk = cpu_limits::kGatherChunkK;
  const int64_t K = targets[0].b->K;
  const int64_t blocks =
      cpu_plan::plan_packed_product(M, K, targets[0].b->cols, /*a_transposed=*/true, cpu_plan::this_machine()).tasks;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> block(kChunk * kGatherRows);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row_begin = M * task / blocks, rows = M * (task + 1) / blocks - row_begin;
      float sums[kGatherRows] = {};
      for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
        const int64_t k1 = std::min(K, k0 + kChunk);
        gather_block(a + row_begin * a_rs, a_rs, a_cs, rows, k0, k1, block.data(), kGatherRows,
                     row_sums ? sums : nullptr);
        // The block holds k in [k0, k1): shift its origin so that matmul_panel's k offset lands on it.
        const float* origin = block.data() - k0 * kGatherRows;
        const bool first = k0 == 0;
        for (const TransposedTarget& target : targets) {
          for (int64_t panel = 0; panel < target.b->count(); ++panel) {
            matmul_panel(origin, 1, kGatherRows, *target.b, target.out + row_begin * target.out_row_stride,
                         target.out_row_stride, accumulate || !first, first ? target.bias : nullptr, panel, 0, rows,
                         k0, k1);
          }
        }
      }
      if (row_sums) std::copy(sums, sums + rows, row_sums + row_begin);
    }
  });
}

}  // namespace

void matmul_panel(const float* a, int64_t a_row_stride, int64_t a_col_stride, const PackedMatrix& b, float* out,
                  int64_t out_row_stride, bool accumulate, const float* bias, int64_t panel, int64_t row_begin,
                  int64_t row_end, int64_t k_begin, int64_t k_end) {
  if (k_end < 0) k_end = b.K;
  // The k range starts k_begin rows into the panel: in either layout, k_begin x k_stride floats in (the groups
  // keep their stride).
  panel_product(a + k_begin * a_col_stride, a_row_stride, a_col_stride, b.panel(panel) + b.layout.at(k_begin, 0),
                b.layout, k_end - k_begin, b.cols, panel * kPanel, out, out_row_stride, accumulate,
                bias ? bias + panel * kPanel : nullptr, row_begin, row_end);
}

namespace {

struct FillPanel {
  template <typename Isa>
  FUSED_LSTM_ALWAYS_INLINE static void run(const float* const* rows, int64_t k_stride, int64_t K,
                                           const PanelLayout& layout, float* panel) {
    constexpr int L = Isa::kLanes;
    constexpr int64_t kChunk = 16;  // 16 k x 64 columns: 4 KB of panel
    int64_t k0 = 0;
    if (k_stride == 1) {
      // Whole L x L blocks through registers: L row loads, a transpose, L panel-row stores. L source rows at a
      // time along all of k: 64 rows at once are more streams than the hardware prefetcher follows.
      const int64_t k_end = K / L * L;
      for (int64_t c0 = 0; c0 < kPanel; c0 += L) {
        for (k0 = 0; k0 < k_end; k0 += L) {
          vec<L> block[L];
          for (int64_t i = 0; i < L; ++i) block[i] = rows[c0 + i] ? load<L>(rows[c0 + i] + k0) : vec<L>{};
          transpose<L>(block);
          for (int64_t j = 0; j < L; ++j) store<L>(panel + layout.at(k0 + j, c0), block[j]);
        }
      }
      k0 = k_end;
    }
    for (; k0 < K; k0 += kChunk) {
      const int64_t k1 = std::min(K, k0 + kChunk);
      for (int64_t c = 0; c < kPanel; ++c) {
        const float* row = rows[c];
        for (int64_t k = k0; k < k1; ++k) panel[layout.at(k, c)] = row ? row[k * k_stride] : 0.0f;
      }
    }
  }
};

}  // namespace

PanelLayout packed_layout(int64_t K) {
  return with_selected_isa([K](auto isa) { return packed_layout<decltype(isa)>(K); });
}

void fill_panel_from_rows(const float* const (&rows)[kPanel], int64_t k_stride, int64_t K, const PanelLayout& layout,
                          float* panel) {
  run_kernel<FillPanel>(static_cast<const float* const*>(rows), k_stride, K, layout, panel);
}

PackedMatrix pack_matrix(const at::Tensor& b) {
  PackedMatrix packed;
  packed.K = b.size(0);
  packed.cols = b.size(1);
  packed.layout = packed_layout(packed.K);
  packed.panels = at::empty({packed.count() * packed.K * kPanel}, b.options().dtype(at::kFloat));
  const float* src = b.data_ptr<float>();
  const int64_t s0 = b.stride(0), s1 = b.stride(1), K = packed.K, cols = packed.cols;
  float* dst = packed.panels.data_ptr<float>();
  const PanelLayout layout = packed.layout;
  // Read the source along its unit stride: a strided gather from a matrix that does not fit in cache costs
  // more than the products the panel is then used for (at T = 1, the whole call).
  const bool columns_contiguous = s1 == 1 || s0 != 1;
  at::parallel_for(0, packed.count(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* panel = dst + p * K * kPanel;
      const int64_t width = std::min(kPanel, cols - p * kPanel);
      if (width < kPanel) std::fill(panel, panel + K * kPanel, 0.0f);
      if (columns_contiguous) {
        for (int64_t k = 0; k < K; ++k) {
          const float* row = src + k * s0 + p * kPanel * s1;
          if (layout.group_stride == kGroup) {  // row-major: 64 contiguous floats, one loop that vectorises
            for (int64_t c = 0; c < width; ++c) panel[k * layout.k_stride + c] = row[c * s1];
          } else {
            for (int64_t c0 = 0; c0 < width; c0 += kGroup) {
              float* group = panel + layout.at(k, c0);
              const int64_t n = std::min(kGroup, width - c0);
              if (s1 == 1 && n == kGroup) {
                std::memcpy(group, row + c0, kGroup * sizeof(float));  // a constant size: vector moves, no call
              } else {
                for (int64_t c = 0; c < n; ++c) group[c] = row[(c0 + c) * s1];
              }
            }
          }
        }
      } else {  // b is a transposed view: each panel column is a contiguous source row
        const float* rows[kPanel];
        for (int64_t c = 0; c < kPanel; ++c) rows[c] = c < width ? src + (p * kPanel + c) * s1 : nullptr;
        fill_panel_from_rows(rows, s0, K, layout, panel);
      }
    }
  });
  return packed;
}

void rowmajor_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                     const at::Tensor& bias) {
  const int64_t M = a.size(0), K = a.size(1), cols = b.size(1);
  TORCH_INTERNAL_ASSERT(b.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat &&
                        out.scalar_type() == at::kFloat && b.size(0) == K && out.size(0) == M &&
                        out.size(1) == cols && (b.stride(1) == 1 || cols <= 1) && (out.stride(1) == 1 || cols <= 1),
                        "fused_lstm: rowmajor_matmul needs float32 operands of matching shapes, b and out with "
                        "unit column stride");
  if (empty_product(out, M, K, cols, accumulate, bias)) return;
  const float* a_ptr = a.data_ptr<float>();
  const float* b_ptr = b.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  const int64_t a_rs = a.stride(0), a_cs = a.stride(1), b_rs = b.stride(0), out_rs = out.stride(0);
  // The kernel loads whole 64-column panel rows: the last partial panel is copied once, zero-padded, since
  // b's own rows end before it.
  const int64_t panels = (cols + kPanel - 1) / kPanel, tail_col = (panels - 1) * kPanel;
  const bool partial = cols % kPanel != 0;
  std::vector<float> tail_panel(partial ? K * kPanel : 0, 0.0f);
  for (int64_t k = 0; partial && k < K; ++k) {
    std::copy(b_ptr + k * b_rs + tail_col, b_ptr + k * b_rs + cols, tail_panel.data() + k * kPanel);
  }
  const std::vector<float> bias_panels = padded_bias(bias, cols);
  // Tasks: (panel, block of rows); a task's 64 columns of b stay in cache for its rows (cpu_plan.h).
  constexpr int64_t kRowsPerTask = cpu_limits::kRowMajorRowsPerTask;
  const cpu_plan::TaskGrid grid = cpu_plan::plan_rowmajor_product(M, K, cols);
  at::parallel_for(0, grid.tasks, grid.grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t panel = task % panels, row_begin = task / panels * kRowsPerTask;
      const bool tail = partial && panel == panels - 1;
      // b's own rows serve as panel rows (row-major, row stride b_rs); the tail panel is a packed row-major copy.
      const PanelLayout layout = tail ? PanelLayout{} : PanelLayout{b_rs, kGroup};
      panel_product(a_ptr, a_rs, a_cs, tail ? tail_panel.data() : b_ptr + panel * kPanel, layout, K, cols,
                    panel * kPanel, out_ptr, out_rs, accumulate,
                    bias.defined() ? bias_panels.data() + panel * kPanel : nullptr, row_begin,
                    std::min(M, row_begin + kRowsPerTask));
    }
  });
}

void packed_matmul(const at::Tensor& out, const at::Tensor& a, const PackedMatrix& b, bool accumulate,
                   const at::Tensor& bias) {
  const int64_t M = a.size(0);
  if (empty_product(out, M, b.K, b.cols, accumulate, bias)) return;
  const std::vector<float> bias_panels = padded_bias(bias, b.cols);
  const float* bias_ptr = bias.defined() ? bias_panels.data() : nullptr;
  const float* a_ptr = a.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  const int64_t a_rs = a.stride(0), a_cs = a.stride(1), out_rs = out.stride(0);
  const cpu_plan::PackedProductPlan plan =
      cpu_plan::plan_packed_product(M, b.K, b.cols, /*a_transposed=*/a_cs != 1, cpu_plan::this_machine());
  if (plan.schedule == cpu_plan::PackedSchedule::gather_rows) {
    const TransposedTarget target{&b, out_ptr, out_rs, bias_ptr};
    transposed_products(a_ptr, a_rs, a_cs, M, {&target, 1}, accumulate, nullptr);
    return;
  }
  if (plan.schedule == cpu_plan::PackedSchedule::long_k_rows) {
    // A long reduction (grad_input = d_gates @ W_ih, K = 4H): whole panels no longer fit in L2, and a task
    // per panel would stream all of a once per panel. Instead a task is a block of rows: for each k chunk,
    // every panel's chunk passes over the block's rows, streaming in from L3 once per block and then serving
    // the block's row tiles from L2; the block's chunk of a comes from L3, which the prefetcher hides.
    constexpr int64_t kChunkK = cpu_limits::kPanelChunkK;
    const int64_t K = b.K, blocks = plan.tasks;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t row_begin = M * task / blocks, row_end = M * (task + 1) / blocks;
        for (int64_t k0 = 0; k0 < K; k0 += kChunkK) {
          const int64_t k1 = std::min(K, k0 + kChunkK);
          for (int64_t panel = 0; panel < b.count(); ++panel) {
            matmul_panel(a_ptr, a_rs, a_cs, b, out_ptr, out_rs, accumulate || k0 > 0, k0 == 0 ? bias_ptr : nullptr,
                         panel, row_begin, row_end, k0, k1);
          }
        }
      }
    });
    return;
  }
  // Tasks: (panel, group of rows). A panel ([K][64], up to a few hundred KB) is streamed from memory once
  // per task and then stays in cache for the task's rows, so rows are split only as far as needed to give
  // every thread a few tasks.
  const int64_t rows_per_task = plan.rows_per_task;
  at::parallel_for(0, plan.tasks, plan.grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t panel = task % b.count(), group = task / b.count();
      const int64_t row_begin = group * rows_per_task, row_end = std::min(M, row_begin + rows_per_task);
      matmul_panel(a_ptr, a_rs, a_cs, b, out_ptr, out_rs, accumulate, bias_ptr, panel, row_begin, row_end);
    }
  });
}

void transposed_matmuls(c10::ArrayRef<at::Tensor> outs, const at::Tensor& a, c10::ArrayRef<const PackedMatrix*> bs,
                        const at::Tensor& row_sums) {
  const int64_t M = a.size(0), K = a.size(1);
  TORCH_INTERNAL_ASSERT(a.scalar_type() == at::kFloat && a.stride(1) != 1 && outs.size() == bs.size() && !bs.empty() &&
                            (!row_sums.defined() || (row_sums.is_contiguous() && row_sums.numel() == M &&
                                                     row_sums.scalar_type() == at::kFloat)),
                        "fused_lstm: transposed_matmuls needs a transposed float32 a and one output per operand");
  std::vector<TransposedTarget> targets;
  for (size_t i = 0; i < bs.size(); ++i) {
    const at::Tensor& out = outs[i];
    TORCH_INTERNAL_ASSERT(bs[i]->K == K && out.scalar_type() == at::kFloat && out.size(0) == M &&
                              out.size(1) == bs[i]->cols && (out.stride(1) == 1 || out.size(1) <= 1),
                          "fused_lstm: transposed_matmuls got an output that does not match its operand");
    if (K == 0) out.zero_();
    if (M > 0 && bs[i]->cols > 0) targets.push_back({bs[i], out.data_ptr<float>(), out.stride(0), nullptr});
  }
  if (K == 0 || M == 0) {
    if (row_sums.defined()) row_sums.zero_();
    return;
  }
  if (targets.empty()) {  // only the row sums
    if (row_sums.defined()) at::sum_out(const_cast<at::Tensor&>(row_sums), a, /*dim=*/{1});
    return;
  }
  // Consecutive targets share a pass while their packed operands fit the planner's budget (cpu_plan.h); the
  // first pass also sums the rows.
  float* sums = row_sums.defined() ? row_sums.data_ptr<float>() : nullptr;
  std::vector<int64_t> bytes;
  for (const TransposedTarget& target : targets) bytes.push_back(static_cast<int64_t>(target.b->panels.nbytes()));
  const cpu_plan::Machine machine = cpu_plan::this_machine();
  for (size_t first = 0; first < targets.size();) {
    const size_t last = first + cpu_plan::shared_gather_count(bytes.data(), static_cast<int64_t>(bytes.size()),
                                                              static_cast<int64_t>(first), machine);
    transposed_products(a.data_ptr<float>(), a.stride(0), a.stride(1), M,
                        c10::ArrayRef<TransposedTarget>(targets).slice(first, last - first), /*accumulate=*/false,
                        sums);
    sums = nullptr;
    first = last;
  }
}

}  // namespace fused_lstm
