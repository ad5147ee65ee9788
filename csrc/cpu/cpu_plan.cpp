#include "cpu_plan.h"

#include <ATen/Parallel.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <fstream>
#include <string>

#include "cpu_limits.h"
#include "simd.h"

namespace fused_lstm::cpu_plan {

namespace limits = cpu_limits;

namespace {

// The size of the first cache of `level` (a unified or data cache) that sysfs lists for cpu0, or 0.
int64_t sysfs_cache_bytes(int level) {
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), type_file(dir + "type"), size_file(dir + "size");
    int found_level = 0;
    std::string type, size;
    if (!(level_file >> found_level) || !(type_file >> type) || !(size_file >> size)) continue;
    if (found_level != level || type == "Instruction" || size.empty()) continue;
    int64_t value = 0;
    size_t i = 0;
    for (; i < size.size() && std::isdigit(static_cast<unsigned char>(size[i])); ++i) value = value * 10 + (size[i] - '0');
    const char unit = i < size.size() ? static_cast<char>(std::toupper(static_cast<unsigned char>(size[i]))) : 'B';
    return unit == 'K' ? value << 10 : unit == 'M' ? value << 20 : unit == 'G' ? value << 30 : value;
  }
  return 0;
}

// A cache size from sysconf, else sysfs, else the fallback, with where it came from.
int64_t read_cache(int sysconf_name, int level, int64_t fallback, const char** source) {
  long bytes = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
  bytes = sysconf(sysconf_name);
#else
  (void)sysconf_name;
#endif
  if (bytes > 0) {
    *source = "sysconf";
    return bytes;
  }
  const int64_t from_sysfs = sysfs_cache_bytes(level);
  if (from_sysfs > 0) {
    *source = "sysfs";
    return from_sysfs;
  }
  *source = "fallback";
  return fallback;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Bytes of packed float32 weights of K inputs for the 4H gate rows (W_ih: K = I, W_hh: K = Hout).
int64_t gate_weight_bytes(int64_t H, int64_t K) { return 4 * H * K * kFloatBytes; }

}  // namespace

const CacheSizes& cpu_caches() {
  static const CacheSizes caches = [] {
    CacheSizes c;
#ifdef _SC_LEVEL2_CACHE_SIZE
    c.l2_bytes = read_cache(_SC_LEVEL2_CACHE_SIZE, 2, limits::kFallbackL2Bytes, &c.l2_source);
    c.l3_bytes = read_cache(_SC_LEVEL3_CACHE_SIZE, 3, limits::kFallbackL3Bytes, &c.l3_source);
#else
    c.l2_bytes = read_cache(0, 2, limits::kFallbackL2Bytes, &c.l2_source);
    c.l3_bytes = read_cache(0, 3, limits::kFallbackL3Bytes, &c.l3_source);
#endif
    return c;
  }();
  return caches;
}

Machine this_machine() {
  Machine m;
  m.threads = std::max<int64_t>(1, at::get_num_threads());
  m.row_tile = with_selected_isa([](auto isa) -> int64_t { return decltype(isa)::kRowTile; });
  m.l2_bytes = cpu_caches().l2_bytes;
  m.l3_bytes = cpu_caches().l3_bytes;
  m.bf16_kernels = cpu_bf16_kernels();
  return m;
}

int64_t usable_l3_bytes(const Machine& m) { return std::min(m.l3_bytes, limits::kMaxUsableL3Bytes); }
int64_t fused_projection_max_slice_bytes(const Machine& m) { return m.l2_bytes / limits::kFusedProjectionL2Divisor; }
int64_t projection_chunk_max_weight_bytes(const Machine& m) {
  return usable_l3_bytes(m) / limits::kProjectionChunkL3Divisor;
}
int64_t row_split_max_weight_bytes(const Machine& m) { return m.l2_bytes * limits::kRowSplitL2Multiple; }
int64_t shared_gather_max_packed_bytes(const Machine& m) { return usable_l3_bytes(m) / limits::kSharedGatherL3Divisor; }

int64_t packed_bytes(int64_t K, int64_t cols) { return ceil_div(cols, 4 * kGroup) * K * 4 * kGroup * kFloatBytes; }

// ---- Products ----

const char* name(ProductKernel kernel) {
  switch (kernel) {
    case ProductKernel::dot: return "dot";
    case ProductKernel::bf16_dot: return "bf16_dot";
    case ProductKernel::bf16_rowmajor: return "bf16_rowmajor";
    case ProductKernel::bf16_amx: return "bf16_amx";
    case ProductKernel::bf16_amx_rowmajor: return "bf16_amx_rowmajor";
    case ProductKernel::rowmajor: return "rowmajor";
    case ProductKernel::packed: return "packed";
    default: return "aten";
  }
}

