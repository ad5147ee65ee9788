// The emulator's own test kernels: each exercises one promise of runtime.h (barriers, shuffles, votes,
// grid and cluster synchronisation, shared-memory poisoning, launch checks), in a correct form and, where
// it matters, with the bug the promise exists to catch. tests/test_emulator.py runs them by name.
#include <ATen/ATen.h>

#include <functional>
#include <map>
#include <string>

#include "../cuda/gpu_runtime.h"

namespace fused_lstm {
namespace emu {
namespace {

constexpr gpu::LaunchBounds kBounds{1024};

gpu::LaunchShape shape(unsigned blocks, unsigned threads, size_t shared = 0, bool cooperative = false,
                       unsigned cluster = 1) {
  gpu::LaunchShape s;
  s.grid = dim3(blocks);
  s.block = dim3(threads);
  s.shared_bytes = shared;
  s.cooperative = cooperative;
  s.cluster = dim3(cluster);
  return s;
}

at::Tensor nan_filled(int64_t n) { return at::full({n}, NAN, at::kFloat); }

// Thread t writes t + 1 to shared memory; thread 0 sums the block's values after a __syncthreads (or, the
// bug, without it: then it reads the poison other threads have not overwritten yet).
template <bool kSynced>
__global__ void block_sum_kernel(float* out) {
  FUSED_LSTM_DYNAMIC_SHARED(float, values);
  values[threadIdx.x] = threadIdx.x + 1.0f;
  if (kSynced) __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.0f;
    for (unsigned i = 0; i < blockDim.x; ++i) sum += values[i];
    out[blockIdx.x] = sum;
  }
}

// Half the block waits at one __syncthreads, the other half at another.
__global__ void divergent_sync_kernel(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Thread 5 returns before the block's __syncthreads.
__global__ void early_exit_kernel(float* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// A butterfly sum over the lanes of `mask`.
__global__ void warp_sum_kernel(float* out, unsigned mask) {
  float v = threadIdx.x % 32 + 1.0f;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(mask, v, offset);
  out[threadIdx.x] = v;
}

// Each lane's shuffles and vote: [down 3, up 5, index 7, ballot(lane % 3 == 0), xor 1 with width 8].
__global__ void warp_ops_kernel(int64_t* out) {
  const int lane = threadIdx.x;
  int64_t* row = out + 5 * lane;
  row[0] = __shfl_down_sync(0xffffffffu, lane, 3);
  row[1] = __shfl_up_sync(0xffffffffu, lane, 5);
  row[2] = __shfl_sync(0xffffffffu, lane, 7);
  row[3] = __ballot_sync(0xffffffffu, lane % 3 == 0);
  row[4] = __shfl_xor_sync(0xffffffffu, lane, 9, 8);  // 9 leaves the 8-lane group: own value
}

// Block b writes b + 1, then (after the grid barrier, or the bug: only a block barrier) reads block b + 1's.
template <bool kGridSync>
__global__ void grid_exchange_kernel(float* buffer, float* out) {
  if (threadIdx.x == 0) buffer[blockIdx.x] = blockIdx.x + 1.0f;
  if (kGridSync) {
    cooperative_groups::this_grid().sync();
  } else {
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = buffer[(blockIdx.x + 1) % gridDim.x];
}

// Each block of a cluster reads its neighbour's shared memory through distributed shared memory. Two
// instantiations, so that allowing non-portable cluster sizes for one (an attribute per kernel, kept for the
// process) leaves the other at the portable limit.
template <bool kNonPortable>
__global__ void cluster_exchange_kernel(float* out) {
  FUSED_LSTM_DYNAMIC_SHARED(float, values);
  const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  const unsigned rank = cluster.block_rank();
  values[threadIdx.x] = rank * 100.0f + threadIdx.x;
  cluster.sync();
  const float* peer = cluster.map_shared_rank(values, (rank + 1) % cluster.num_blocks());
  out[blockIdx.x * blockDim.x + threadIdx.x] = peer[threadIdx.x];
  cluster.sync();  // the peer's shared memory must outlive every read of it
}

// Every thread adds 1 to one counter.
__global__ void atomic_count_kernel(float* counter) { atomicAdd(counter, 1.0f); }

const std::map<std::string, std::function<at::Tensor()>>& selftests() {
  static const std::map<std::string, std::function<at::Tensor()>> tests = {
      {"block_sum", [] {
         at::Tensor out = nan_filled(3);
         gpu::launch("block_sum_kernel", &block_sum_kernel<true>, kBounds, shape(3, 64, 64 * 4), out.data_ptr<float>());
         return out;
       }},
      {"block_sum_without_sync", [] {
         at::Tensor out = nan_filled(3);
         gpu::launch("block_sum_kernel", &block_sum_kernel<false>, kBounds, shape(3, 64, 64 * 4), out.data_ptr<float>());
         return out;
       }},
      {"block_sum_too_much_shared", [] {
         at::Tensor out = nan_filled(1);
         gpu::launch("block_sum_kernel", &block_sum_kernel<true>, kBounds, shape(1, 64, 64 * 1024), out.data_ptr<float>());
         return out;
       }},
      {"block_sum_past_launch_bounds", [] {
         at::Tensor out = nan_filled(1);
         gpu::launch("block_sum_kernel", &block_sum_kernel<true>, gpu::LaunchBounds{128}, shape(1, 256, 256 * 4),
                     out.data_ptr<float>());
         return out;
       }},
      {"divergent_sync", [] {
         at::Tensor out = nan_filled(32);
         gpu::launch("divergent_sync_kernel", &divergent_sync_kernel, kBounds, shape(1, 32), out.data_ptr<float>());
         return out;
       }},
      {"early_exit", [] {
         at::Tensor out = nan_filled(32);
         gpu::launch("early_exit_kernel", &early_exit_kernel, kBounds, shape(1, 32), out.data_ptr<float>());
         return out;
       }},
      {"warp_sum", [] {
         at::Tensor out = nan_filled(64);
         gpu::launch("warp_sum_kernel", &warp_sum_kernel, kBounds, shape(1, 64), out.data_ptr<float>(), 0xffffffffu);
         return out;
       }},
      {"warp_sum_partial_warp", [] {  // 48 threads: the second warp has 16 lanes, the full mask names 32
         at::Tensor out = nan_filled(48);
         gpu::launch("warp_sum_kernel", &warp_sum_kernel, kBounds, shape(1, 48), out.data_ptr<float>(), 0xffffffffu);
         return out;
       }},
      {"warp_sum_mask_without_lane", [] {
         at::Tensor out = nan_filled(32);
         gpu::launch("warp_sum_kernel", &warp_sum_kernel, kBounds, shape(1, 32), out.data_ptr<float>(), 0x0000ffffu);
         return out;
       }},
      {"warp_ops", [] {
         at::Tensor out = at::full({32 * 5}, -1, at::kLong);
         gpu::launch("warp_ops_kernel", &warp_ops_kernel, kBounds, shape(1, 32), out.data_ptr<int64_t>());
         return out;
       }},
      {"grid_exchange", [] {
         at::Tensor buffer = nan_filled(6), out = nan_filled(6);
         gpu::launch("grid_exchange_kernel", &grid_exchange_kernel<true>, kBounds, shape(6, 64, 0, true),
                     buffer.data_ptr<float>(), out.data_ptr<float>());
         return out;
       }},
      {"grid_exchange_block_barrier_only", [] {
         at::Tensor buffer = nan_filled(6), out = nan_filled(6);
         gpu::launch("grid_exchange_kernel", &grid_exchange_kernel<false>, kBounds, shape(6, 64, 0, true),
                     buffer.data_ptr<float>(), out.data_ptr<float>());
         return out;
       }},
      {"grid_exchange_not_cooperative", [] {
         at::Tensor buffer = nan_filled(6), out = nan_filled(6);
         gpu::launch("grid_exchange_kernel", &grid_exchange_kernel<true>, kBounds, shape(6, 64),
                     buffer.data_ptr<float>(), out.data_ptr<float>());
         return out;
       }},
      {"grid_exchange_too_large", [] {  // more blocks than the device holds at once
         at::Tensor buffer = nan_filled(1), out = nan_filled(1);
         gpu::launch("grid_exchange_kernel", &grid_exchange_kernel<true>, kBounds, shape(100000, 1024, 0, true),
                     buffer.data_ptr<float>(), out.data_ptr<float>());
         return out;
       }},
      {"cluster_exchange", [] {
         at::Tensor out = nan_filled(8 * 32);
         gpu::launch("cluster_exchange_kernel", &cluster_exchange_kernel<false>, kBounds,
                     shape(8, 32, 32 * 4, false, 4), out.data_ptr<float>());
         return out;
       }},
      {"cluster_exchange_16_blocks", [] {  // a non-portable cluster, allowed first (as the persistent plan does)
         at::Tensor out = nan_filled(16 * 32);
         const void* kernel = reinterpret_cast<const void*>(&cluster_exchange_kernel<true>);
         TORCH_CHECK(gpu::max_cluster_blocks(kernel, "cluster_exchange_kernel", kBounds, 32, 32 * 4) == 16,
                     "fused_lstm emulator: the profile allows no 16-block cluster");
         gpu::launch("cluster_exchange_kernel", &cluster_exchange_kernel<true>, kBounds,
                     shape(16, 32, 32 * 4, false, 16), out.data_ptr<float>());
         return out;
       }},
      {"cluster_exchange_16_blocks_not_allowed", [] {  // the same without cudaFuncAttributeNonPortableClusterSizeAllowed
         at::Tensor out = nan_filled(16 * 32);
         gpu::launch("cluster_exchange_kernel", &cluster_exchange_kernel<false>, kBounds,
                     shape(16, 32, 32 * 4, false, 16), out.data_ptr<float>());
         return out;
       }},
      {"atomic_count", [] {
         at::Tensor counter = at::zeros({1}, at::kFloat);
         gpu::launch("atomic_count_kernel", &atomic_count_kernel, kBounds, shape(5, 96), counter.data_ptr<float>());
         return counter;
       }},
  };
  return tests;
}

}  // namespace

at::Tensor run_selftest(const std::string& name) {
  const auto& tests = selftests();
  const auto it = tests.find(name);
  TORCH_CHECK(it != tests.end(), "fused_lstm emulator: no self-test named '", name, "'");
  return it->second();
}

}  // namespace emu
}  // namespace fused_lstm
