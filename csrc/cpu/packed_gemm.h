// Float32 matrix products for the CPU backend on weights packed into 64-column panels, with a register-
// tiled kernel written in GCC vector extensions and built for AVX-512 and for AVX2 (simd.h). MKL, which
// ATen uses on x86, runs AVX2 code on AMD processors; this kernel runs AVX-512 where the CPU has it, and
// a packed panel is reused by every row tile and every time step.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>

#include "cpu_limits.h"
#include "simd.h"

namespace fused_lstm {

constexpr int64_t kPanel = 4 * kGroup;  // columns per packed panel: 4 groups of 16

// Where a panel's elements are: row k, column c (< 64) at panel[k * k_stride + (c / 16) * group_stride +
// c % 16]. Packed panels are either row-major ([K][64]: k_stride 64, group_stride 16) or group-major
// ([4][K][16]: k_stride 16, group_stride 16 K), whichever the kernels that pack them read faster
// (Isa::kGroupMajorPanels); 64 columns of a row-major matrix read in place have k_stride = its row stride.
struct PanelLayout {
  int64_t k_stride = kPanel, group_stride = kGroup;
  int64_t at(int64_t k, int64_t c) const { return k * k_stride + c / kGroup * group_stride + c % kGroup; }
};

// The layout Isa's packing writes for panels of K rows.
template <typename Isa>
PanelLayout packed_layout(int64_t K) {
  return Isa::kGroupMajorPanels ? PanelLayout{kGroup, kGroup * K} : PanelLayout{};
}
// ... and the kernels in use (cpu_features.h).
PanelLayout packed_layout(int64_t K);

// A left operand and the panel it multiplies: element (r, k) of a at a[r * row_stride + k * col_stride],
// panel row k (64 columns, zero past the matrix's last column) as `layout` says.
struct PanelOperand {
  const float* a;
  int64_t row_stride, col_stride;
  const float* panel;
  int64_t K;
  PanelLayout layout = {};
  PanelOperand from_row(int64_t r) const { return {a + r * row_stride, row_stride, col_stride, panel, K, layout}; }
};

// One panel's product for Rows rows, summed over Operands operand/panel pairs (an LSTM step's input and
// recurrent products land in the same accumulators):
//   out[r, group g column l] (+)= bias[g*16 + l] + sum_ops sum_k a[r, k] * panel[k][g*16 + l]
//   out:   column group g (16 columns) of row r starts at out + r * out_row_stride + g * group_stride; only
//          the first valid[g] columns of each group are real (the panel is zero past them).
//   bias:  [64] for this panel, or null
// The panel's columns run in passes of Isa::pass_vecs(Rows) vectors (one pass with AVX-512, up to four with
// AVX2).
template <typename Isa, int Rows, int Operands>
FUSED_LSTM_ALWAYS_INLINE void panel_tile(const PanelOperand (&ops)[Operands], float* out, int64_t out_row_stride,
                                         int64_t group_stride, const int64_t (&valid)[4], bool accumulate,
                                         const float* bias) {
  constexpr int L = Isa::kLanes, V = Isa::pass_vecs(Rows);
  if (accumulate) {
    // The accumulated rows (an LSTM step's input projection) were written long before and come from
    // memory: ask for them now so that they arrive while the k loop runs instead of stalling the store.
    for (int r = 0; r < Rows; ++r) {
      for (int g = 0; g < 4; ++g) __builtin_prefetch(out + r * out_row_stride + g * group_stride, 1);
    }
  }
  for (int64_t first_col = 0; first_col < kPanel; first_col += V * L) {
    // The accumulators sum k one term after the other, and over a long reduction the rounding error grows
    // with its length: so they are moved into `total` after every kSumChunkK k of an operand (cpu_limits.h).
    // `total` lives in memory (L1): with AVX-512 the 24 accumulators, 4 panel vectors and a broadcast
    // already take 29 of the 32 vector registers, and a register-resident second set makes the compiler spill
    // in the k loop.
    vec<L> acc[Rows][V] = {};
    alignas(64) float total[Rows][V][L];
    for (int r = 0; r < Rows; ++r) {
      for (int v = 0; v < V; ++v) store<L>(total[r][v], bias ? load<L>(bias + first_col + v * L) : vec<L>{});
    }
    for (const PanelOperand& op : ops) {
      for (int64_t k0 = 0; k0 < op.K; k0 += cpu_limits::kSumChunkK) {
        const int64_t k1 = std::min(op.K, k0 + cpu_limits::kSumChunkK);
        // Two k per iteration: the loop's own instructions are then 4 per 48 FMAs (AVX-512), and the next k's
        // loads issue next to this one's FMAs.
#pragma GCC unroll 2
        for (int64_t k = k0; k < k1; ++k) {
          // Row-major panels (all that the AVX-512 build reads, see panel_rows) keep the columns' offsets
          // compile-time constants.
          const float* w = op.panel + k * op.layout.k_stride;
          vec<L> wv[V];
#pragma GCC unroll 8
          for (int v = 0; v < V; ++v) {
            const int64_t col = first_col + v * L;
            wv[v] = load<L>(Isa::kGroupMajorPanels ? w + op.layout.at(0, col) : w + col);
          }
#pragma GCC unroll 8
          for (int r = 0; r < Rows; ++r) {
            const float x = op.a[r * op.row_stride + k * op.col_stride];
#pragma GCC unroll 8
            for (int v = 0; v < V; ++v) acc[r][v] += x * wv[v];
          }
        }
        // The empty asm with a memory clobber, given total's address, keeps total in memory.
        asm volatile("" : : "r"(total) : "memory");
        for (int r = 0; r < Rows; ++r) {
          for (int v = 0; v < V; ++v) {
            store<L>(total[r][v], load<L>(total[r][v]) + acc[r][v]);
            acc[r][v] = vec<L>{};
          }
        }
      }
    }
    for (int r = 0; r < Rows; ++r) {
      for (int v = 0; v < V; ++v) {
        const int64_t col = first_col + v * L, group = col / kGroup, in_group = col % kGroup;
        const int64_t n = std::clamp<int64_t>(valid[group] - in_group, 0, L);
        float* o = out + r * out_row_stride + group * group_stride + in_group;
        if (n == L) {
          store<L>(o, accumulate ? load<L>(o) + load<L>(total[r][v]) : load<L>(total[r][v]));
        } else if (n > 0) {
          // Through one vector, so that only n floats are written.
          const vec<L> sum = accumulate ? load_partial<L>(o, n) + load<L>(total[r][v]) : load<L>(total[r][v]);
          std::memcpy(o, &sum, n * sizeof(float));
        }
      }
    }
  }
}

// panel_tile on rows [r, r + Rows) of the operands.
template <typename Isa, int Rows, int Operands>
FUSED_LSTM_ALWAYS_INLINE void panel_tile_at(const PanelOperand (&ops)[Operands], int64_t r, float* out,
                                            int64_t out_row_stride, int64_t group_stride, const int64_t (&valid)[4],
                                            bool accumulate, const float* bias) {
  PanelOperand shifted[Operands];
  for (int i = 0; i < Operands; ++i) shifted[i] = ops[i].from_row(r);
  panel_tile<Isa, Rows, Operands>(shifted, out + r * out_row_stride, out_row_stride, group_stride, valid, accumulate,
                                  bias);
}

// A tile of exactly `rows` (1 <= rows <= Rows) rows from row r.
template <typename Isa, int Rows, int Operands>
FUSED_LSTM_ALWAYS_INLINE void panel_tile_of(const PanelOperand (&ops)[Operands], int64_t r, int64_t rows, float* out,
                                            int64_t out_row_stride, int64_t group_stride, const int64_t (&valid)[4],
                                            bool accumulate, const float* bias) {
  if constexpr (Rows > 0) {
    if (rows == Rows) {
      panel_tile_at<Isa, Rows>(ops, r, out, out_row_stride, group_stride, valid, accumulate, bias);
    } else {
      panel_tile_of<Isa, Rows - 1>(ops, r, rows, out, out_row_stride, group_stride, valid, accumulate, bias);
    }
  }
}

// panel_tile over `rows` rows in the fewest tiles of at most Isa::kRowTile rows: full tiles and the remainder,
// or, where Isa::kEvenRowTiles, tiles as even as they can be (simd.h). No lambdas in these helpers: a
// lambda's body is compiled for the baseline ISA, not the calling kernel's.
template <typename Isa, int Operands>
FUSED_LSTM_ALWAYS_INLINE void panel_rows(const PanelOperand (&ops)[Operands], float* out, int64_t out_row_stride,
                                         int64_t group_stride, const int64_t (&valid)[4], bool accumulate,
                                         const float* bias, int64_t rows) {
  if constexpr (!Isa::kGroupMajorPanels) {
    for (const PanelOperand& op : ops) {
      TORCH_INTERNAL_ASSERT(op.layout.group_stride == kGroup, "fused_lstm: a group-major panel reached the kernels "
                            "of another instruction set (CPU kernels switched during a call?)");
    }
  }
  const int64_t tiles = (rows + Isa::kRowTile - 1) / Isa::kRowTile;
  for (int64_t t = 0, r = 0; t < tiles; ++t) {
    const int64_t end = Isa::kEvenRowTiles ? rows * (t + 1) / tiles : std::min(rows, (t + 1) * Isa::kRowTile);
    panel_tile_of<Isa, Isa::kRowTile>(ops, r, end - r, out, out_row_stride, group_stride, valid, accumulate, bias);
    r = end;
  }
}

// A [K, Nc] right-hand matrix packed into ceil(Nc / 64) panels of K x 64 (zero past Nc), laid out as
// `layout` says.
struct PackedMatrix {
  at::Tensor panels;  // [panels * K * 64] float32
  int64_t K = 0, cols = 0;
  PanelLayout layout;
  int64_t count() const { return (cols + kPanel - 1) / kPanel; }
  const float* panel(int64_t p) const { return panels.data_ptr<float>() + p * K * kPanel; }
};

// Rows [row_begin, row_end) of out's columns of one panel: out (+)= a[:, k_begin:k_end] @ b[k_begin:k_end]
// (+ bias, padded to whole panels); k_end < 0 means all of K. Pointers address the whole matrices; strides
// in elements.
void matmul_panel(const float* a, int64_t a_row_stride, int64_t a_col_stride, const PackedMatrix& b, float* out,
                  int64_t out_row_stride, bool accumulate, const float* bias, int64_t panel, int64_t row_begin,
                  int64_t row_end, int64_t k_begin = 0, int64_t k_end = -1);

// Fills one panel of K x 64 laid out as `layout` says from 64 source rows (rows[c] holds panel column c along
// k, at stride k_stride; null for a zero column). Walks k in chunks so that the scattered writes land in an
// L1-sized chunk of the panel: writing one column at a time would touch a new cache line per element.
void fill_panel_from_rows(const float* const (&rows)[kPanel], int64_t k_stride, int64_t K, const PanelLayout& layout,
                          float* panel);

// Packs b ([K, Nc] float32, any strides) in parallel.
PackedMatrix pack_matrix(const at::Tensor& b);

// out[M, Nc] (accumulate ? += : =) a[M, K] @ b[K, Nc] (+ bias [Nc] when defined and not accumulating) with
// b read in place: b and out have unit column stride, a any strides. Rows of b serve as the panels' rows,
// so only a last partial panel (Nc not a multiple of 64) is copied, zero-padded. For products too small to
// repay packing: a few rows of a, or a short reduction (the weight gradients of a short sequence).
void rowmajor_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                     const at::Tensor& bias);

// out[M, Nc] (accumulate ? += : =) a[M, K] @ b (+ bias [Nc] when defined and not accumulating); out must
// have unit column stride; a any strides.
void packed_matmul(const at::Tensor& out, const at::Tensor& a, const PackedMatrix& b, bool accumulate,
                   const at::Tensor& bias);

// The products of one transposed left operand with several right operands, each block of it gathered once
// for all of them: outs[i] = a @ bs[i] and, when row_sums is defined, row_sums = a summed along k. These are
// a layer's weight and bias gradients: d_gates^T @ input, d_gates^T @ h_prev and d_gates summed over rows.
//   a:        [M, K] float32 with a.stride(1) != 1 (a transposed view)
//   bs[i]:    [K, Nc_i] packed
//   outs[i]:  [M, Nc_i] float32 with unit column stride
//   row_sums: [M] float32 contiguous, or undefined
void transposed_matmuls(c10::ArrayRef<at::Tensor> outs, const at::Tensor& a, c10::ArrayRef<const PackedMatrix*> bs,
                        const at::Tensor& row_sums);

}  // namespace fused_lstm