ProductPlan plan_product(const ProductShape& s) {
  ProductPlan plan;
  if (s.bf16_dot_kernels && s.rows > 0) {
    const bool small = s.rows * s.depth * s.cols < limits::kMaxBf16SmallProductMacs;
    // One AMX tile of rows (a single row does 1/16 of a tile's work: the vector kernels match it there).
    const bool amx = s.bf16_amx && s.a_rows_contiguous && s.rows > 1 && s.rows <= limits::kAmxTileRows &&
                     s.depth % limits::kAmxTileDepth == 0;
    if (amx && s.b_is_w_transposed) {
      plan.kernel = ProductKernel::bf16_amx;
      plan.reason = "bfloat16, one AMX tile of rows against W^T: W read in place as A tiles (ATen reorders W every "
                    "call)";
    } else if (amx && s.b_rows_contiguous) {
      plan.kernel = ProductKernel::bf16_amx_rowmajor;
      plan.reason = "bfloat16, one AMX tile of rows: b's rows paired into B tiles on the fly (ATen reorders b every "
                    "call)";
    } else if (small && s.b_is_w_transposed && s.a_rows_contiguous && s.rows < limits::kMaxBf16DotRows) {
      plan.kernel = ProductKernel::bf16_dot;
      plan.reason = "bfloat16, few rows against W^T: W read in place with vdpbf16ps (ATen's per-call cost dominates)";
    } else if (small && s.b_rows_contiguous) {
      plan.kernel = ProductKernel::bf16_rowmajor;
      plan.reason = "bfloat16, few multiply-adds: b's rows read in place (ATen's per-call cost dominates)";
    } else if (s.a_transposed && s.depth < limits::kMinPackedDepth && s.b_rows_contiguous) {
      plan.kernel = ProductKernel::bf16_rowmajor;
      plan.reason = "bfloat16 over a short reduction (a step's weight gradients): writing out is the cost, and "
                    "both operands are widened once";
    } else {
      plan.reason = "bfloat16 with many rows or multiply-adds: ATen";
    }
    return plan;
  }
  if (!s.vector_kernels || s.rows == 0) {
    plan.reason = "not float32 with unit-stride output on a CPU with the vector kernels (or no rows): ATen";
    return plan;
  }
  if (!s.b_packed_before && s.b_is_w_transposed && s.a_rows_contiguous) {
    const int64_t w_bytes = s.depth * s.cols * kFloatBytes;
    const int64_t max_rows =
        w_bytes >= limits::kLargeWeightBytes ? limits::kMaxInPlaceRowsLargeWeight : limits::kMaxInPlaceRows;
    if (s.rows < max_rows) {
      if (!s.b_in_place_before) {
        plan.kernel = ProductKernel::dot;
        plan.first_in_place_use = true;
        plan.reason = "few rows against W^T: W read in place (packing all of W once would cost more)";
        return plan;
      }
      if (s.rows < limits::kMinPackedRows) {
        plan.kernel = ProductKernel::dot;
        plan.reason = "W^T used again, but too few rows to repay packing: W read in place";
        return plan;
      }
    }
  }
  const bool small = s.rows < limits::kMinPackedRows || (s.a_transposed && s.depth < limits::kMinPackedDepth);
  if (!s.b_packed_before && small) {
    plan.kernel = s.b_rows_contiguous ? ProductKernel::rowmajor : ProductKernel::aten;
    plan.reason = s.b_rows_contiguous ? "too few rows (or k) to repay packing: b's rows read in place"
                                      : "too few rows (or k) to repay packing, and b's rows are strided: ATen";
    return plan;
  }
  plan.kernel = ProductKernel::packed;
  plan.reason = s.b_packed_before ? "b already packed by this call: reused"
                                  : "enough rows to repay packing b (kept for the rest of the call)";
  return plan;
}

const char* name(PackedSchedule schedule) {
  switch (schedule) {
    case PackedSchedule::long_k_rows: return "long_k_rows";
    case PackedSchedule::gather_rows: return "gather_rows";
    default: return "panel_tasks";
  }
}

