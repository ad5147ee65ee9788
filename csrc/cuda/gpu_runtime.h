// The one portability header of csrc/cuda: everything the CUDA sources need from the CUDA runtime, c10's
// CUDA layer and cuBLAS, for both of their builds:
//   - nvcc (the real build): CUDA, c10::cuda and cuBLAS themselves;
//   - FUSED_LSTM_CUDA_EMULATION: the same sources compiled as host C++ into fused_lstm._emu, where kernels
//     run as fibers on the CPU (csrc/emu/), "device" tensors are CPU tensors, streams are synchronous and
//     cuBLAS is emulated. See csrc/emu/README.md.
// Kernels use CUDA's own names (threadIdx, __syncthreads, cooperative_groups, nvcuda::wmma, __ldcg, ...) and declare
// dynamic shared memory with FUSED_LSTM_DYNAMIC_SHARED. Host code launches through gpu::launch only and
// reaches the device through the gpu:: functions below, never the CUDA runtime directly.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>

#if defined(FUSED_LSTM_CUDA_EMULATION)
#include "../emu/blas.h"
#include "../emu/device.h"
#include "../emu/runtime.h"
#include "../emu/wmma.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
// c10/cuda/CUDAEvent.h aligns a struct to std::hardware_destructive_interference_size, which GCC >= 12
// flags (-Winterference-size) in every file that includes it; the value is torch's ABI, not ours.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winterference-size"
#endif
#include <c10/cuda/CUDAEvent.h>
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic pop
#endif
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#endif

#ifndef FUSED_LSTM_CUDA_ARCHS
#define FUSED_LSTM_CUDA_ARCHS "unknown"  // setup.py defines it from TORCH_CUDA_ARCH_LIST
#endif

// Dynamic shared memory of the block, as `type* name`, 128-byte aligned: WMMA fragment loads and stores need 32
// bytes, which an undecorated `extern __shared__` array does not promise (the emulator aligns to 128 too).
#if defined(FUSED_LSTM_CUDA_EMULATION)
#define FUSED_LSTM_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::fused_lstm::emu::dynamic_shared_memory())
#else
#define FUSED_LSTM_DYNAMIC_SHARED(type, name) extern __shared__ __align__(128) type name[]
#endif

// Checks a cuBLAS status; the emulated cuBLAS adds why it refused the call.
#if defined(FUSED_LSTM_CUDA_EMULATION)
#define FUSED_LSTM_BLAS_CHECK(EXPR)                                                                          \
  do {                                                                                                     \
    const ::fused_lstm::cublasStatus_t fused_lstm_blas_status = (EXPR);                                    \
    TORCH_CHECK(fused_lstm_blas_status == ::fused_lstm::CUBLAS_STATUS_SUCCESS,                             \
                "fused_lstm emulator: cuBLAS error ", static_cast<int>(fused_lstm_blas_status), " in ", #EXPR, \
                ": ", ::fused_lstm::emu::blas_last_error());                                               \
  } while (0)
#else
#define FUSED_LSTM_BLAS_CHECK(EXPR) TORCH_CUDABLAS_CHECK(EXPR)
#endif

// The op namespace and dispatch key the CUDA sources register their kernels under: the real ops for CUDA
// tensors, or the emulated twins (torch.ops.fused_lstm_emu, same schemas) for CPU tensors.
#if defined(FUSED_LSTM_CUDA_EMULATION)
#define FUSED_LSTM_GPU_OPS fused_lstm_emu
#define FUSED_LSTM_GPU_DISPATCH CPU
#else
#define FUSED_LSTM_GPU_OPS fused_lstm
#define FUSED_LSTM_GPU_DISPATCH CUDA
#endif

