// What the persistent kernels (persistent_forward.cuh, persistent_backward.cuh) share: block shape, tile
// shape, the 16-byte vector loads of storage-dtype values, the copy through L2 and the walk over the steps of
// a packed sequence.
//
// Included by the persistent kernel headers only.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "../gpu_runtime.h"

namespace fused_lstm {
namespace cuda {
namespace persistent {

// Threads per block: 8 warps. Enough to hide shared-memory latency in the FMA loop and to keep up to
// 256 / k_split tiles in flight; one block per SM is the usual case (the weight slice fills the shared
// memory), so the register limit __launch_bounds__(kThreads, 1) allows (255) costs no occupancy.
constexpr int kThreads = 256;
constexpr gpu::LaunchBounds kBounds{kThreads, 1};
// Batch rows per call the kernels support: the per-row sequence lengths travel in the kernel parameters
// and the staged rows must fit in shared memory next to the weights.
constexpr int kMaxBatch = 64;
// Batch rows per register tile (forward: with the 4 gates of one unit, 16 accumulators per thread).
constexpr int kRowsPerTile = 4;

__host__ __device__ constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Elements of scalar_t in one 16-byte vector.
template <typename scalar_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));

__device__ __forceinline__ float2 pair_to_float2(__half2 pair) { return __half22float2(pair); }
__device__ __forceinline__ float2 pair_to_float2(__nv_bfloat162 pair) { return __bfloat1622float2(pair); }

// One 16-byte vector of storage-dtype values -> kVec floats.
template <typename scalar_t>
__device__ __forceinline__ void unpack(const uint4& v, float (&out)[kVec<scalar_t>]) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    out[0] = __uint_as_float(v.x);
    out[1] = __uint_as_float(v.y);
    out[2] = __uint_as_float(v.z);
    out[3] = __uint_as_float(v.w);
  } else {
    static_assert(std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>,
                  "persistent kernel: float, Half or BFloat16");
    // Half and BFloat16 differ only in the pair type and its conversion (pair_to_float2 above).
    using Pair = std::conditional_t<std::is_same_v<scalar_t, c10::Half>, __half2, __nv_bfloat162>;
    const Pair* pairs = reinterpret_cast<const Pair*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = pair_to_float2(pairs[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
}

// Copies one storage element through L2 (ld.global.cg): the exchange buffer is written by other SMs, and
// L1 is not coherent, so its reads must never be served from a line this SM cached two steps earlier.
template <typename scalar_t>
__device__ __forceinline__ void copy_through_l2(scalar_t* dst, const scalar_t* src) {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 2, unsigned short, unsigned int>;
  *reinterpret_cast<bits_t*>(dst) = __ldcg(reinterpret_cast<const bits_t*>(src));
}

// The steps of one direction's sequence, walked in either order. Active rows are a prefix [0, rows) (lengths
// are sorted, longest first), and the rows of step t start at offset = the sum of the active rows of the
// steps before t. Both advance incrementally, identically in every thread: walking t upwards, rows only
// shrink; downwards, rows only grow.
struct StepWalk {
  bool descending;
  int rows;
  int64_t offset;

  __device__ StepWalk(bool walk_descending, int batch, int64_t total_rows)
      : descending(walk_descending), rows(walk_descending ? 0 : batch), offset(walk_descending ? total_rows : 0) {}

  // Before step t: rows and offset of step t.
  __device__ void enter(int t, const int* lengths, int batch) {
    if (descending) {
      while (rows < batch && lengths[rows] > t) ++rows;
      offset -= rows;
    } else {
      while (rows > 0 && lengths[rows - 1] <= t) --rows;
    }
  }
  // After step t.
  __device__ void leave() {
    if (!descending) offset += rows;
  }
};

// How a block's threads share the product's output tiles (one hidden unit x kRowsPerTile batch rows each):
// k_split consecutive lanes of a warp take one tile, each summing every k_split-th 16-byte vector of the
// reduction, and the block walks its tiles in `passes` rounds of `groups` tiles. The same thread has the same
// tiles at every step. passes is the same for every thread, so warp shuffles inside a pass never diverge.
struct TileSplit {
  int k_split, kslice, group, groups, row_tiles, tiles, passes;

  __device__ TileSplit(int lanes_per_tile, int units, int padded_batch)
      : k_split(lanes_per_tile),
        kslice(static_cast<int>(threadIdx.x) & (lanes_per_tile - 1)),
        group(static_cast<int>(threadIdx.x) / lanes_per_tile),
        groups(kThreads / lanes_per_tile),
        row_tiles(padded_batch / kRowsPerTile),
        tiles(units * (padded_batch / kRowsPerTile)),
        passes((units * (padded_batch / kRowsPerTile) + kThreads / lanes_per_tile - 1) / (kThreads / lanes_per_tile)) {}

  __device__ int tile(int pass) const { return group + pass * groups; }
  __device__ int unit(int tile) const { return tile / row_tiles; }             // local unit
  __device__ int first_row(int tile) const { return (tile % row_tiles) * kRowsPerTile; }
};

// How the blocks exchange what every block needs each step (forward h_t, backward the step's d_gates) and meet:
//   Grid:    a cooperative grid of any size; through global memory (read through L2) and one grid.sync per
//            step.
//   Cluster: one thread-block cluster (sm_90, at most kMaxClusterBlocks blocks) holds the whole W_hh; each
//            block writes its columns straight into every block's shared memory (distributed shared memory,
//            double-buffered) and the cluster meets at cluster.sync, a third of a grid barrier's cost: nothing
//            is staged from L2.
enum class Exchange { Grid, Cluster };
// The most blocks a cluster may hold: 16 on sm_90 with cudaFuncAttributeNonPortableClusterSizeAllowed (8 is the
// portable size); the plan asks the device how many it can run (gpu::max_cluster_blocks) and takes at most that.
constexpr int kMaxClusterBlocks = 16;

// Writes one element into the same place of the shared buffer `shared` of every block of the cluster (distributed
// shared memory).
template <typename scalar_t>
__device__ __forceinline__ void publish_to_cluster(scalar_t* shared, int64_t index, scalar_t value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // clusters need sm_90; the plan never picks this exchange below it
#else
  const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  for (unsigned rank = 0; rank < cluster.num_blocks(); ++rank) cluster.map_shared_rank(shared, rank)[index] = value;
#endif
}

// Writes one exchanged element of h_t (or h'_t) where the next phase reads it: the global buffer (Grid), or the same
// place in the shared buffer of every block of the cluster (Cluster).
template <typename scalar_t, Exchange kExchange>
__device__ __forceinline__ void publish(scalar_t* global, scalar_t* shared, int64_t index, scalar_t value) {
  if constexpr (kExchange == Exchange::Grid) {
    global[index] = value;
  } else {
    publish_to_cluster(shared, index, value);
  }
}

// The step's barrier: publishes what was exchanged to every block and keeps anyone from overwriting what another
// still reads.
template <Exchange kExchange>
__device__ __forceinline__ void step_barrier() {
  if constexpr (kExchange == Exchange::Grid) {
    cooperative_groups::this_grid().sync();  // fences memory at device scope
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
    __trap();
#else
    cooperative_groups::this_cluster().sync();  // release / acquire at cluster scope, shared memory included
#endif
  }
}

// How a block computes a step's recurrent product (forward: h @ W_hh^T; backward: d_gates @ W_hh): float32 FMAs
// or tensor cores.
enum class Product { Fma, Mma };

// The Mma variant's fragment shape for a storage dtype: its k step and the element type WMMA loads.
template <typename scalar_t>
struct MmaTraits {
  static constexpr int kStep = 16;
  using element = std::conditional_t<std::is_same_v<scalar_t, c10::Half>, __half, __nv_bfloat16>;
  using fragment_type = element;
};
template <>
struct MmaTraits<float> {
  static constexpr int kStep = 8;
  using element = float;
  using fragment_type = nvcuda::wmma::precision::tf32;
};

// The tensor-core product (the Mma variant): out_s[M, N_pad] (row pitch N_pad) = w_s[M, P] @ x_s[N_pad, P]^T, each
// warp computing 16 x 16 tiles over P in k steps, float32 accumulation. Forward: M = 4U gate rows against the
// staged h; backward: M = the dh columns (padded to 16) against the staged d_gates. Requires M and N_pad multiples
// of 16, P a multiple of the k step, and 32-byte aligned shared matrices (the plans' padding and the kernels'
// shared layouts provide them). Only the tiles of batch rows below `rows` are computed (every output of those
// padded tiles is written); the callers read no other row.
template <typename scalar_t>
__device__ __forceinline__ void product_mma(const scalar_t* w_s, int m_rows, const scalar_t* x_s, int P, float* out_s,
                                            int n_pad, int rows) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 and TF32 fragments need sm_80; the plan never picks this variant below it
#else
  namespace wmma = nvcuda::wmma;
  using Traits = MmaTraits<scalar_t>;
  using element = typename Traits::element;
  constexpr int KS = Traits::kStep;
  const element* w = reinterpret_cast<const element*>(w_s);
  const element* x = reinterpret_cast<const element*>(x_s);
  const int m_tiles = m_rows / 16, n_tiles = min(n_pad, round_up(rows, 16)) / 16;
  // Whole warps take whole tiles, so every lane of a warp makes the same collective calls.
  for (int tile = threadIdx.x / 32; tile < m_tiles * n_tiles; tile += kThreads / 32) {
    const int m = tile / n_tiles, n = tile - m * n_tiles;
    wmma::fragment<wmma::accumulator, 16, 16, KS, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int k = 0; k < P; k += KS) {
      wmma::fragment<wmma::matrix_a, 16, 16, KS, typename Traits::fragment_type, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, KS, typename Traits::fragment_type, wmma::col_major> b;
      wmma::load_matrix_sync(a, w + m * 16 * P + k, P);  // 16 weight rows x KS
      wmma::load_matrix_sync(b, x + n * 16 * P + k, P);  // x^T: KS x 16 batch rows, column-major
      if constexpr (std::is_same_v<scalar_t, float>) {
        for (int i = 0; i < a.num_elements; ++i) a.x[i] = wmma::__float_to_tf32(a.x[i]);
        for (int i = 0; i < b.num_elements; ++i) b.x[i] = wmma::__float_to_tf32(b.x[i]);
      }
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(out_s + m * 16 * n_pad + n * 16, acc, n_pad, wmma::mem_row_major);
  }
#endif
}

// out[u][b] = sum over k of w_s[u, k] * x_s[b, k] (float32 FMAs on storage-dtype values) for the weight rows
// u < live_units and the batch rows b < rows, handed to store(u, b, sum); w_s holds `units` rows, x_s n_pad rows,
// both of pitch K (a whole number of 16-byte vectors, padding columns zero in w_s). Tiles are one weight row x
// kRowsPerTile batch rows shared by k_split lanes (TileSplit); rows of a live tile at or past `rows` are summed
// over whatever x_s holds there (finite values: staged earlier or zeroed) and dropped. The order of every sum
// is fixed, so results are bitwise reproducible. Used by the backward's dh product and by the projection
// products (forward h' @ W_hr^T, backward dh @ W_hr).
template <typename scalar_t, typename Store>
__device__ __forceinline__ void row_product_fma(const scalar_t* w_s, const scalar_t* x_s, int units, int live_units,
                                                int K, int n_pad, int rows, int k_split, Store store) {
  constexpr int V = kVec<scalar_t>;
  constexpr int RB = kRowsPerTile;
  const int KV = K / V;
  const TileSplit split(k_split, units, n_pad);
  const int kslice = split.kslice;
  for (int pass = 0; pass < split.passes; ++pass) {
    const int tile = split.tile(pass);
    const int u = split.unit(tile);
    const int b0 = split.first_row(tile);
    const bool tile_live = tile < split.tiles && u < live_units;
    float acc[RB];
#pragma unroll
    for (int r = 0; r < RB; ++r) acc[r] = 0.0f;
    if (tile_live && b0 < rows) {
      const uint4* w_vec = reinterpret_cast<const uint4*>(w_s + u * K);
      const uint4* x_vec = reinterpret_cast<const uint4*>(x_s + b0 * K);
      for (int kv = kslice; kv < KV; kv += split.k_split) {
        float w[V];
        unpack<scalar_t>(w_vec[kv], w);
#pragma unroll
        for (int r = 0; r < RB; ++r) {
          float x[V];
          unpack<scalar_t>(x_vec[r * KV + kv], x);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[r] = fmaf(w[e], x[e], acc[r]);
        }
      }
    }
    // Butterfly over the tile's k_split lanes (warp-aligned groups; every lane runs every pass).
    for (int lane_mask = split.k_split / 2; lane_mask > 0; lane_mask /= 2) {
#pragma unroll
      for (int r = 0; r < RB; ++r) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], lane_mask);
    }
    const int b = b0 + kslice;
    if (tile_live && kslice < RB && b < rows) {
      // Select with compile-time indices so acc stays in registers.
      float sum = acc[0];
#pragma unroll
      for (int r = 1; r < RB; ++r) sum = kslice == r ? acc[r] : sum;
      store(u, b, sum);
    }
  }
}