int64_t balanced_row_blocks(int64_t M, int64_t max_rows, int64_t threads) {
  if (M <= 0) return 0;
  threads = std::max<int64_t>(1, threads);
  const int64_t blocks = ceil_div(M, max_rows);
  const int64_t balanced = ceil_div(blocks, threads) * threads;
  return M / balanced >= max_rows / 2 ? balanced : blocks;
}

PackedProductPlan plan_packed_product(int64_t M, int64_t K, int64_t cols, bool a_transposed, const Machine& m) {
  PackedProductPlan plan;
  const int64_t panels = ceil_div(cols, 4 * kGroup);
  if (a_transposed) {
    plan.schedule = PackedSchedule::gather_rows;
    plan.rows_per_task = limits::kGatherRows;
    plan.tasks = balanced_row_blocks(M, limits::kGatherRows, m.threads);
    plan.reason = "transposed a: each task gathers a block of its rows k-major, then runs every panel over it";
    return plan;
  }
  if (K > limits::kPanelChunkK) {
    plan.schedule = PackedSchedule::long_k_rows;
    plan.rows_per_task = std::clamp<int64_t>(ceil_div(M, m.threads), 1, limits::kMaxLongReductionBlockRows);
    plan.tasks = balanced_row_blocks(M, plan.rows_per_task, m.threads);
    plan.reason = "long reduction: row blocks of a thread's share, every panel in k chunks that stay in L2";
    return plan;
  }
  const int64_t tiles = ceil_div(M, m.row_tile);
  const int64_t wanted_groups = ceil_div(limits::kPanelTasksPerThread * m.threads, panels);
  const int64_t row_groups = std::clamp<int64_t>(wanted_groups, 1, tiles);
  plan.schedule = PackedSchedule::panel_tasks;
  plan.rows_per_task = ceil_div(tiles, row_groups) * m.row_tile;
  plan.tasks = panels * ceil_div(M, plan.rows_per_task);
  plan.grain = std::max<int64_t>(
      1, limits::kMinPanelChunkTileSteps / std::max<int64_t>(1, K * plan.rows_per_task / m.row_tile));
  plan.reason = "tasks of (panel, rows): each panel streams once per task and stays in cache for its rows";
  return plan;
}

TaskGrid plan_rowmajor_product(int64_t M, int64_t K, int64_t cols) {
  TaskGrid grid;
  const int64_t panels = ceil_div(cols, 4 * kGroup);
  const int64_t row_blocks = ceil_div(M, limits::kRowMajorRowsPerTask);
  const int64_t task_flops = 2 * std::min(M, limits::kRowMajorRowsPerTask) * K * 4 * kGroup;
  grid.tasks = panels * row_blocks;
  grid.grain = std::max<int64_t>(1, limits::kRowMajorMinChunkFlops / std::max<int64_t>(1, task_flops));
  return grid;
}

TaskGrid plan_dot_product(int64_t M, int64_t K, int64_t cols) {
  TaskGrid grid;
  const int64_t row_blocks = ceil_div(M, limits::kDotBlock), col_blocks = ceil_div(cols, limits::kDotBlock);
  const int64_t block_macs =
      std::min(limits::kDotBlock, M) * std::min(limits::kDotBlock, cols) * std::max<int64_t>(K, 1);
  grid.tasks = row_blocks * col_blocks;
  grid.grain = std::max<int64_t>(1, limits::kDotMinChunkMacs / std::max<int64_t>(1, block_macs));
  return grid;
}

int64_t shared_gather_count(const int64_t* bytes, int64_t count, int64_t first, const Machine& m) {
  int64_t last = first + 1, total = bytes[first];
  while (last < count && total + bytes[last] <= shared_gather_max_packed_bytes(m)) total += bytes[last++];
  return last - first;
}

WeightGradientPlan plan_weight_gradients(int64_t gate_rows, int64_t rows, int64_t input_size, int64_t out_hidden,
                                         bool vector_kernels, const Machine& m) {
  WeightGradientPlan plan;
  // a = d_gates^T [4H, R] is a transposed view (its k stride 4H is never 1 for H >= 1).
  if (!vector_kernels || gate_rows < limits::kMinPackedRows || rows < limits::kMinPackedDepth) {
    plan.reason = "too short a sequence (or no vector kernels) to repay packing: two products on their own";
    return plan;
  }
  plan.packed = true;
  const int64_t bytes[2] = {packed_bytes(rows, input_size), packed_bytes(rows, out_hidden)};
  const int64_t targets = (input_size > 0 && gate_rows > 0 ? 1 : 0) + (out_hidden > 0 && gate_rows > 0 ? 1 : 0);
  plan.passes = targets < 2 ? targets : (shared_gather_count(bytes, 2, 0, m) == 2 ? 1 : 2);
  plan.reason = plan.passes == 1 ? "one gather of each d_gates^T block for both products and the bias sum"
                                 : "packed operands past the shared-L3 budget: one pass (and gather) per product";
  return plan;
}

