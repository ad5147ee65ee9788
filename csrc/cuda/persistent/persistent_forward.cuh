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
// Inside a block (kThreads threads), each step is: stage h_{t-1}; the product pre[4U, N] = W_hh slice @ h^T
// into shared memory; the pointwise pass (cell_forward from ../../lstm_cell.h, the same math as every other
// path) over the block's (row, unit) pairs. The product comes in two variants (Product below), chosen by the
// plan's cost model:
//   - Fma: tiles of 4 gate rows (one unit) x kRowsPerTile batch rows; k_split consecutive lanes of a warp
//     share a tile, each summing every k_split-th 16-byte vector of K = H, and a butterfly of warp shuffles
//     adds their partial sums in a fixed order. float32 FMAs on storage-dtype values. Cheapest at small N.
//   - Mma: tensor cores through the WMMA fragment API (which the CUDA emulator runs too): 16 x 16 output
//     tiles per warp, m16n16k16 for fp16 / bf16 inputs, m16n16k8 TF32 for float32 (only when TF32 is allowed,
//     as for cuDNN), float32 accumulation. The batch is padded to 16 rows and the units to multiples of 4.
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
  const scalar_t* w_hr;        // [Hout, H], strides (wr_stride_row, wr_stride_col), kProject only: the projection
  int64_t wr_stride_row;
  int64_t wr_stride_col;
  scalar_t* c_state;           // [N, H] contiguous: c0 in, c_n out
  scalar_t* output;            // [R, Hout], row stride output_stride: receives h_t of each active row
  int64_t output_stride;
  scalar_t* c_prev_saved;      // [R, H] contiguous, or unused (kSaveWorkspace false): c each row started from
  scalar_t* h_prev_saved;      // [R, Hout] contiguous, or unused: h each row started from
  scalar_t* h_exchange;        // [2, N, padded_hidden]: h0 in half 0 (columns >= Hout zero), h_T in half T % 2
  scalar_t* h_raw;             // [N, padded_raw], kProject only: h'_t before W_hr (one buffer; finite from the start)
  int64_t total_rows;          // R = sum of the sequence lengths
  int hidden;                  // H
  int out_hidden;              // Hout: the projection's size, or H without one (the columns of h and the output)
  int padded_hidden;           // P: Hout rounded up to a whole 16-byte vector (Mma: to the k step): the row pitch
                               // of h_exchange, w_s and the staged h; padding columns hold zeros
  int padded_raw;              // Hr: H rounded up to a whole 16-byte vector (kProject): the pitch of h_raw and wr_s
  int outs_per_block;          // V (kProject): the columns of h_t = h'_t @ W_hr^T a block computes
  int proj_k_split;            // lanes per tile of the projection product (kProject)
  int batch;                   // N <= kMaxBatch
  int padded_batch;            // N_pad: N rounded up to kRowsPerTile (Fma) or 16 (Mma)
  int units_per_block;         // U
  int k_split;                 // lanes per tile: 8, 16 or 32
  int steps;                   // T
  bool reverse;                // walk t = T-1 .. 0
  int lengths[kMaxBatch];      // sequence length of batch row b (non-increasing in b; all T when dense):
                               // row b is active at step t iff t < lengths[b]
};