// Copies a weight slice into shared memory, once per launch: dst[r][k] (row pitch `pitch`) = src[first + r][k],
// where src is addressed as src[row * row_stride + k * k_stride] (swap the strides to take columns as rows), zero
// for rows at or past `rows_total`, and for k at or past `k_total` (the padding columns the products run over).
template <typename scalar_t>
__device__ __forceinline__ void load_weight_rows(scalar_t* dst, int rows, int pitch, const scalar_t* src,
                                                 int64_t row_stride, int64_t k_stride, int first, int rows_total,
                                                 int k_total) {
  const scalar_t zero = static_cast<scalar_t>(0.0f);
  for (int i = threadIdx.x; i < rows * pitch; i += kThreads) {
    const int r = i / pitch, k = i - r * pitch;
    dst[i] = (first + r < rows_total && k < k_total)
                 ? src[static_cast<int64_t>(first + r) * row_stride + static_cast<int64_t>(k) * k_stride]
                 : zero;
  }
}

// Lanes per tile for a product of `tiles` tiles: fewer tiles -> more lanes each, so small problems still keep
// several lanes busy per output.
__host__ __device__ constexpr int lanes_per_tile(int tiles) {
  return tiles <= kThreads / 32 ? 32 : (tiles <= kThreads / 16 ? 16 : 8);
}

// Rows with a length above t: the active rows of step t.
__device__ __forceinline__ int rows_at(int t, const int* lengths, int batch) {
  int rows = 0;
  while (rows < batch && lengths[rows] > t) ++rows;
  return rows;
}

}  // namespace persistent
}  // namespace cuda
}  // namespace fused_lstm
