// The CUDA emulator's device side: what a kernel in csrc/cuda sees when it is compiled as host C++
// (FUSED_LSTM_CUDA_EMULATION) instead of by nvcc, and the launch that runs it on the CPU.
//
// Every CUDA thread is a fiber (fiber.h) on the calling OS thread. A fiber runs until it reaches a barrier
// or a warp collective, so threads interleave exactly where CUDA defines an ordering:
//   __syncthreads            all threads of the block, at the same call site; a thread that exits or waits
//                            elsewhere makes the launch fail with the kernel, block and threads named
//   __shfl_*_sync, votes     the lanes of `mask`, all present and agreeing on mask and operation
//   grid.sync()              every thread of a cooperative launch (an error in any other launch)
//   cluster.sync()           every thread of the block's cluster; map_shared_rank reaches another block's
//                            shared memory in the same cluster
// A barrier that can never be released is reported as an error, never a hang. Blocks run one after
// another (all at once for cooperative and cluster launches), in order or, with FUSED_LSTM_EMU_SEED set,
// in a random order drawn from that seed, which exposes a missing grid barrier. Dynamic shared memory is
// one buffer per block filled with 0xFF bytes (NaN in every float type), so reading what no thread wrote
// shows in the results.
//
// What it cannot see: the GPU memory model (a plain load where __ldcg is needed behaves the same here),
// real concurrency inside a warp, timing. See README.md beside this file.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
// The CUDA toolkit's own vector types and 16-bit float headers compile as host C++ and convert exactly as
// on the device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

// --- Qualifiers: host_defines.h (included above) maps most to nothing under a host compiler; these are the
// ones it would keep or that would silently change meaning.
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __grid_constant__
#define __grid_constant__
// A static __shared__ array would be one per thread here, not one per block: refuse it at compile time.
// Kernels declare their shared memory with FUSED_LSTM_DYNAMIC_SHARED (csrc/cuda/gpu_runtime.h).
#undef __shared__
#define __shared__ FUSED_LSTM_EMU_static_shared_memory_is_not_emulated_use_FUSED_LSTM_DYNAMIC_SHARED

namespace fused_lstm {
namespace emu {

// Where a barrier or collective was called from (for the error reports).
struct Site {
  const char* file;
  int line;
};

// --- Builtins of the thread that is running.
const uint3& thread_index();
const uint3& block_index();
const dim3& block_dim();
const dim3& grid_dim();
// The running block's dynamic shared memory (128-byte aligned, poisoned with 0xFF at launch).
void* dynamic_shared_memory();

void sync_block(Site site);
void sync_grid(Site site);
void sync_cluster(Site site);
unsigned cluster_block_rank();
unsigned cluster_num_blocks();
dim3 cluster_dim();
// The address in the shared memory of the cluster's block `rank` at the offset `address` has in this block's.
void* map_shared_rank(const void* address, unsigned rank);

// A warp collective over the lanes of `mask`. Every participating lane passes its value (as bits); once all
// have arrived, each gets the value of the lane its operation selects (shuffles) or the vote of the mask.
enum class WarpOp { ShuffleIndex, ShuffleXor, ShuffleDown, ShuffleUp, Ballot, Sync };
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int operand, int width, Site site);

template <typename T>
T shuffle(WarpOp op, unsigned mask, T value, int operand, int width, Site site) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>,
                "emulated shuffles move values of up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_collective(op, mask, bits, operand, width, site);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// --- Launches (host side; csrc/cuda/gpu_runtime.h wraps them as gpu::launch*).
// What a kernel's __launch_bounds__ promise: the launch must not exceed max_threads, and the register count
// the compiler may use follows from both (used by the occupancy model, see device.h).
struct LaunchBounds {
  int max_threads;
  int min_blocks_per_sm = 1;
};

struct LaunchConfig {
  const char* kernel_name;
  const void* kernel;  // identifies the kernel's attributes (set_max_dynamic_shared)
  LaunchBounds bounds;
  dim3 grid, block;
  size_t dynamic_shared_bytes = 0;
  bool cooperative = false;
  dim3 cluster{1, 1, 1};
};

// Validates the launch against the current device profile (device.h) and runs `body` once per thread.
void launch(const LaunchConfig& config, const std::function<void()>& body);

}  // namespace emu
}  // namespace fused_lstm

