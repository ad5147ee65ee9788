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
// Inside a block (kThreads threads): the product's outputs are tiles of one unit x kRowsPerTile batch rows;
// k_split consecutive lanes share a tile, each summing every k_split-th 16-byte vector of the K = 4H dimension,
// and a butterfly of warp shuffles adds their partial sums in a fixed order (bitwise reproducible). The cell
// math is cell_backward from ../../lstm_cell.h, as on every other path. float32 FMAs on storage-dtype values.
//
// Included by persistent.cu only.
#pragma once

#include <cstdint>

#include "../../lstm_cell.h"
#include "persistent_common.cuh"

namespace fused_lstm {
namespace cuda {
namespace persistent {

// Kernel arguments (one __grid_constant__ struct, as ForwardParams). Tensors in the storage dtype scalar_t.
template <typename scalar_t>
struct BackwardParams {
  const scalar_t* gates;     // [R, 4H] contiguous: the saved post-activation gates (i, f, g, o)
  const scalar_t* c_prev;    // [R, H] contiguous: the saved c each row's step started from
  const scalar_t* d_output;  // [R, H], row stride d_output_stride: this direction's columns of grad_output
  int64_t d_output_stride;
  const scalar_t* w_hh;      // [4H, H], strides (w_stride_row, w_stride_col): the recurrent weight
  int64_t w_stride_row;
  int64_t w_stride_col;
  scalar_t* dh_state;        // [N, H] contiguous: grad of h_n in, grad of h0 out
  scalar_t* dc_state;        // [N, H] contiguous: grad of c_n in, grad of c0 out
  scalar_t* d_gates;         // [R, 4H] contiguous, out: gradients of the pre-activations
  int64_t total_rows;        // R
  int hidden;                // H
  int padded_gates;          // 4H rounded up to a whole 16-byte vector: the row pitch of both shared matrices
  int batch;                 // N <= kMaxBatch
  int units_per_block;       // U
  int k_split;               // lanes per tile: 8, 16 or 32
  int steps;                 // T
  bool reverse;              // the forward pass walked t = T-1 .. 0 (so this one walks t = 0 .. T-1)
  bool need_h0_grad;         // carry dh back past each sequence's first step (see carried_rows, lstm_layer.h)
  int lengths[kMaxBatch];    // sequence length of batch row b, as in ForwardParams
};

// Shared memory of one block, in bytes: the transposed W_hh slice [U, K] and the staged d_gates [N_pad, K]
// (storage dtype, K = padded 4H), then dh and dc of the block's units [N_pad, U] each, in float32.
inline size_t backward_shared_bytes(int units_per_block, int padded_gates, int batch, size_t element_size) {
  const size_t n_pad = static_cast<size_t>(round_up(batch, kRowsPerTile));
  return (static_cast<size_t>(units_per_block) + n_pad) * padded_gates * element_size +
         2 * n_pad * units_per_block * sizeof(float);
}

// Requires a cooperative launch of exactly ceil(H / U) blocks of kThreads threads with
// backward_shared_bytes(U, K, N, sizeof(scalar_t)) bytes of dynamic shared memory, all co-resident.
template <typename scalar_t>
__global__ void __launch_bounds__(kBounds.max_threads, kBounds.min_blocks_per_sm)
    persistent_backward_kernel(const __grid_constant__ BackwardParams<scalar_t> p) {
  constexpr int V = kVec<scalar_t>;
  constexpr int RB = kRowsPerTile;
  const int H = p.hidden, G = 4 * H, K = p.padded_gates, KV = K / V, N = p.batch, U = p.units_per_block;
  const int n_pad = round_up(N, RB);
  const int unit0 = blockIdx.x * U;

  // Dynamic shared memory, 16-byte aligned: w_s [U][K], dg_s [n_pad][K], dh_s [n_pad][U], dc_s [n_pad][U].
  FUSED_LSTM_DYNAMIC_SHARED(uint4, smem);
  scalar_t* w_s = reinterpret_cast<scalar_t*>(smem);
  scalar_t* dg_s = w_s + U * K;
  float* dh_s = reinterpret_cast<float*>(dg_s + n_pad * K);
  float* dc_s = dh_s + n_pad * U;
  const scalar_t zero = static_cast<scalar_t>(0.0f);

  // --- Once: row u of w_s is column unit0 + u of W_hh (zero past H, and in the padding columns); dg_s zeroed
  // (padding columns and rows past N stay zero); dh and dc of the owned units from dh_state / dc_state.
  for (int i = threadIdx.x; i < U * K; i += kThreads) {
    const int u = i / K, k = i - u * K;
    const int unit = unit0 + u;
    w_s[i] = (unit < H && k < G)
                 ? p.w_hh[static_cast<int64_t>(k) * p.w_stride_row + static_cast<int64_t>(unit) * p.w_stride_col]
                 : zero;
  }
  for (int i = threadIdx.x; i < n_pad * K; i += kThreads) dg_s[i] = zero;
  for (int i = threadIdx.x; i < n_pad * U; i += kThreads) {
    const int b = i / U, unit = unit0 + i % U;
    const bool owned = b < N && unit < H;
    dh_s[i] = owned ? static_cast<float>(p.dh_state[static_cast<int64_t>(b) * H + unit]) : 0.0f;
    dc_s[i] = owned ? static_cast<float>(p.dc_state[static_cast<int64_t>(b) * H + unit]) : 0.0f;
  }
  __syncthreads();

  // The product's tiles: one unit x 4 batch rows (persistent_common.cuh).
  const TileSplit split(p.k_split, U, n_pad);
  // d_gates rows start 16-byte aligned in global memory when 4H fills whole vectors: stage by vectors then.
  const bool vector_rows = G % V == 0;

  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  StepWalk walk(/*walk_descending=*/!p.reverse, N, p.total_rows);
  for (int s = 0; s < p.steps; ++s) {
    const int t = p.reverse ? s : p.steps - 1 - s;
    walk.enter(t, p.lengths, N);
    const int rows = walk.rows;
    const int64_t offset = walk.offset;

    // (1) Pointwise backward of the owned units: dh (from the step after, or grad_h_n) plus this step's output
    // gradient, and dc, give the four gate gradients of (row, unit) and dc for the step before.
    for (int i = threadIdx.x; i < rows * U; i += kThreads) {
      const int b = i / U, u = i - b * U, unit = unit0 + u;
      if (unit >= H) continue;
      const int64_t row = offset + b;
      const scalar_t* g = p.gates + row * G + unit;
      const Gates<float> gate{static_cast<float>(g[0]), static_cast<float>(g[H]), static_cast<float>(g[2 * H]),
                              static_cast<float>(g[3 * H])};
      const float dh = dh_s[b * U + u] + static_cast<float>(p.d_output[row * p.d_output_stride + unit]);
      float dc_prev, h_next;
      const GateGrads<float> grad = cell_backward<float>(gate, static_cast<float>(p.c_prev[row * H + unit]), dh,
                                                         dc_s[b * U + u], &dc_prev, &h_next);
      scalar_t* dg = p.d_gates + row * G + unit;
      dg[0] = static_cast<scalar_t>(grad.i);
      dg[H] = static_cast<scalar_t>(grad.f);
      dg[2 * H] = static_cast<scalar_t>(grad.g);
      dg[3 * H] = static_cast<scalar_t>(grad.o);
      dc_s[b * U + u] = dc_prev;
    }
    // Publishes this step's d_gates columns to every block (grid.sync fences memory at device scope).
    grid.sync();

    // (2) dh for the step before, of the rows that go on to one (all active rows when h0's gradient is wanted).
    const int carried = p.need_h0_grad ? rows
                        : !p.reverse  ? (t > 0 ? rows : 0)
                                      : (t + 1 < p.steps ? rows_at(t + 1, p.lengths, N) : 0);
    // Stage those rows' d_gates, through L2 (other SMs wrote them). Rows of tiles past `carried` keep stale
    // but finite values; their sums are computed and dropped.
    const scalar_t* dg_step = p.d_gates + offset * G;
    if (vector_rows) {
      const int row_vectors = G / V;
      for (int i = threadIdx.x; i < carried * row_vectors; i += kThreads) {
        const int b = i / row_vectors, v = i - b * row_vectors;
        reinterpret_cast<uint4*>(dg_s + b * K)[v] = __ldcg(reinterpret_cast<const uint4*>(dg_step + b * G) + v);
      }
    } else {
      for (int i = threadIdx.x; i < carried * G; i += kThreads) {
        const int b = i / G, k = i - b * G;
        copy_through_l2(dg_s + b * K + k, dg_step + static_cast<int64_t>(b) * G + k);
      }
    }
    __syncthreads();

    for (int pass = 0; pass < split.passes; ++pass) {
      const int tile = split.tile(pass);
      const int u = split.unit(tile);
      const int b0 = split.first_row(tile);
      const bool tile_live = tile < split.tiles && unit0 + u < H;
      const int kslice = split.kslice;
      float acc[RB];
#pragma unroll
      for (int r = 0; r < RB; ++r) acc[r] = 0.0f;
      if (tile_live && b0 < carried) {
        const uint4* w_vec = reinterpret_cast<const uint4*>(w_s + u * K);
        const uint4* dg_vec = reinterpret_cast<const uint4*>(dg_s + b0 * K);
        for (int kv = kslice; kv < KV; kv += split.k_split) {
          float w[V];
          unpack<scalar_t>(w_vec[kv], w);
#pragma unroll
          for (int r = 0; r < RB; ++r) {
            float d[V];
            unpack<scalar_t>(dg_vec[r * KV + kv], d);
#pragma unroll
            for (int e = 0; e < V; ++e) acc[r] = fmaf(w[e], d[e], acc[r]);
          }
        }
      }
      for (int lane_mask = split.k_split / 2; lane_mask > 0; lane_mask /= 2) {
#pragma unroll
        for (int r = 0; r < RB; ++r) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], lane_mask);
      }
      const int b = b0 + kslice;
      if (tile_live && kslice < RB && b < carried) {
        // Select with compile-time indices so acc stays in registers.
        float sum = acc[0];
#pragma unroll
        for (int r = 1; r < RB; ++r) sum = kslice == r ? acc[r] : sum;
        dh_s[b * U + u] = sum;
      }
    }
    // dh_s complete before the next step's pointwise pass reads it; dg_s free to be restaged.
    __syncthreads();
    walk.leave();
  }

  // grad_h0 and grad_c0 of the owned units (rows that never carried keep what they were given or reached).
  for (int i = threadIdx.x; i < N * U; i += kThreads) {
    const int b = i / U, unit = unit0 + i % U;
    if (unit >= H) continue;
    p.dh_state[static_cast<int64_t>(b) * H + unit] = static_cast<scalar_t>(dh_s[i]);  // i = b * U + u
    p.dc_state[static_cast<int64_t>(b) * H + unit] = static_cast<scalar_t>(dc_s[i]);
  }
}

}  // namespace persistent
}  // namespace cuda
}  // namespace fused_lstm