// Shared memory of one block, in bytes: the W_hh slice [4U, P] and the staging buffer (h_{t-1} [N_pad, P], two
// of them for the Cluster exchange's double buffer; with a projection on the Grid exchange [N_pad, max(P, Hr)],
// since it also stages h'_t [N, Hr]; on the Cluster exchange a buffer of its own, [N_pad, Hr], that every block
// writes its h'_t columns into) in the storage dtype, the step's products [4U, N_pad] and the cell state
// [N_pad, U] in float32, then the W_hr slice [V, Hr] in the storage dtype (projection only: padded_raw > 0).
__host__ __device__ inline size_t forward_staged_elements(int padded_hidden, int padded_batch, bool cluster,
                                                          int padded_raw) {
  const size_t n_pad = static_cast<size_t>(padded_batch), p = static_cast<size_t>(padded_hidden);
  const size_t raw = static_cast<size_t>(padded_raw);
  if (cluster) return n_pad * (2 * p + raw);
  return n_pad * (raw > p ? raw : p);
}
inline size_t forward_shared_bytes(int units_per_block, int padded_hidden, int padded_batch, size_t element_size,
                                   bool cluster = false, int outs_per_block = 0, int padded_raw = 0) {
  const size_t u = static_cast<size_t>(units_per_block), n_pad = static_cast<size_t>(padded_batch);
  return (4 * u * padded_hidden + forward_staged_elements(padded_hidden, padded_batch, cluster, padded_raw) +
          static_cast<size_t>(outs_per_block) * padded_raw) * element_size +
         (4 * u * n_pad + n_pad * u) * sizeof(float);
}

// pre_s[4U, N_pad] (row 4u + g: gate g of local unit u; row pitch N_pad) = w_s[4U, P] @ h_s[N_pad, P]^T by
// float32 FMAs, for the tiles with a row below `rows` (the others are not read this step).
template <typename scalar_t>
__device__ __forceinline__ void product_fma(const scalar_t* w_s, const scalar_t* h_s, float* pre_s, int U, int P,
                                            int n_pad, int rows, int k_split) {
  constexpr int V = kVec<scalar_t>;
  constexpr int RB = kRowsPerTile;
  const int KV = P / V;
  const TileSplit split(k_split, U, n_pad);
  const int kslice = split.kslice;
  for (int pass = 0; pass < split.passes; ++pass) {
    const int tile = split.tile(pass);
    const int u = split.unit(tile);
    const int b0 = split.first_row(tile);
    const bool live = tile < split.tiles && b0 < rows;
    // acc[g][r] = partial sum over this lane's k vectors of W_hh[g*H + unit, k] * h_{t-1}[b0 + r, k].
    float acc[4][RB];
#pragma unroll
    for (int g = 0; g < 4; ++g) {
#pragma unroll
      for (int r = 0; r < RB; ++r) acc[g][r] = 0.0f;
    }
    if (live) {
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
    for (int lane_mask = split.k_split / 2; lane_mask > 0; lane_mask /= 2) {
#pragma unroll
      for (int g = 0; g < 4; ++g) {
#pragma unroll
        for (int r = 0; r < RB; ++r) acc[g][r] += __shfl_xor_sync(0xffffffffu, acc[g][r], lane_mask);
      }
    }
    // Lane kslice < RB stores row b0 + kslice; select with compile-time indices so acc stays in registers.
    if (live && kslice < RB) {
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        float sum = acc[g][0];
#pragma unroll
        for (int r = 1; r < RB; ++r) sum = kslice == r ? acc[g][r] : sum;
        pre_s[(4 * u + g) * n_pad + b0 + kslice] = sum;
      }
    }
  }
}

// The kernel. Template flags are compile-time so their branches vanish: kSaveWorkspace writes
// c_prev_saved / h_prev_saved (training); kProduct picks the product's variant and kExchange how blocks share
// h_t; kProject adds the projection (proj_size, below); packed and dense input share one code path through
// lengths[]. Requires exactly ceil(H / U) blocks of kThreads threads with forward_shared_bytes(U, P, N_pad,
// sizeof(scalar_t), Cluster, V, kProject ? Hr : 0) bytes of dynamic shared memory, all co-resident: a cooperative
// launch (Grid) or one cluster of that many blocks (Cluster).
//
// With a projection (W_hr [Hout, H]) h_t = h'_t @ W_hr^T, where h'_t = o * tanh(c_t) is what the pointwise pass
// makes. The exchange carries h_t (Hout columns: K = Hout for the W_hh product), and each step has two phases
// with a barrier after each:
//   (1) as without a projection, but the pointwise pass publishes h'_t of the block's units instead of h_t: into
//       the global buffer h_raw [N, H] (Grid) or into every block's shared copy of it (Cluster); barrier;
//   (2) every block stages h'_t [rows, H] (Grid; in a cluster it is already in shared memory) and computes its V
//       columns [k*V, k*V + V) of h_t from its W_hr rows (on chip, [V, H]), publishing them like h_t without a
//       projection, and writing the output (row_product_fma); rows past their sequence carry h_t; barrier.
// h'_t needs one buffer: phase 1 of step s+1 writes it only after the barrier that ends phase 2 of step s.
template <typename scalar_t, bool kSaveWorkspace, Product kProduct, Exchange kExchange = Exchange::Grid,
          bool kProject = false>