// --- CUDA's names for the above.
#define threadIdx (::fused_lstm::emu::thread_index())
#define blockIdx (::fused_lstm::emu::block_index())
#define blockDim (::fused_lstm::emu::block_dim())
#define gridDim (::fused_lstm::emu::grid_dim())
constexpr int warpSize = 32;

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::fused_lstm::emu::sync_block({file, line});
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::fused_lstm::emu::warp_collective(::fused_lstm::emu::WarpOp::Sync, mask, 0, 0, warpSize, {file, line});
}
template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = warpSize, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
  return ::fused_lstm::emu::shuffle(::fused_lstm::emu::WarpOp::ShuffleIndex, mask, value, src_lane, width, {file, line});
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = warpSize, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE()) {
  return ::fused_lstm::emu::shuffle(::fused_lstm::emu::WarpOp::ShuffleXor, mask, value, lane_mask, width, {file, line});
}
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = warpSize, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  return ::fused_lstm::emu::shuffle(::fused_lstm::emu::WarpOp::ShuffleDown, mask, value, static_cast<int>(delta), width,
                                    {file, line});
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = warpSize, const char* file = __builtin_FILE(),
                 int line = __builtin_LINE()) {
  return ::fused_lstm::emu::shuffle(::fused_lstm::emu::WarpOp::ShuffleUp, mask, value, static_cast<int>(delta), width,
                                    {file, line});
}
inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return static_cast<unsigned>(::fused_lstm::emu::warp_collective(::fused_lstm::emu::WarpOp::Ballot, mask,
                                                                  predicate != 0, 0, warpSize, {file, line}));
}
inline int __all_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return __ballot_sync(mask, predicate, file, line) == mask;
}
inline int __any_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return __ballot_sync(mask, predicate, file, line) != 0;
}

// Load/store intrinsics with cache hints: on one OS thread every load sees every earlier store, so they are
// plain accesses (which is why the emulator cannot catch a missing __ldcg; see the header comment).
template <typename T>
inline T __ldcg(const T* p) { return *p; }
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldca(const T* p) { return *p; }
template <typename T>
inline void __stcg(T* p, T v) { *p = v; }

inline float __uint_as_float(unsigned int bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline unsigned int __float_as_uint(float f) {
  unsigned int bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// Atomics: fibers never preempt each other, so a read-modify-write is atomic as written.
template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
inline T atomicMax(T* address, T value) {
  const T old = *address;
  *address = old < value ? value : old;
  return old;
}
template <typename T>
inline T atomicExch(T* address, T value) {
  const T old = *address;
  *address = value;
  return old;
}
template <typename T>
inline T atomicCAS(T* address, T compare, T value) {
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}

// Integer min / max as CUDA's device headers declare them for device code.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a < b ? b : a; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a < b ? b : a; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a < b ? b : a; }

// --- cooperative_groups: the grid, block and cluster groups the kernels use.
namespace cooperative_groups {

class grid_group {
 public:
  void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
    ::fused_lstm::emu::sync_grid({file, line});
  }
  unsigned long long size() const {
    const dim3 g = gridDim, b = blockDim;
    return 1ull * g.x * g.y * g.z * b.x * b.y * b.z;
  }
  bool is_valid() const { return true; }
};
inline grid_group this_grid() { return grid_group(); }

class thread_block {
 public:
  void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
    ::fused_lstm::emu::sync_block({file, line});
  }
  dim3 group_index() const { return dim3(blockIdx.x, blockIdx.y, blockIdx.z); }
  dim3 thread_index() const { return dim3(threadIdx.x, threadIdx.y, threadIdx.z); }
  unsigned size() const { return blockDim.x * blockDim.y * blockDim.z; }
};
inline thread_block this_thread_block() { return thread_block(); }

class cluster_group {
 public:
  void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
    ::fused_lstm::emu::sync_cluster({file, line});
  }
  unsigned block_rank() const { return ::fused_lstm::emu::cluster_block_rank(); }
  unsigned num_blocks() const { return ::fused_lstm::emu::cluster_num_blocks(); }
  dim3 dim_blocks() const { return ::fused_lstm::emu::cluster_dim(); }
  template <typename T>
  T* map_shared_rank(T* address, unsigned rank) const {
    return static_cast<T*>(::fused_lstm::emu::map_shared_rank(address, rank));
  }
};
inline cluster_group this_cluster() { return cluster_group(); }

}  // namespace cooperative_groups
