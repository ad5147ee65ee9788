// The persistent LSTM backward kernel: one cooperative launch walks every time step of one direction in
// reverse, with W_hh on chip, fusing the pointwise backward of a step with the d_gates @ W_hh product that
// carries dh to the step before.
//
// Work split (H hidden units, N batch rows, U units per block, grid = ceil(H / U) blocks):
//   - block k owns hidden units [k*U, k*U + U): the pointwise backward of those units (their four gates) and
//     the columns k*U .. k*U + U of the product dh = d_gates @ W_hh. Both are the same units, so dh and dc
//     of a block's units never leave it: they live in shared memory, in float32, for the whole sequence;
//   - its slice of W_hh, the U columns of those units over all 4H gate rows, is copied into shared memory once
//     (stored transposed, one row of 4H per unit);
//   - each step: (1) the pointwise backward of the active rows writes the step's d_gates (global, the op's
//     output); (2) the grid meets at one barrier, after which the step's d_gates [rows, 4H] are complete;
//     (3) every block stages them into shared memory and computes dh for its units. Each step's d_gates
//     occupy their own rows of the output, so the next step's writes never touch what a slower block may
//     still be reading: one barrier per step is enough.
//
// Inside a block (kThreads threads) the dh product comes in the forward's two variants (Product), chosen by the
// plan's cost model:
//   - Fma: tiles of one dh column x kRowsPerTile batch rows (row_product_fma, persistent_common.cuh); k_split
//     consecutive lanes share a tile, each summing every k_split-th 16-byte vector of the K = 4H dimension, and a
//     butterfly of warp shuffles adds their partial sums in a fixed order. float32 FMAs on storage-dtype values.
//   - Mma: tensor cores (product_mma: WMMA, m16n16k16 for fp16 / bf16, TF32 m16n16k8 for float32 when TF32 is
//     allowed), the block's dh columns padded to 16 and the batch to 16, into a float32 buffer from which the
//     carried rows are copied.
// Both are bitwise reproducible. The blocks exchange the step's d_gates (and with a projection its dh_total) through
// global memory, staged from L2 after a grid barrier (Grid), or, on sm_90, in one thread-block cluster whose blocks
// each write their columns straight into every block's shared memory (double-buffered) and meet at cluster.sync
// (Cluster, with Fma): nothing is staged. With a projection (proj_size) see
// persistent_backward_kernel below; its own product (dh_total @ W_hr) is Fma in both. The cell math is
// cell_backward from ../../lstm_cell.h, as on every other path.
//
// Included by persistent.cu only.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../../lstm_cell.h"
#include "persistent_common.cuh"