namespace fused_lstm {
namespace gpu {

// Whether a tensor lives on the device these sources drive.
inline bool on_device(const at::Tensor& t) {
#if defined(FUSED_LSTM_CUDA_EMULATION)
  return t.defined() && t.is_cpu();
#else
  return t.defined() && t.is_cuda();
#endif
}

// What a kernel's __launch_bounds__ say; launches must stay within max_threads. Spelled once next to the
// kernel and used both in its __launch_bounds__ and at its launch.
struct LaunchBounds {
  int max_threads;
  int min_blocks_per_sm = 1;
};

// Grid, block, dynamic shared memory and the launch's kind (cooperative: all blocks co-resident and
// grid.sync() allowed; cluster: thread-block clusters of that shape, sm_90+).
struct LaunchShape {
  dim3 grid;
  dim3 block;
  size_t shared_bytes = 0;
  bool cooperative = false;
  dim3 cluster = dim3(1, 1, 1);
};

// The limits of a device that launch plans depend on.
struct DeviceLimits {
  int compute_major;  // compute capability major (tensor-core bf16 / TF32 fragments need 8)
  int multiprocessors;
  int max_threads_per_sm;
  size_t shared_bytes_per_block_optin;
  bool cooperative_launch;
};

inline unsigned volume(const dim3& d) { return d.x * d.y * d.z; }

#if defined(FUSED_LSTM_CUDA_EMULATION)

// One emulated device; streams run everything at once, in order, so events and guards have nothing to do.
struct DeviceGuard {
  template <typename DeviceOrIndex>
  explicit DeviceGuard(const DeviceOrIndex&) {}
};
struct Stream {
  c10::DeviceIndex device_index() const { return -1; }
};
inline Stream current_stream() { return {}; }
inline Stream side_stream(c10::DeviceIndex) { return {}; }
struct Event {
  void record(const Stream&) {}
  void block(const Stream&) {}
};
struct StreamGuard {
  explicit StreamGuard(const Stream&) {}
};

inline DeviceLimits device_limits(c10::DeviceIndex) {
  const emu::DeviceProfile& p = emu::device_profile();
  return {p.major, p.multiprocessors, p.max_threads_per_sm, p.shared_bytes_per_block_optin, true};
}
inline void set_max_dynamic_shared(const void* kernel, const char* kernel_name, size_t bytes) {
  emu::set_max_dynamic_shared(kernel, kernel_name, bytes);
}
inline int max_active_blocks_per_sm(const void*, LaunchBounds bounds, int threads_per_block, size_t shared_bytes) {
  return emu::max_active_blocks_per_sm({bounds.max_threads, bounds.min_blocks_per_sm}, threads_per_block, shared_bytes);
}
// The largest thread-block cluster of `kernel` the device can run with this block shape (0: no clusters, before
// sm_90), after allowing non-portable sizes (beyond 8 blocks) for it.
inline int max_cluster_blocks(const void* kernel, const char*, LaunchBounds bounds, int threads_per_block,
                              size_t shared_bytes) {
  if (emu::device_profile().major < 9) return 0;
  emu::allow_nonportable_clusters(kernel);
  return emu::max_potential_cluster_size(kernel, {bounds.max_threads, bounds.min_blocks_per_sm}, threads_per_block,
                                         shared_bytes);
}
inline cublasHandle_t blas_handle() { return emu::blas_handle(); }

#else

using DeviceGuard = c10::cuda::CUDAGuard;
using Stream = c10::cuda::CUDAStream;
using Event = c10::cuda::CUDAEvent;  // default flags: no timing, cheap, capturable
using StreamGuard = c10::cuda::CUDAStreamGuard;

inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// fused_lstm's own side stream of a device, created once and kept for the life of the process. Not one of
// torch's pooled streams: those rotate (every pooled stream used costs a cuBLAS workspace for as long as the
// process lives) and may be the very stream a user is running on.
inline Stream side_stream(c10::DeviceIndex device) {
  static std::once_flag created[C10_COMPILE_TIME_MAX_GPUS];
  static cudaStream_t streams[C10_COMPILE_TIME_MAX_GPUS];
  TORCH_CHECK(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "fused_lstm: bad CUDA device index ", device);
  std::call_once(created[device], [device] {
    const c10::cuda::CUDAGuard guard(device);
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&streams[device], cudaStreamNonBlocking));
  });
  return c10::cuda::getStreamFromExternal(streams[device], device);
}

// A launch or attribute call failed: say which kernel, and for a missing kernel image which card and which
// architectures this build has (TORCH_CUDA_ARCH_LIST), instead of CUDA's "no kernel image".
inline void check_kernel_call(cudaError_t status, const char* kernel_name) {
  if (status == cudaSuccess) return;
  (void)cudaGetLastError();  // clear the sticky launch error state CUDA keeps for non-sticky errors
  if (status == cudaErrorNoKernelImageForDevice || status == cudaErrorInvalidDeviceFunction) {
    const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
    TORCH_CHECK(false, "fused_lstm: this build has no kernel for ", prop->name, " (compute capability ", prop->major,
                ".", prop->minor, "): it was compiled for TORCH_CUDA_ARCH_LIST=\"", FUSED_LSTM_CUDA_ARCHS,
                "\". Rebuild with TORCH_CUDA_ARCH_LIST=\"", prop->major, ".", prop->minor,
                "\" pip install --no-build-isolation . (kernel ", kernel_name, ": ", cudaGetErrorString(status), ")");
  }
  TORCH_CHECK(false, "fused_lstm: CUDA error in kernel ", kernel_name, ": ", cudaGetErrorString(status));
}

