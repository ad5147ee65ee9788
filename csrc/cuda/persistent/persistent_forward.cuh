// The persistent LSTM forward kernel: one cooperative launch runs every time step of one direction.
//
// Work split (H hidden units, N batch rows, U units per block, grid = ceil(H / U) blocks):
//   - block k owns hidden units [k*U, k*U + U) with all four of their gates (i, f, g, o), so the cell
//     update of a (row, unit) pair needs nothing from other blocks;
//   - its slice of W_hh, the 4U rows {g*H + unit}, is copied into shared memory once and reused at every
//     step (W_hh is the only large operand; re-reading it per step is what the standard path pays for);
//   - each step, h_{t-1} [N, H] is read from a global exchange buffer into shared memory, every block
//     computes its 4U x rows pre-activations, applies the cell, and writes its h_t columns into the other
//     half of the exchange buffer; then the grid meets at one barrier. Double buffering (read half s % 2,
//     write half (s + 1) % 2) is what makes one barrier per step enough: no block writes the half that
//     another may still be reading.
//   - the cell state c of the block's units stays in shared memory, in float32, for the whole sequence.
//
// Inside a block (kThreads threads): the outputs are tiles of 4 gate rows (one unit) x kRowsPerTile batch
// rows; k_split consecutive lanes of a warp share a tile, each summing every k_split-th 16-byte vector of
// the K = H dimension, and a butterfly of warp shuffles adds their partial sums. Lane kslice < kRowsPerTile
// of the tile then owns batch row b0 + kslice of that unit: it activates the four gates with cell_forward
// (../../lstm_cell.h, the same math as every other path) and writes every result of that (row, unit).
// The multiply-adds are float32 FMAs on values stored in the storage dtype (fp32 accumulation, as
// cuDNN); no tensor cores yet.
//
// Included by persistent.cu only.
#pragma once

#include <cstdint>

#include "../../lstm_cell.h"
#include "persistent_common.cuh"