// ---- Recurrences ----

int64_t team_size(int64_t H, int64_t K, int64_t N, int64_t slices, const Machine& m) {
  const int64_t flops_per_step = 8 * H * K * N;
  return std::max<int64_t>(1, std::min({m.threads, slices, flops_per_step / limits::kFlopsPerThread}));
}

ForwardShape forward_shape(int64_t batch, int64_t hidden, int64_t input_size, int64_t rows, int64_t out_hidden,
                           bool projection, bool required) {
  ForwardShape s;
  s.batch = batch;
  s.hidden = hidden;
  s.out_hidden = out_hidden > 0 ? out_hidden : hidden;
  s.input_size = input_size;
  s.rows = rows;
  s.projection = projection;
  s.required = required;
  return s;
}

ForwardPlan plan_forward(const ForwardShape& s, const Machine& m) {
  ForwardPlan plan;
  const int64_t N = s.batch, H = s.hidden, Hout = s.out_hidden, I = s.input_size;
  if (!s.vector_kernels || !s.float32 || s.projection) {
    plan.reason = !s.vector_kernels ? "this CPU has no vector kernels: the per-step loop with ATen's GEMMs"
                  : !s.float32      ? "not float32: the per-step loop with ATen's GEMMs"
                                    : "proj_size: the per-step loop (the fused recurrence has no w_hr)";
    return plan;
  }
  const int64_t blocks = ceil_div(H, kGroup);
  plan.in_place = N <= limits::kMaxInPlaceBatch && gate_weight_bytes(H, Hout) >= limits::kInPlaceMinWeightBytes;
  if (plan.in_place) {
    plan.fused = true;
    plan.threads = team_size(H, Hout, N, blocks, m);
    plan.reason = "small batch, large W_hh: W_hh read in place after the driver's input projection";
    return plan;
  }
  if (s.rows < limits::kMinRecurrenceRows && !s.required) {
    plan.reason = "too few rows in the sequence to repay packing: the per-step loop";
    return plan;
  }
  plan.fused = true;
  const int64_t weights = gate_weight_bytes(H, I + Hout);
  const int64_t unit_team = team_size(H, Hout + I, N, blocks, m);
  const int64_t row_team = std::clamp<int64_t>(N / limits::kRowSplitMinRowsPerThread, 1, m.threads);
  plan.split_rows = N >= limits::kRowSplitMinBatch && weights <= row_split_max_weight_bytes(m) && row_team >= unit_team;
  const bool fuse_projection = N >= limits::kFusedProjectionMinBatch &&
                               weights / unit_team <= fused_projection_max_slice_bytes(m);
  plan.per_step_projection = plan.split_rows || fuse_projection;
  if (!plan.per_step_projection) {
    const int64_t chunk_rows = weights > projection_chunk_max_weight_bytes(m)
                                   ? limits::kLargeProjectionChunkBytes / (4 * H * kFloatBytes)
                                   : limits::kProjectionChunkRows;
    plan.chunk_steps = std::max<int64_t>(1, ceil_div(chunk_rows, N));
  }
  plan.threads = plan.split_rows ? row_team : unit_team;
  plan.reason = plan.split_rows ? "packed weights fit one core's L2 and the batch is large: threads split the batch"
                : plan.per_step_projection
                    ? "packed, threads split hidden units; a thread's W_ih + W_hh share fits half its L2: "
                      "projection fused per step"
                    : "packed, threads split hidden units; projection in chunks of steps";
  return plan;
}

namespace {

// The bfloat16 recurrences' kernel (on a CPU with AVX512-BF16): AMX tiles from kAmxMinBatch rows, else vdpbf16ps.
CpuBf16Kernels bf16_recurrence_kernel(int64_t N, const Machine& m) {
  return m.bf16_kernels == CpuBf16Kernels::amx && N >= limits::kAmxMinBatch ? CpuBf16Kernels::amx
                                                                            : CpuBf16Kernels::avx512_bf16;
}

}  // namespace