inline DeviceLimits device_limits(c10::DeviceIndex device) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  int cooperative = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  return {prop->major, prop->multiProcessorCount, prop->maxThreadsPerMultiProcessor, prop->sharedMemPerBlockOptin,
          cooperative != 0};
}
// Lets the kernel use `bytes` of dynamic shared memory and prefers shared memory over L1 for it.
inline void set_max_dynamic_shared(const void* kernel, const char* kernel_name, size_t bytes) {
  check_kernel_call(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
                    kernel_name);
  check_kernel_call(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                         cudaSharedmemCarveoutMaxShared),
                    kernel_name);
}
inline int max_active_blocks_per_sm(const void* kernel, LaunchBounds, int threads_per_block, size_t shared_bytes) {
  int blocks = 0;
  check_kernel_call(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads_per_block, shared_bytes),
                    "(occupancy query)");
  return blocks;
}
// The largest thread-block cluster of `kernel` the device can run with this block shape and dynamic shared memory
// (0: no clusters, before sm_90), after allowing non-portable sizes (beyond 8 blocks, up to 16 on H100 / H200)
// for it: cudaOccupancyMaxPotentialClusterSize, which accounts for how many SMs a GPC offers this block.
inline int max_cluster_blocks(const void* kernel, const char* kernel_name, LaunchBounds, int threads_per_block,
                              size_t shared_bytes) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (at::cuda::getDeviceProperties(device)->major < 9) return 0;
  check_kernel_call(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1), kernel_name);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(16);  // the most blocks a cluster may hold; the query ignores any multiple of it
  config.blockDim = dim3(threads_per_block);
  config.dynamicSmemBytes = shared_bytes;
  int blocks = 0;
  check_kernel_call(cudaOccupancyMaxPotentialClusterSize(&blocks, kernel, &config), kernel_name);
  return blocks;
}
inline cublasHandle_t blas_handle() { return at::cuda::getCurrentCUDABlasHandle(); }  // bound to the current stream

#endif

// Launches kernel(args...) with `shape` on the current stream, under the kernel's launch bounds, and checks
// the launch. The arguments are converted to the kernel's parameter types first, as <<<...>>> would.
template <typename... Params, typename... Args>
void launch(const char* kernel_name, void (*kernel)(Params...), LaunchBounds bounds, const LaunchShape& shape,
            Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "gpu::launch: wrong number of kernel arguments");
  std::tuple<std::decay_t<Params>...> values(std::forward<Args>(args)...);
#if defined(FUSED_LSTM_CUDA_EMULATION)
  const emu::LaunchConfig config{kernel_name, reinterpret_cast<const void*>(kernel),
                                 {bounds.max_threads, bounds.min_blocks_per_sm}, shape.grid, shape.block,
                                 shape.shared_bytes, shape.cooperative, shape.cluster};
  // Each emulated thread calls the kernel with its own copies of the arguments.
  emu::launch(config, [&] { std::apply(kernel, values); });
#else
  TORCH_CHECK(volume(shape.block) <= static_cast<unsigned>(bounds.max_threads), "fused_lstm: launch of ", kernel_name,
              " with ", volume(shape.block), " threads per block exceeds its launch bounds (", bounds.max_threads, ")");
  void* argv[sizeof...(Params) + 1] = {};
  std::apply([&argv](auto&... value) {
    int i = 0;
    ((argv[i++] = static_cast<void*>(&value)), ...);
  }, values);
  const cudaStream_t stream = current_stream();
  const void* function = reinterpret_cast<const void*>(kernel);
  cudaError_t status;
  if (volume(shape.cluster) > 1) {
    cudaLaunchAttribute attributes[2];
    unsigned count = 0;
    attributes[count].id = cudaLaunchAttributeClusterDimension;
    attributes[count].val.clusterDim.x = shape.cluster.x;
    attributes[count].val.clusterDim.y = shape.cluster.y;
    attributes[count].val.clusterDim.z = shape.cluster.z;
    ++count;
    if (shape.cooperative) {
      attributes[count].id = cudaLaunchAttributeCooperative;
      attributes[count].val.cooperative = 1;
      ++count;
    }
    cudaLaunchConfig_t config = {};
    config.gridDim = shape.grid;
    config.blockDim = shape.block;
    config.dynamicSmemBytes = shape.shared_bytes;
    config.stream = stream;
    config.attrs = attributes;
    config.numAttrs = count;
    status = cudaLaunchKernelExC(&config, function, argv);
  } else if (shape.cooperative) {
    status = cudaLaunchCooperativeKernel(function, shape.grid, shape.block, argv, shape.shared_bytes, stream);
  } else {
    status = cudaLaunchKernel(function, shape.grid, shape.block, argv, shape.shared_bytes, stream);
  }
  check_kernel_call(status, kernel_name);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

}  // namespace gpu
}  // namespace fused_lstm