namespace fused_lstm {
namespace cuda {
namespace persistent {

// Kernel arguments (one __grid_constant__ struct, as ForwardParams). Tensors in the storage dtype scalar_t.
// Hout = out_hidden: the projection's size, or H without one.
template <typename scalar_t>
struct BackwardParams {
  const scalar_t* gates;     // [R, 4H] contiguous: the saved post-activation gates (i, f, g, o)
  const scalar_t* c_prev;    // [R, H] contiguous: the saved c each row's step started from
  const scalar_t* d_output;  // [R, Hout], row stride d_output_stride: this direction's columns of grad_output
  int64_t d_output_stride;
  const scalar_t* w_hh;      // [4H, Hout], strides (w_stride_row, w_stride_col): the recurrent weight
  int64_t w_stride_row;
  int64_t w_stride_col;
  const scalar_t* w_hr;      // [Hout, H], strides (wr_stride_row, wr_stride_col), kProject only: the projection
  int64_t wr_stride_row;
  int64_t wr_stride_col;
  scalar_t* dh_state;        // [N, Hout] contiguous: grad of h_n in, grad of h0 out
  scalar_t* dc_state;        // [N, H] contiguous: grad of c_n in, grad of c0 out
  scalar_t* d_gates;         // [R, 4H] contiguous, out: gradients of the pre-activations
  scalar_t* dh_total;        // [R, Hout] contiguous, out, kProject only: dL/dh after w_hr per row
  scalar_t* h_next;          // [R, H] contiguous, out, kProject only: the recomputed h' before w_hr per row
  int64_t total_rows;        // R
  int hidden;                // H
  int out_hidden;            // Hout
  int padded_gates;          // K: 4H rounded up to a whole 16-byte vector: the row pitch of w_s (and of the
                             // staged d_gates)
  int padded_out;            // Kr: Hout rounded up likewise (kProject): the row pitch of wr_s and the staged dh_total
  int batch;                 // N <= kMaxBatch
  int padded_batch;          // N_pad: N rounded up to kRowsPerTile (Fma) or 16 (Mma): the rows of the staging buffer
  int units_per_block;       // U: hidden units per block (pointwise backward; rows of wr_s)
  int outs_per_block;        // V: columns of dh (Hout) per block; U without a projection
  int k_split;               // lanes per tile of the dh product (d_gates @ W_hh): 8, 16 or 32
  int proj_k_split;          // lanes per tile of the projection product (dh_total @ W_hr), kProject
  int steps;                 // T
  bool reverse;              // the forward pass walked t = T-1 .. 0 (so this one walks t = 0 .. T-1)
  bool need_h0_grad;         // carry dh back past each sequence's first step (see carried_rows, lstm_layer.h)
  int lengths[kMaxBatch];    // sequence length of batch row b, as in ForwardParams
};

// Rows of the W_hh slice in shared memory: the block's V dh columns, padded to whole 16-row tiles for Mma.
__host__ __device__ constexpr int backward_weight_rows(int outs_per_block, Product product) {
  return product == Product::Mma ? round_up(outs_per_block, 16) : outs_per_block;
}

// Storage elements of the staging buffer (below), for padded_gates K and padded_out Kr (0 without a projection).
__host__ __device__ constexpr int backward_staged_elements(int padded_batch, int padded_gates, int padded_out,
                                                           bool cluster) {
  return padded_batch * (cluster ? 2 * padded_gates + padded_out
                                 : (padded_gates > padded_out ? padded_gates : padded_out));
}

// Shared memory of one block, in bytes: the transposed W_hh slice [Vw, K] (Vw = backward_weight_rows(V)), the
// staging buffer [N_pad, max(K, Kr)] (d_gates, and with a projection also dh_total; Cluster: two [N_pad, K]
// buffers, the double buffer every block writes its d_gates columns into, then one [N_pad, Kr] for dh_total), in
// float32 the Mma product's output [Vw, N_pad] (Mma only), the transposed W_hr slice [U, Kr] (Kr = 0 without a
// projection) in the storage dtype; then in float32 dh of the block's dh columns [N_pad, V], dc of its units
// [N_pad, U] and, with a projection, dh' = dh_total @ W_hr of its units [N_pad, U]. Every part starts 32-byte
// aligned for Mma.
inline size_t backward_shared_bytes(int units_per_block, int padded_gates, int padded_batch, size_t element_size,
                                    int outs_per_block = 0, int padded_out = 0, Product product = Product::Fma,
                                    bool cluster = false) {
  const bool project = padded_out > 0;
  const size_t n_pad = static_cast<size_t>(padded_batch);
  const size_t u = static_cast<size_t>(units_per_block);
  const int v = project ? outs_per_block : units_per_block;
  const size_t w_rows = static_cast<size_t>(backward_weight_rows(v, product));
  const size_t staged = static_cast<size_t>(backward_staged_elements(padded_batch, padded_gates, padded_out, cluster));
  const size_t mma_out = product == Product::Mma ? w_rows * n_pad : 0;
  return (w_rows * padded_gates + staged + u * padded_out) * element_size +
         (mma_out + (static_cast<size_t>(v) + (project ? 2 : 1) * u) * n_pad) * sizeof(float);
}

// Stages `rows` rows of `cols` storage elements (row pitch `cols` in global memory, `pitch` in shared memory)
// through L2 (other SMs wrote them): by 16-byte vectors when the global rows start aligned, else element-wise.
template <typename scalar_t>
__device__ __forceinline__ void stage_rows(scalar_t* dst, int pitch, const scalar_t* src, int rows, int cols) {
  constexpr int V = kVec<scalar_t>;
  if (cols % V == 0) {
    const int row_vectors = cols / V;
    for (int i = threadIdx.x; i < rows * row_vectors; i += kThreads) {
      const int b = i / row_vectors, v = i - b * row_vectors;
      reinterpret_cast<uint4*>(dst + b * pitch)[v] =
          __ldcg(reinterpret_cast<const uint4*>(src + static_cast<int64_t>(b) * cols) + v);
    }
  } else {
    for (int i = threadIdx.x; i < rows * cols; i += kThreads) {
      const int b = i / cols, k = i - b * cols;
      copy_through_l2(dst + b * pitch + k, src + static_cast<int64_t>(b) * cols + k);
    }
  }
}

// Requires a cooperative launch of exactly ceil(H / U) blocks of kThreads threads with backward_shared_bytes(U, K,
// N_pad, sizeof(scalar_t), V, kProject ? Kr : 0, kProduct, kCluster) bytes of dynamic shared memory, all
// co-resident (Cluster: the blocks are one cluster, launched without the cooperative flag); for Mma, K a multiple
// of the k step and N_pad of 16.
//
// With a projection (kProject), block k also owns the dh columns [k*V, k*V + V) of Hout (not its units: dh is
// the gradient of the projected h), and each step has two phases with a grid barrier after each:
//   (0) for its dh columns and the step's active rows: dh_total = dh + grad_output, written to the op's dh_total
//       (grad_w_hr needs it, and every block needs all of it); grid barrier;
//   (1) stage the step's dh_total rows (Cluster: every block wrote them into its shared memory), dh' =
//       dh_total @ W_hr for the block's units (W_hr's columns of those units on chip), the pointwise backward on
//       dh' (also writing the recomputed h' for grad_w_hr); grid barrier; then the dh product for its dh columns
//       as without a projection.
// Phase 0 of step s+1 writes other rows than phase 1 of step s reads, and phase 1 of step s+1 restages only after
// the barrier that ends phase 0: two barriers per step, no double buffering. In a cluster both exchanges write into
// every block's shared memory, and the same holds: a block writes dh_total of step s+1 only after the barrier that
// ends every block's phase 1 of step s (the last read of dh_total s), and d_gates of step s+1 only after the one
// that ends phase 0 of step s+1, which every block reaches after its dh product of step s. d_gates is
// double-buffered all the same: without a projection the one barrier per step does not separate them.
template <typename scalar_t, bool kProject = false, Product kProduct = Product::Fma,
          Exchange kExchange = Exchange::Grid>
__global__ void __launch_bounds__(kBounds.max_threads, kBounds.min_blocks_per_sm)
    persistent_backward_kernel(const __grid_constant__ BackwardParams<scalar_t> p) {
  constexpr bool kMma = kProduct == Product::Mma;
  constexpr bool kCluster = kExchange == Exchange::Cluster;
  static_assert(!kCluster || !kMma, "the cluster backward runs the Fma product");
  const int H = p.hidden, G = 4 * H, K = p.padded_gates, N = p.batch, U = p.units_per_block;
  const int HO = kProject ? p.out_hidden : H, Kr = kProject ? p.padded_out : 0;
  const int V = kProject ? p.outs_per_block : U;
  const int w_rows = backward_weight_rows(V, kProduct);
  const int n_pad = p.padded_batch;
  const int fma_rows = round_up(N, kRowsPerTile);  // the rows the FMA products tile
  const int unit0 = blockIdx.x * U, out0 = blockIdx.x * V;
  const int live_units = min(U, H - unit0), live_outs = max(0, min(V, HO - out0));

  // Dynamic shared memory (gpu_runtime.h: 128-byte aligned): w_s [w_rows][K], st_s [n_pad][max(K, Kr)]
  // (staged d_gates at pitch K, staged dh_total at pitch Kr; Cluster [2][n_pad][K] then [n_pad][Kr]),
  // out_s [w_rows][n_pad] (Mma), wr_s [U][Kr], dh_s [n_pad][V], dc_s [n_pad][U], dhp_s [n_pad][U] (kProject).
  // For Mma, K * sizeof(scalar_t) is a multiple of 32 bytes and n_pad of 16, so w_s, st_s and out_s start
  // 32-byte aligned.
  FUSED_LSTM_DYNAMIC_SHARED(uint4, smem);
  scalar_t* w_s = reinterpret_cast<scalar_t*>(smem);
  scalar_t* st_s = w_s + w_rows * K;
  const int staged_elements = backward_staged_elements(n_pad, K, Kr, kCluster);
  float* out_s = reinterpret_cast<float*>(st_s + staged_elements);
  scalar_t* wr_s = reinterpret_cast<scalar_t*>(out_s + (kMma ? w_rows * n_pad : 0));
  float* dh_s = reinterpret_cast<float*>(wr_s + U * Kr);
  float* dc_s = dh_s + n_pad * V;
  float* dhp_s = dc_s + n_pad * U;
  const scalar_t zero = static_cast<scalar_t>(0.0f);

  // --- Once: row j of w_s is column out0 + j of W_hh (zero past Hout and past V, and in the padding columns);
  // row u of wr_s is column unit0 + u of W_hr; st_s zeroed (padding columns and rows never staged stay finite); dh
  // of the owned dh columns and dc of the owned units from dh_state / dc_state.
  load_weight_rows(w_s, w_rows, K, p.w_hh, p.w_stride_col, p.w_stride_row, out0, min(HO, out0 + V), G);
  if constexpr (kProject) load_weight_rows(wr_s, U, Kr, p.w_hr, p.wr_stride_col, p.wr_stride_row, unit0, H, HO);
  for (int i = threadIdx.x; i < staged_elements; i += kThreads) st_s[i] = zero;
  for (int i = threadIdx.x; i < n_pad * V; i += kThreads) {
    const int b = i / V, out = out0 + i % V;
    dh_s[i] = (b < N && out < HO) ? static_cast<float>(p.dh_state[static_cast<int64_t>(b) * HO + out]) : 0.0f;
  }
  for (int i = threadIdx.x; i < n_pad * U; i += kThreads) {
    const int b = i / U, unit = unit0 + i % U;
    dc_s[i] = (b < N && unit < H) ? static_cast<float>(p.dc_state[static_cast<int64_t>(b) * H + unit]) : 0.0f;
  }
  __syncthreads();
  // Cluster: no block's first d_gates may land in a buffer another block is still zeroing.
  if constexpr (kCluster) step_barrier<kExchange>();

  StepWalk walk(/*walk_descending=*/!p.reverse, N, p.total_rows);
  for (int s = 0; s < p.steps; ++s) {
    const int t = p.reverse ? s : p.steps - 1 - s;
    walk.enter(t, p.lengths, N);
    const int rows = walk.rows;
    const int64_t offset = walk.offset;
    // The step's d_gates rows (and dh_total rows) in shared memory: staged there (Grid, one buffer for both), or
    // written there by every block (Cluster: d_gates into the buffer of this step's parity).
    scalar_t* const st_cur = st_s + (kCluster ? (s & 1) * n_pad * K : 0);
    scalar_t* const dt_cur = st_s + (kCluster ? 2 * n_pad * K : 0);

    if constexpr (kProject) {
      // (0) dh_total of the owned dh columns: the dh carried from the step after (or grad_h_n) plus this step's
      // output gradient, rounded to the storage dtype as the per-step path stores it.
      for (int i = threadIdx.x; i < rows * V; i += kThreads) {
        const int b = i / V, j = i - b * V;
        if (j >= live_outs) continue;
        const int64_t row = offset + b;
        const float total = dh_s[b * V + j] + static_cast<float>(p.d_output[row * p.d_output_stride + out0 + j]);
        const scalar_t stored = static_cast<scalar_t>(total);
        p.dh_total[row * HO + out0 + j] = stored;
        if constexpr (kCluster) publish_to_cluster(dt_cur, b * Kr + out0 + j, stored);
      }
      step_barrier<kExchange>();  // the step's dh_total complete in every column
      if constexpr (!kCluster) {
        stage_rows(st_s, Kr, p.dh_total + offset * HO, rows, HO);
        __syncthreads();
      }
      // dh' [rows, U] = dh_total @ W_hr's columns of the owned units.
      row_product_fma<scalar_t>(wr_s, dt_cur, U, live_units, Kr, fma_rows, rows, p.proj_k_split,
                                [&](int u, int b, float sum) { dhp_s[b * U + u] = sum; });
      __syncthreads();  // dhp_s complete; st_s free to be restaged
    }

    // (1) Pointwise backward of the owned units: dh (kProject: dh' through the projection; else the dh carried
    // from the step after, or grad_h_n, plus this step's output gradient), and dc, give the four gate gradients
    // of (row, unit) and dc for the step before.
    for (int i = threadIdx.x; i < rows * U; i += kThreads) {
      const int b = i / U, u = i - b * U, unit = unit0 + u;
      if (unit >= H) continue;
      const int64_t row = offset + b;
      const scalar_t* g = p.gates + row * G + unit;
      const Gates<float> gate{static_cast<float>(g[0]), static_cast<float>(g[H]), static_cast<float>(g[2 * H]),
                              static_cast<float>(g[3 * H])};
      const float dh = kProject ? dhp_s[b * U + u]
                                : dh_s[b * V + u] + static_cast<float>(p.d_output[row * p.d_output_stride + unit]);
      float dc_prev, h_next;
      const GateGrads<float> grad = cell_backward<float>(gate, static_cast<float>(p.c_prev[row * H + unit]), dh,
                                                         dc_s[b * U + u], &dc_prev, &h_next);
      const scalar_t stored[4] = {static_cast<scalar_t>(grad.i), static_cast<scalar_t>(grad.f),
                                  static_cast<scalar_t>(grad.g), static_cast<scalar_t>(grad.o)};
      scalar_t* dg = p.d_gates + row * G + unit;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        dg[q * H] = stored[q];
        if constexpr (kCluster) publish_to_cluster(st_cur, b * K + q * H + unit, stored[q]);
      }
      dc_s[b * U + u] = dc_prev;
      if constexpr (kProject) p.h_next[row * H + unit] = static_cast<scalar_t>(h_next);
    }
    // Publishes this step's d_gates columns to every block (grid.sync fences memory at device scope; cluster.sync
    // orders the shared-memory writes of the cluster).
    step_barrier<kExchange>();

    // (2) dh for the step before, of the rows that go on to one (all active rows when h0's gradient is wanted).
    const int carried = p.need_h0_grad ? rows
                        : !p.reverse  ? (t > 0 ? rows : 0)
                                      : (t + 1 < p.steps ? rows_at(t + 1, p.lengths, N) : 0);
    // Stage those rows' d_gates. Rows of tiles past `carried` keep stale but finite values; their sums are
    // computed and dropped.
    if constexpr (!kCluster) {
      stage_rows(st_s, K, p.d_gates + offset * G, carried, G);
      __syncthreads();
    }
    if constexpr (kMma) {
      product_mma<scalar_t>(w_s, w_rows, st_cur, K, out_s, n_pad, carried);
      __syncthreads();  // out_s complete
      for (int i = threadIdx.x; i < carried * V; i += kThreads) {
        const int b = i / V, j = i - b * V;
        if (j < live_outs) dh_s[b * V + j] = out_s[j * n_pad + b];
      }
    } else {
      row_product_fma<scalar_t>(w_s, st_cur, V, live_outs, K, fma_rows, carried, p.k_split,
                                [&](int j, int b, float sum) { dh_s[b * V + j] = sum; });
    }
    // dh_s complete before the next step reads it; st_s free to be restaged.
    __syncthreads();
    walk.leave();
  }

  // grad_h0 of the owned dh columns and grad_c0 of the owned units (rows that never carried keep what they were
  // given or reached).
  for (int i = threadIdx.x; i < N * V; i += kThreads) {
    const int b = i / V, out = out0 + i % V;
    if (out < HO) p.dh_state[static_cast<int64_t>(b) * HO + out] = static_cast<scalar_t>(dh_s[i]);
  }
  for (int i = threadIdx.x; i < N * U; i += kThreads) {
    const int b = i / U, unit = unit0 + i % U;
    if (unit < H) p.dc_state[static_cast<int64_t>(b) * H + unit] = static_cast<scalar_t>(dc_s[i]);
  }
}

}  // namespace persistent
}  // namespace cuda
}  // namespace fused_lstm
