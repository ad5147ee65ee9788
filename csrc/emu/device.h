// The emulated GPU's limits: a profile per real card, the occupancy model that the launch checks and the
// plan code (csrc/cuda/persistent) query, and per-kernel attributes (the shared-memory opt-in).
//
// The numbers are the vendors' published limits for each compute capability. Registers per thread are
// not known before the real build's ptxas report, so the model takes the most a kernel's __launch_bounds__
// allow (the compiler never exceeds them): an upper bound, which makes the emulated occupancy a lower
// bound of the real one.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "runtime.h"

namespace fused_lstm {
namespace emu {

struct DeviceProfile {
  std::string name;
  int major, minor;                   // compute capability
  int multiprocessors;
  int max_threads_per_sm;
  int max_blocks_per_sm;
  int registers_per_sm;               // 32-bit registers
  size_t shared_bytes_per_sm;
  size_t shared_bytes_per_block_optin;  // the most a kernel may opt in to
  size_t shared_bytes_reserved_per_block;  // kept by the system per resident block
  int max_cluster_blocks;             // portable cluster size (0: no clusters before sm_90)
  int max_nonportable_cluster_blocks; // with cudaFuncAttributeNonPortableClusterSizeAllowed (H100/H200: 16)
};

// Every profile the emulator knows; the first is the default.
const std::vector<DeviceProfile>& device_profiles();
// The profile launches and queries use now (per process); set_device_profile throws for an unknown name.
const DeviceProfile& device_profile();
void set_device_profile(const std::string& name);

// Default dynamic shared memory a kernel may use without opting in.
constexpr size_t kDefaultDynamicSharedBytes = 48 * 1024;

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes): checked against the
// profile's opt-in limit, as the driver does.
void set_max_dynamic_shared(const void* kernel, const char* kernel_name, size_t bytes);
size_t max_dynamic_shared(const void* kernel);

// cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1): the kernel may be launched
// in clusters up to the profile's non-portable size (16 on sm_90) instead of the portable 8.
void allow_nonportable_clusters(const void* kernel);
// The cluster size the kernel may be launched with under the current profile (portable or non-portable).
int cluster_limit(const void* kernel);
// cudaOccupancyMaxPotentialClusterSize: the largest cluster of this kernel the profile can run (0 before sm_90,
// or when not even one block fits an SM). The model: one cluster spreads over one GPC's SMs, which on an
// H100 / H200 hold at least 16 blocks of any size that fits an SM, so only the attribute decides.
int max_potential_cluster_size(const void* kernel, LaunchBounds bounds, int threads_per_block,
                               size_t dynamic_shared_bytes);

// cudaOccupancyMaxActiveBlocksPerMultiprocessor under the current profile.
int max_active_blocks_per_sm(LaunchBounds bounds, int threads_per_block, size_t dynamic_shared_bytes);

// Counters for tests: launches run, and blocks and threads emulated since the process started.
struct Counters {
  int64_t launches = 0;
  int64_t cooperative_launches = 0;
  int64_t blocks = 0;
  int64_t threads = 0;
  int64_t switches = 0;  // fiber switches
};
Counters& counters();

}  // namespace emu
}  // namespace fused_lstm
