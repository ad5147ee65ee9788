// The cost model that FUSED_LSTM_PERSISTENT=auto decides by: predicted microseconds of one time step on the
// persistent path and on the standard path, from the plan and the card's limits. Written down, with the
// predictions for the benchmark's GPU shapes, in benchmarks/NOTES.md ("GPU cost model").
//
// EVERY CONSTANT BELOW IS AN ASSUMPTION FROM PUBLISHED FIGURES (../../shared/ANCHORS.md), NOT A MEASUREMENT
// OF THIS CODE: the first GPU run (benchmarks/device_check.sh) measures both paths, and these constants are
// then fitted to it. Until then the model only orders the two paths; FUSED_LSTM_PERSISTENT stays off by
// default.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fused_lstm {
namespace persistent_cost {

// One grid-wide barrier (cooperative_groups grid.sync), H100: ~1.9 us published.
constexpr double kGridBarrierUs = 1.9;
// One cluster barrier (cluster.sync), H100: ~0.63 us published (host-timed, an upper bound).
constexpr double kClusterBarrierUs = 0.63;
// What one dependent kernel launch of the standard path costs when the host enqueues it from C++ (driver
// launch latency plus the gap between dependent kernels): ~1.6 us published per launch; the standard path
// has two per step (a GEMM and a pointwise kernel).
constexpr double kLaunchUs = 1.6;
// The shortest a cuBLAS GEMM or a small pointwise kernel runs once launched.
constexpr double kMinKernelUs = 2.0;
// Shared-memory-fed FP32 FMAs per microsecond per SM: 128 bytes/clock of shared memory feed 64 FMAs/clock
// when each loaded value serves 4 FMAs (the kernels' 4-row or 4-gate register tiles), at ~1.7 GHz.
constexpr double kSmemFmaPerUsPerSm = 64 * 1700.0;
// Tensor-core products per microsecond per SM when shared memory feeds them (fp16 / bf16 m16n16k16: 1 KB of
// operands per 4096 products, 128 bytes/clock -> 512 per clock at ~1.7 GHz; TF32 tensor cores run at half
// the 16-bit rate).
constexpr double kSmemMmaPerUsPerSm = 512 * 1700.0;
// L2 -> SM bytes per microsecond per SM (~5.5 TB/s over 132 SMs).
constexpr double kL2BytesPerUsPerSm = 40.0e3;
// Device-wide L2 bytes per microsecond (the standard path's GEMM reads W_hh from L2 every step).
constexpr double kL2BytesPerUs = 5.5e6;
// Device-wide FP32 FMAs per microsecond of a cuBLAS GEMM (fp32 SIMT ~67 TFLOP/s; TF32 and 16-bit tensor
// cores more, which only matters at large N).
constexpr double kGemmFmaPerUs = 33.0e6;
// HBM bytes per microsecond (~3 TB/s copy): the persistent kernels read W_hh once per launch.
constexpr double kHbmBytesPerUs = 3.0e6;

// Predicted microseconds of one step of a persistent kernel that owns `units` hidden units per block and
// stages `staged_bytes` per block per step (forward: h [N, H]; backward: d_gates [N, 4H]).
inline double persistent_step_us(int64_t units, int64_t hidden, int64_t batch, double staged_bytes) {
  const double fmas_per_block = 4.0 * static_cast<double>(units) * static_cast<double>(hidden) *
                                static_cast<double>(batch);
  return kGridBarrierUs + staged_bytes / kL2BytesPerUsPerSm + fmas_per_block / kSmemFmaPerUsPerSm;
}

// The same on tensor cores: the product covers the padded tiles, rows x K x N_pad16 products (forward rows = 4U
// gate rows; backward the block's dh columns padded to 16).
inline double persistent_mma_step_us(int64_t rows, int64_t padded_k, int64_t padded_batch, double staged_bytes,
                                     bool tf32) {
  const double products = static_cast<double>(rows) * static_cast<double>(padded_k) *
                          static_cast<double>(padded_batch);
  return kGridBarrierUs + staged_bytes / kL2BytesPerUsPerSm + products / (kSmemMmaPerUsPerSm / (tf32 ? 2 : 1));
}

// The FMA product in one thread-block cluster: h_t arrives in shared memory through distributed shared memory
// (a few bytes per block and row, not modelled), so there is no staging, and the barrier is the cluster's.
inline double persistent_cluster_step_us(int64_t units, int64_t hidden, int64_t batch) {
  return kClusterBarrierUs + 4.0 * static_cast<double>(units) * static_cast<double>(hidden) *
                                 static_cast<double>(batch) / kSmemFmaPerUsPerSm;
}

// What a projection (proj_size) adds to a persistent step: a second barrier (the grid's, or in a cluster the
// cluster's), the staging of h' [N, H] (forward) or dh_total [N, Hout] (backward) from L2 (none in a cluster: h'
// arrives through distributed shared memory), and the projection product's FMAs per block (forward V x H x N for
// its V columns of Hout, backward U x Hout x N for its U units).
inline double persistent_projection_us(double fmas_per_block, double staged_bytes, bool cluster = false) {
  return (cluster ? kClusterBarrierUs : kGridBarrierUs) + staged_bytes / kL2BytesPerUsPerSm +
         fmas_per_block / kSmemFmaPerUsPerSm;
}

// One GEMM of the standard path with an [rows x cols] weight read from L2, at least kMinKernelUs.
inline double standard_gemm_us(double weight_elements, int64_t batch, int element_size) {
  return std::max({kMinKernelUs, weight_elements * element_size / kL2BytesPerUs,
                   weight_elements * static_cast<double>(batch) / kGemmFmaPerUs});
}

// Predicted microseconds of one step of the standard path: a GEMM [N, K] x [K, 4H] or its backward twin (W_hh,
// 4H x K with K = Hout = proj, or H without a projection, read from L2) and a pointwise kernel, each at least
// kMinKernelUs, launched back to back. A projection adds the W_hr GEMM (Hout x H) and one more small kernel
// (forward: the copy of h into the output; backward: the add of grad_output): four launches per step.
inline double standard_step_us(int64_t hidden, int64_t batch, int element_size, int64_t proj = 0) {
  const double h = static_cast<double>(hidden), k = static_cast<double>(proj > 0 ? proj : hidden);
  double step = standard_gemm_us(4.0 * h * k, batch, element_size) + kMinKernelUs;
  if (proj > 0) step += standard_gemm_us(h * k, batch, element_size) + kMinKernelUs;
  return std::max((proj > 0 ? 4 : 2) * kLaunchUs, step);
}

// Predicted microseconds of a whole direction (T steps) on each path: the persistent kernel also loads W_hh
// (and W_hr) once and pays one launch.
inline double persistent_total_us(double step_us, int64_t steps, int64_t hidden, int element_size, int64_t proj = 0) {
  const double h = static_cast<double>(hidden), k = static_cast<double>(proj > 0 ? proj : hidden);
  const double w_bytes = (4.0 * h * k + (proj > 0 ? h * k : 0.0)) * element_size;
  return kLaunchUs + w_bytes / kHbmBytesPerUs + static_cast<double>(steps) * step_us;
}

}  // namespace persistent_cost
}  // namespace fused_lstm