__global__ void __launch_bounds__(kBounds.max_threads, kBounds.min_blocks_per_sm)
    persistent_forward_kernel(const __grid_constant__ ForwardParams<scalar_t> p) {
  constexpr bool kCluster = kExchange == Exchange::Cluster;
  constexpr int RB = kRowsPerTile;
  const int H = p.hidden, P = p.padded_hidden, KV = P / kVec<scalar_t>, N = p.batch, U = p.units_per_block;
  const int HO = kProject ? p.out_hidden : H;
  const int n_pad = p.padded_batch;
  const int unit0 = blockIdx.x * U;

  // Dynamic shared memory (gpu_runtime.h: 128-byte aligned; declared as uint4): w_s [4U][P], h_s [1 or 2][n_pad][P] (kProject:
  // Grid [n_pad][max(P, Hr)], also staging h'_t at pitch Hr; Cluster [2][n_pad][P] then hr_s [n_pad][Hr]),
  // pre_s [4U][n_pad], c_s [n_pad][U], wr_s [V][Hr] (kProject). P * sizeof(scalar_t) is a multiple of 16 (Mma:
  // 32), so rows start aligned.
  FUSED_LSTM_DYNAMIC_SHARED(uint4, smem);
  const int staged_elements =
      static_cast<int>(forward_staged_elements(P, n_pad, kCluster, kProject ? p.padded_raw : 0));
  scalar_t* w_s = reinterpret_cast<scalar_t*>(smem);
  scalar_t* h_s = w_s + 4 * U * P;
  float* pre_s = reinterpret_cast<float*>(h_s + staged_elements);
  float* c_s = pre_s + 4 * U * n_pad;
  scalar_t* wr_s = reinterpret_cast<scalar_t*>(c_s + n_pad * U);
  scalar_t* hr_s = h_s + (kCluster ? 2 * n_pad * P : 0);  // where phase 2 reads h'_t (kProject)
  const scalar_t zero = static_cast<scalar_t>(0.0f);

  // --- Once: this block's W_hh rows (row 4u + g of w_s is gate g of unit unit0 + u), zero padding columns
  // and rows past H; h_s zeroed (without a projection rows >= N stay zero for good, so tiles that straddle N
  // compute on zeros; with one they hold staged h' values, finite, whose sums are dropped); c of the owned units
  // from c_state; kProject: row j of wr_s is row out0 + j of W_hr.
  for (int i = threadIdx.x; i < 4 * U * P; i += kThreads) {
    const int row = i / P, k = i - row * P;
    const int unit = unit0 + row / 4, gate = row % 4;
    w_s[i] = (unit < H && k < HO)
                 ? p.w_hh[static_cast<int64_t>(gate * H + unit) * p.w_stride_row + static_cast<int64_t>(k) * p.w_stride_col]
                 : zero;
  }
  if constexpr (kProject) {
    load_weight_rows(wr_s, p.outs_per_block, p.padded_raw, p.w_hr, p.wr_stride_row, p.wr_stride_col,
                     static_cast<int>(blockIdx.x) * p.outs_per_block, HO, H);
  }
  for (int i = threadIdx.x; i < staged_elements; i += kThreads) h_s[i] = zero;
  for (int i = threadIdx.x; i < n_pad * U; i += kThreads) {
    const int b = i / U, unit = unit0 + i % U;
    c_s[i] = (b < N && unit < H) ? static_cast<float>(p.c_state[static_cast<int64_t>(b) * H + unit]) : 0.0f;
  }
  __syncthreads();  // the zeroed h_s before the first staging (other threads overwrite parts of it)
  if constexpr (kCluster) {
    // Every block holds all of h0 (whole rows, padding zero); then the cluster meets, so that no block's
    // first h_t lands in a buffer another block is still zeroing.
    for (int i = threadIdx.x; i < N * KV; i += kThreads) {
      reinterpret_cast<uint4*>(h_s)[i] = __ldcg(reinterpret_cast<const uint4*>(p.h_exchange) + i);
    }
    step_barrier<kExchange>();
  }

  StepWalk walk(/*walk_descending=*/p.reverse, N, p.total_rows);
  for (int s = 0; s < p.steps; ++s) {
    const int t = p.reverse ? p.steps - 1 - s : s;
    walk.enter(t, p.lengths, N);
    const int rows = walk.rows;
    const int64_t offset = walk.offset;
    // h_{t-1} and where h_t goes: Grid, the global exchange halves s % 2 and (s + 1) % 2 (our columns only);
    // Cluster, this block's shared buffers of the same parity (every block's, through distributed shared memory).
    const scalar_t* h_cur = p.h_exchange + static_cast<int64_t>(s & 1) * N * P;
    scalar_t* h_next = p.h_exchange + static_cast<int64_t>((s + 1) & 1) * N * P;
    scalar_t* h_cur_s = h_s + (kCluster ? (s & 1) * n_pad * P : 0);
    scalar_t* h_next_s = h_s + (kCluster ? ((s + 1) & 1) * n_pad * P : 0);

    if constexpr (!kCluster) {
      // Stage h_{t-1} of the rows any Fma tile reads this step (whole tiles, clipped at N), 16 bytes at a
      // time, through L2. h_s and h_cur share the row pitch P, so the vector index maps one to one.
      const int staged_vectors = min(N, round_up(rows, RB)) * KV;
      for (int i = threadIdx.x; i < staged_vectors; i += kThreads) {
        reinterpret_cast<uint4*>(h_s)[i] = __ldcg(reinterpret_cast<const uint4*>(h_cur) + i);
      }
      __syncthreads();
    }

    if constexpr (kProduct == Product::Mma) {
      product_mma<scalar_t>(w_s, 4 * U, h_cur_s, P, pre_s, n_pad, rows);
    } else {
      product_fma<scalar_t>(w_s, h_cur_s, pre_s, U, P, n_pad, rows, p.k_split);
    }
    __syncthreads();  // pre_s complete

    // Pointwise pass over the block's (row, unit) pairs: active rows advance their cell; a row that has
    // finished (forward) or not yet started (reverse) keeps its h, carried into the half the next step reads
    // (its c simply stays in c_s).
    for (int i = threadIdx.x; i < N * U; i += kThreads) {
      const int b = i / U, u = i - b * U, unit = unit0 + u;
      if (unit >= H) continue;
      if (b >= rows) {
        if constexpr (kProject) {
          // h_t is carried in phase 2 (its columns are not this block's units).
        } else if constexpr (kCluster) {
          publish<scalar_t, kExchange>(h_next, h_next_s, b * P + unit, h_cur_s[b * P + unit]);
        } else {
          copy_through_l2(h_next + b * P + unit, h_cur + b * P + unit);
        }
        continue;
      }
      const int64_t row = offset + b;
      scalar_t* const gate_row = p.gates + row * 4 * H + unit;
      float pre[4];
#pragma unroll
      for (int g = 0; g < 4; ++g) pre[g] = static_cast<float>(gate_row[g * H]) + pre_s[(4 * u + g) * n_pad + b];
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
      if constexpr (kSaveWorkspace) p.c_prev_saved[row * H + unit] = static_cast<scalar_t>(c);
      if constexpr (kProject) {
        publish<scalar_t, kExchange>(p.h_raw, hr_s, b * p.padded_raw + unit, h_stored);  // h'_t, for phase 2
      } else {
        publish<scalar_t, kExchange>(h_next, h_next_s, b * P + unit, h_stored);
        p.output[row * p.output_stride + unit] = h_stored;
        if constexpr (kSaveWorkspace) p.h_prev_saved[row * H + unit] = h_cur_s[b * P + unit];  // staged or held
      }
    }
    if constexpr (kProject) {
      // Phase 2: h_t = h'_t @ W_hr^T for this block's columns [out0, out0 + V) of Hout.
      const int V = p.outs_per_block, Hr = p.padded_raw, out0 = blockIdx.x * V;
      const int live_outs = max(0, min(V, HO - out0));
      if constexpr (kSaveWorkspace) {
        // h_{t-1} of the active rows, from the staged copy (b < rows), before phase 2 restages h_s.
        for (int i = threadIdx.x; i < rows * V; i += kThreads) {
          const int b = i / V, j = i - b * V;
          if (j < live_outs) p.h_prev_saved[(offset + b) * HO + out0 + j] = h_cur_s[b * P + out0 + j];
        }
      }
      step_barrier<kExchange>();  // h'_t of every unit published (h_raw, or every block's hr_s)
      if constexpr (!kCluster) {
        // Stage h'_t of the rows any tile reads (whole tiles, clipped at N), through L2: other SMs wrote it.
        const int raw_vectors = min(N, round_up(rows, RB)) * (Hr / kVec<scalar_t>);
        for (int i = threadIdx.x; i < raw_vectors; i += kThreads) {
          reinterpret_cast<uint4*>(h_s)[i] = __ldcg(reinterpret_cast<const uint4*>(p.h_raw) + i);
        }
        __syncthreads();
      }
      row_product_fma<scalar_t>(wr_s, hr_s, V, live_outs, Hr, n_pad, rows, p.proj_k_split,
                                [&](int j, int b, float sum) {
                                  const scalar_t h_stored = static_cast<scalar_t>(sum);
                                  publish<scalar_t, kExchange>(h_next, h_next_s, b * P + out0 + j, h_stored);
                                  p.output[(offset + b) * p.output_stride + out0 + j] = h_stored;
                                });
      // Rows past their sequence keep their h: carried into the half the next step reads.
      for (int i = threadIdx.x; i < (N - rows) * V; i += kThreads) {
        const int b = rows + i / V, j = i % V;
        if (j >= live_outs) continue;
        if constexpr (kCluster) {
          publish<scalar_t, kExchange>(h_next, h_next_s, b * P + out0 + j, h_cur_s[b * P + out0 + j]);
        } else {
          copy_through_l2(h_next + b * P + out0 + j, h_cur + b * P + out0 + j);
        }
      }
    }
    // Publishes this step's h_t columns to every block and guarantees everyone finished reading h_{t-1},
    // h_s and pre_s before the next step overwrites them.
    step_barrier<kExchange>();
    walk.leave();
  }
  if constexpr (kCluster) {
    // h_n of the owned columns (kProject: of Hout, else the owned units) into the exchange half T % 2, where the
    // host code reads it as for Grid.
    const int last = p.steps & 1;
    const int cols = kProject ? p.outs_per_block : U, col0 = blockIdx.x * cols;
    for (int i = threadIdx.x; i < N * cols; i += kThreads) {
      const int b = i / cols, col = col0 + i % cols;
      if (col < HO) p.h_exchange[static_cast<int64_t>(last) * N * P + b * P + col] = h_s[last * n_pad * P + b * P + col];
    }
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