Bf16ForwardPlan plan_bf16_forward(const ForwardShape& s, const Machine& m) {
  Bf16ForwardPlan plan;
  const int64_t N = s.batch, H = s.hidden, Hout = s.out_hidden;
  if (s.projection || m.bf16_kernels == CpuBf16Kernels::aten) {
    plan.reason = s.projection ? "proj_size: the per-step loop (the fused recurrence has no w_hr)"
                               : "this CPU has no AVX512-BF16 (or the avx512 kernels are not in use): the "
                                 "per-step loop with ATen's GEMMs";
    return plan;
  }
  if (s.rows < limits::kMinRecurrenceRows && !s.required) {
    plan.reason = "too few rows in the sequence to repay packing: the per-step loop";
    return plan;
  }
  plan.fused = true;
  plan.kernel = bf16_recurrence_kernel(N, m);
  plan.row_tile = plan.kernel == CpuBf16Kernels::amx ? limits::kAmxTileRows : 1;
  plan.packed_depth = ceil_div(Hout, limits::kBf16PackedDepthMultiple) * limits::kBf16PackedDepthMultiple;
  const int64_t weights = 4 * ceil_div(H, kGroup) * kGroup * plan.packed_depth * 2;  // packed bfloat16 W_hh
  const int64_t unit_team = team_size(H, Hout, N, ceil_div(H, kGroup), m);
  const int64_t row_team = std::clamp<int64_t>(
      N / std::max(limits::kRowSplitMinRowsPerThread, plan.row_tile), 1, m.threads);
  plan.split_rows = N >= limits::kRowSplitMinBatch && weights <= m.l2_bytes / limits::kBf16RowSplitL2Divisor &&
                    row_team >= unit_team;
  plan.threads = plan.split_rows ? row_team : unit_team;
  const int64_t batch = std::max<int64_t>(1, N), step_gate_bytes = batch * std::max<int64_t>(1, 4 * H * 2);
  const int64_t long_steps = std::min(ceil_div(limits::kBf16ProjectionChunkRows, batch),
                                      limits::kBf16ProjectionChunkBytes / step_gate_bytes);
  plan.chunk_steps = std::max({int64_t{1}, m.l2_bytes / limits::kBf16ProjectionL2Divisor / step_gate_bytes,
                               ceil_div(limits::kBf16MinProjectionChunkRows, batch), long_steps});
  plan.reason = plan.split_rows ? "bfloat16, packed W_hh fits one core's L2 and the batch is large: threads split "
                                  "the batch"
                                : "bfloat16, threads split hidden units, a barrier per step";
  return plan;
}

Bf16BackwardPlan plan_bf16_backward(int64_t N, int64_t H, int64_t R, bool projection, const Machine& m) {
  Bf16BackwardPlan plan;
  if (projection || m.bf16_kernels == CpuBf16Kernels::aten || R < limits::kMinRecurrenceRows) {
    plan.reason = projection ? "proj_size: the per-step loop"
                  : m.bf16_kernels == CpuBf16Kernels::aten
                      ? "this CPU has no AVX512-BF16 (or the avx512 kernels are not in use): the per-step loop"
                      : "too few rows in the sequence to repay packing W_hh: the per-step loop";
    return plan;
  }
  plan.fused = true;
  plan.kernel = bf16_recurrence_kernel(N, m);
  plan.packed_depth = ceil_div(4 * H, limits::kBf16PackedDepthMultiple) * limits::kBf16PackedDepthMultiple;
  plan.threads = team_size(H, H, N, ceil_div(H, 4 * kGroup), m);
  plan.reason = "bfloat16 backward recurrence: threads own 64-unit panels of dh, one barrier per step";
  return plan;
}

BackwardPlan plan_backward(int64_t N, int64_t H, int64_t R, bool float32, bool projection, bool vector_kernels,
                           const Machine& m) {
  BackwardPlan plan;
  if (!vector_kernels || !float32 || projection || R < limits::kMinRecurrenceRows) {
    plan.reason = !vector_kernels ? "this CPU has no vector kernels: the per-step loop"
                  : !float32      ? "not float32: the per-step loop"
                  : projection    ? "proj_size: the per-step loop"
                                  : "too few rows in the sequence to repay packing W_hh: the per-step loop";
    return plan;
  }
  plan.fused = true;
  plan.threads = team_size(H, H, N, ceil_div(H, 4 * kGroup), m);
  plan.k_chunks = ceil_div(4 * H, limits::kPanelChunkK);
  plan.reason = "fused backward recurrence: threads own 64-unit panels of dh, one barrier per step";
  return plan;
}

}  // namespace fused_lstm::cpu_plan