namespace fused_lstm {
namespace cuda {
namespace persistent {

// Kernel arguments, passed by value as one __grid_constant__ struct (no device copy of the sequence
// lengths, so nothing is transferred per call and CUDA graph capture records no host memory).
// All tensors are in the storage dtype scalar_t (float, c10::Half or c10::BFloat16).
template <typename scalar_t>
struct ForwardParams {
  scalar_t* gates;             // [R, 4H], row stride 4H: input projection + biases in, post-activation
                               // gates (i, f, g, o) out
  const scalar_t* w_hh;        // [4H, H], strides (w_stride_row, w_stride_col): the recurrent weight
  int64_t w_stride_row;
  int64_t w_stride_col;
  scalar_t* c_state;           // [N, H] contiguous: c0 in, c_n out
  scalar_t* output;            // [R, H], row stride output_stride: receives h_t of each active row
  int64_t output_stride;
  scalar_t* c_prev_saved;      // [R, H] contiguous, or unused (kSaveWorkspace false): c each row started from
  scalar_t* h_prev_saved;      // [R, H] contiguous, or unused: h each row started from
  scalar_t* h_exchange;        // [2, N, padded_hidden]: h0 in half 0 (columns >= H zero), h_T in half T % 2
  int64_t total_rows;          // R = sum of the sequence lengths
  int hidden;                  // H
  int padded_hidden;           // H rounded up to a whole 16-byte vector: the row pitch of h_exchange and of
                               // both shared-memory matrices; the padding columns hold zeros
  int batch;                   // N <= kMaxBatch
  int units_per_block;         // U
  int k_split;                 // lanes per tile: 8, 16 or 32
  int steps;                   // T
  bool reverse;                // walk t = T-1 .. 0
  int lengths[kMaxBatch];      // sequence length of batch row b (non-increasing in b; all T when dense):
                               // row b is active at step t iff t < lengths[b]
};

// Shared memory of one block, in bytes: the W_hh slice [4U, P], the staged h_{t-1} [N_pad, P] (both in the
// storage dtype) and the cell state [N_pad, U] in float32. N_pad = N rounded up to kRowsPerTile.
inline size_t forward_shared_bytes(int units_per_block, int padded_hidden, int batch, size_t element_size) {
  const size_t n_pad = static_cast<size_t>(round_up(batch, kRowsPerTile));
  return (4 * static_cast<size_t>(units_per_block) + n_pad) * padded_hidden * element_size +
         n_pad * units_per_block * sizeof(float);
}

// The kernel. Template flags are compile-time so their branches vanish: kSaveWorkspace writes
// c_prev_saved / h_prev_saved (training); packed and dense input share one code path through lengths[].
// Requires a cooperative launch of exactly ceil(H / U) blocks of kThreads threads with
// forward_shared_bytes(U, P, N, sizeof(scalar_t)) bytes of dynamic shared memory, all co-resident.
template <typename scalar_t, bool kSaveWorkspace>
__global__ void __launch_bounds__(kBounds.max_threads, kBounds.min_blocks_per_sm) persistent_forward_kernel(const __grid_constant__ ForwardParams<scalar_t> p) {
  constexpr int V = kVec<scalar_t>;
  constexpr int RB = kRowsPerTile;
  const int H = p.hidden, P = p.padded_hidden, KV = P / V, N = p.batch, U = p.units_per_block;
  const int n_pad = round_up(N, RB);
  const int unit0 = blockIdx.x * U;

  // Dynamic shared memory, 16-byte aligned (declared as uint4): w_s [4U][P], h_s [n_pad][P], c_s [n_pad][U].
  // P * sizeof(scalar_t) is a multiple of 16, so every row (and h_s) starts 16-byte aligned.
  FUSED_LSTM_DYNAMIC_SHARED(uint4, smem);
  scalar_t* w_s = reinterpret_cast<scalar_t*>(smem);
  scalar_t* h_s = w_s + 4 * U * P;
  float* c_s = reinterpret_cast<float*>(h_s + n_pad * P);
  const scalar_t zero = static_cast<scalar_t>(0.0f);

  // --- Once: this block's W_hh rows (row 4u + g of w_s is gate g of unit unit0 + u), zero padding columns
  // and rows past H; h_s zeroed (rows >= N stay zero for good, so tiles that straddle N compute on zeros);
  // c of the owned units from c_state.
  for (int i = threadIdx.x; i < 4 * U * P; i += kThreads) {
    const int row = i / P, k = i - row * P;
    const int unit = unit0 + row / 4, gate = row % 4;
    w_s[i] = (unit < H && k < H)
                 ? p.w_hh[static_cast<int64_t>(gate * H + unit) * p.w_stride_row + static_cast<int64_t>(k) * p.w_stride_col]
                 : zero;
  }
  for (int i = threadIdx.x; i < n_pad * P; i += kThreads) h_s[i] = zero;
  for (int i = threadIdx.x; i < n_pad * U; i += kThreads) {
    const int b = i / U, unit = unit0 + i % U;
    c_s[i] = (b < N && unit < H) ? static_cast<float>(p.c_state[static_cast<int64_t>(b) * H + unit]) : 0.0f;
  }
  __syncthreads();  // the zeroed h_s before the first staging (other threads overwrite parts of it)

  // Static tile assignment: the same thread owns the same (row, unit) pairs at every step, so c_s entries
  // are only ever touched by one thread.
  const int k_split = p.k_split;
  const int kslice = threadIdx.x & (k_split - 1);
  const int group = threadIdx.x / k_split;
  const int groups = kThreads / k_split;
  const int row_tiles = n_pad / RB;
  const int tiles = U * row_tiles;
  const int passes = (tiles + groups - 1) / groups;

  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  StepWalk walk(/*walk_descending=*/p.reverse, N, p.total_rows);
  for (int s = 0; s < p.steps; ++s) {
    const int t = p.reverse ? p.steps - 1 - s : s;
    walk.enter(t, p.lengths, N);
    const int rows = walk.rows;
    const int64_t offset = walk.offset;
    const scalar_t* h_cur = p.h_exchange + static_cast<int64_t>(s & 1) * N * P;   // h_{t-1}, read only
    scalar_t* h_next = p.h_exchange + static_cast<int64_t>((s + 1) & 1) * N * P;  // h_t, our columns only

    // Stage h_{t-1} of the rows any tile reads this step (whole tiles, clipped at N), 16 bytes at a time,
    // through L2. h_s and h_cur share the row pitch P, so the vector index maps one to one.
    const int staged_vectors = min(N, round_up(rows, RB)) * KV;
    for (int i = threadIdx.x; i < staged_vectors; i += kThreads) {
      reinterpret_cast<uint4*>(h_s)[i] = __ldcg(reinterpret_cast<const uint4*>(h_cur) + i);
    }
    __syncthreads();

    // Every thread runs every pass (passes is uniform), so the full-warp shuffles below never diverge.
    for (int pass = 0; pass < passes; ++pass) {
      const int tile = group + pass * groups;
      const int u = tile / row_tiles;          // local unit
      const int b0 = (tile % row_tiles) * RB;  // first batch row of the tile
      const int unit = unit0 + u;
      const bool tile_live = tile < tiles && unit < H;
      const int b = b0 + kslice;  // the row this lane finishes when kslice < RB
      const bool finishes = tile_live && kslice < RB && b < N;
      const bool active = finishes && b < rows;

      // The input-projection part of this lane's pre-activations: loaded before the dot products, so the
      // global-memory latency overlaps them.
      float pre[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      scalar_t* const gate_row = p.gates + (offset + b) * 4 * H + unit;  // used only when active
      if (active) {
#pragma unroll
        for (int g = 0; g < 4; ++g) pre[g] = static_cast<float>(gate_row[g * H]);
      }

      // acc[g][r] = partial sum over this lane's k vectors of W_hh[g*H + unit, k] * h_{t-1}[b0 + r, k].
      float acc[4][RB];
#pragma unroll
      for (int g = 0; g < 4; ++g) {
#pragma unroll
        for (int r = 0; r < RB; ++r) acc[g][r] = 0.0f;
      }
      if (tile_live && b0 < rows) {
        // Lanes of a tile read consecutive 16-byte vectors of one row: bank-conflict free for k_split >= 8.
        const uint4* w_vec = reinterpret_cast<const uint4*>(w_s + 4 * u * P);  // 4 rows of KV vectors
        const uint4* h_vec = reinterpret_cast<const uint4*>(h_s + b0 * P);     // RB rows of KV vectors
        for (int kv = kslice; kv < KV; kv += k_split) {
          float w[4][V];
#pragma unroll
          for (int g = 0; g < 4; ++g) unpack<scalar_t>(w_vec[g * KV + kv], w[g]);
#pragma unroll
          for (int r = 0; r < RB; ++r) {
            float h[V];
            unpack<scalar_t>(h_vec[r * KV + kv], h);
#pragma unroll
            for (int g = 0; g < 4; ++g) {
#pragma unroll
              for (int e = 0; e < V; ++e) acc[g][r] = fmaf(w[g][e], h[e], acc[g][r]);
            }
          }
        }
      }
      // Butterfly over the k_split lanes of the tile (aligned groups inside one warp): afterwards every lane
      // of the tile holds the full sums, in a fixed order, so results are bitwise reproducible.
      for (int lane_mask = k_split / 2; lane_mask > 0; lane_mask /= 2) {
#pragma unroll
        for (int g = 0; g < 4; ++g) {
#pragma unroll
          for (int r = 0; r < RB; ++r) acc[g][r] += __shfl_xor_sync(0xffffffffu, acc[g][r], lane_mask);
        }
      }

      if (active) {
        // This lane's row is r = kslice; select with compile-time indices so acc stays in registers.
#pragma unroll
        for (int g = 0; g < 4; ++g) {
          float sum = acc[g][0];
#pragma unroll
          for (int r = 1; r < RB; ++r) sum = kslice == r ? acc[g][r] : sum;
          pre[g] += sum;
        }
        const int64_t row = offset + b;
        float* const c_cell = c_s + b * U + u;
        const float c = *c_cell;
        float c_next, h_t;
        const Gates<float> gate = cell_forward<float>(pre[0], pre[1], pre[2], pre[3], c, &c_next, &h_t);
        gate_row[0] = static_cast<scalar_t>(gate.i);
        gate_row[H] = static_cast<scalar_t>(gate.f);
        gate_row[2 * H] = static_cast<scalar_t>(gate.g);
        gate_row[3 * H] = static_cast<scalar_t>(gate.o);
        *c_cell = c_next;
        const scalar_t h_stored = static_cast<scalar_t>(h_t);
        h_next[b * P + unit] = h_stored;
        p.output[row * p.output_stride + unit] = h_stored;
        if constexpr (kSaveWorkspace) {
          p.c_prev_saved[row * H + unit] = static_cast<scalar_t>(c);
          p.h_prev_saved[row * H + unit] = h_s[b * P + unit];  // staged: b < rows
        }
      } else if (finishes) {
        // A row that has finished (forward) or not yet started (reverse) keeps its h: carry it into the
        // half the next step reads. (Its c simply stays in c_s.)
        copy_through_l2(h_next + b * P + unit, h_cur + b * P + unit);
      }
    }
    // Publishes this step's h_t columns to every block (grid.sync fences memory at device scope) and
    // guarantees everyone finished reading h_cur and h_s before the next step overwrites them.
    grid.sync();
    walk.leave();
  }

  // c_n of the owned units. (h_n is the exchange half T % 2, copied out by the host code after the kernel.)
  for (int i = threadIdx.x; i < N * U; i += kThreads) {
    const int b = i / U, unit = unit0 + i % U;
    if (unit < H) p.c_state[static_cast<int64_t>(b) * H + unit] = static_cast<scalar_t>(c_s[i]);
  }
}

}  // namespace persistent
}  // namespace cuda
}  // namespace fused_lstm
