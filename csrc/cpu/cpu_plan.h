// The CPU planner: which float32 kernel, schedule and thread split run for a shape, decided in one place. Every
// function here is pure: it reads the shape, a Machine (thread count, the kernels' row tile, the CPU's cache
// sizes) and the constants of cpu_limits.h, and returns a plan that the kernels (lstm_cpu.cpp, packed_gemm.cpp,
// dot_gemm.cpp, recurrence_cpu.cpp) execute as it says. fused_lstm._C.cpu_plan_* expose each of them, and
// fused_lstm.explain() walks a layer through them.
#pragma once

#include <cstdint>

#include "cpu_features.h"

namespace fused_lstm::cpu_plan {

// Bytes of one float32.
constexpr int64_t kFloatBytes = 4;

// What a plan depends on besides the shape.
struct Machine {
  int64_t threads = 1;   // the team a call may use (at::get_num_threads())
  int64_t row_tile = 6;  // rows per packed-panel register tile of the kernels in use (simd.h, kRowTile)
  int64_t l2_bytes = 0;  // one core's L2
  int64_t l3_bytes = 0;  // the L3 a core shares with the others
  CpuBf16Kernels bf16_kernels = CpuBf16Kernels::aten;  // the best bfloat16 product kernel the call may use
};

// The CPU's caches, read once per process: sysconf(_SC_LEVEL2_CACHE_SIZE / _SC_LEVEL3_CACHE_SIZE), else
// /sys/devices/system/cpu/cpu0/cache/index*/size, else cpu_limits' kFallbackL2Bytes / kFallbackL3Bytes.
struct CacheSizes {
  int64_t l2_bytes = 0, l3_bytes = 0;
  const char* l2_source = "";  // "sysconf", "sysfs" or "fallback"
  const char* l3_source = "";
};
const CacheSizes& cpu_caches();

// The machine a call made now runs on: cpu_caches(), at::get_num_threads() and the selected kernels' row tile.
Machine this_machine();

// ---- Limits that follow from the caches (cpu_limits.h says why) ----

int64_t usable_l3_bytes(const Machine& m);
int64_t fused_projection_max_slice_bytes(const Machine& m);   // a thread's packed W_ih + W_hh share
int64_t projection_chunk_max_weight_bytes(const Machine& m);  // packed W_ih + W_hh for 256-row chunks
int64_t row_split_max_weight_bytes(const Machine& m);         // packed W_ih + W_hh for the batch-row split
int64_t shared_gather_max_packed_bytes(const Machine& m);     // packed operands sharing one d_gates^T gather

// Bytes of a [K, cols] right operand packed into 64-column panels.
int64_t packed_bytes(int64_t K, int64_t cols);

// ---- Products out[M, cols] (+)= a[M, K] @ b[K, cols] (CpuBackend::matmul) ----

enum class ProductKernel {
  aten,      // ATen's GEMM (float16, strided outputs, no vector kernels, small products with strided b)
  bf16_amx,  // bfloat16, 2 to 16 rows, b = W^T read in place as AMX A tiles (bf16_dot_gemm.h, bf16_amx_matmul)
  bf16_amx_rowmajor,  // bfloat16, 2 to 16 rows, b's rows paired into AMX B tiles on the fly (bf16_dot_gemm.h)
  bf16_dot,  // bfloat16, few rows and multiply-adds, b = W^T read in place with vdpbf16ps (bf16_dot_gemm.h)
  bf16_rowmajor,  // bfloat16, few multiply-adds, b's rows read in place, float32 FMAs (bf16_dot_gemm.h)
  dot,       // b = W^T read in place, dot products along W's rows (dot_gemm.h)
  rowmajor,  // b read in place as panel rows (packed_gemm.h, rowmajor_matmul)
  packed,    // b packed into 64-column panels once per call, then the register-tiled kernel (packed_matmul)
};
const char* name(ProductKernel kernel);

// One product as CpuBackend::matmul sees it.
struct ProductShape {
  int64_t rows = 0, depth = 0, cols = 0;  // M, K, Nc
  bool vector_kernels = true;  // float32 with unit-stride output columns, on a CPU with the vector kernels
  bool bf16_dot_kernels = false;  // bfloat16 with unit-stride output columns, on a CPU with AVX512-BF16 in use
  bool bf16_amx = false;          // ... and AMX tiles in use (cpu_bf16_kernels() == amx)
  bool a_rows_contiguous = true;   // a.stride(1) == 1
  bool a_transposed = false;       // a.stride(0) == 1 (a transposed view, e.g. d_gates^T)
  bool b_is_w_transposed = false;  // b.stride(0) == 1: b = W^T with W's rows contiguous
  bool b_rows_contiguous = true;   // b.stride(1) == 1
  // What this op call did with the same b before (the backend keeps both for one call):
  bool b_packed_before = false;     // it holds b packed: reuse
  bool b_in_place_before = false;   // it read b in place once
};

struct ProductPlan {
  ProductKernel kernel = ProductKernel::aten;
  bool first_in_place_use = false;  // the backend records b as read in place (dot, first use)
  const char* reason = "";
};
ProductPlan plan_product(const ProductShape& shape);

// How a packed product's work is cut into tasks (packed_gemm.cpp).
enum class PackedSchedule {
  panel_tasks,   // tasks of (panel, group of rows); the whole reduction per task
  long_k_rows,   // K > kPanelChunkK: tasks are blocks of rows, each panel in k chunks of kPanelChunkK
  gather_rows,   // a transposed: tasks gather blocks of kGatherRows rows of a, k chunks of kGatherChunkK
};
const char* name(PackedSchedule schedule);

struct PackedProductPlan {
  PackedSchedule schedule = PackedSchedule::panel_tasks;
  int64_t tasks = 0;          // parallel_for range
  int64_t grain = 1;          // parallel_for grain
  int64_t rows_per_task = 0;  // panel_tasks: rows per task (whole tiles); others: the block target
  const char* reason = "";
};
PackedProductPlan plan_packed_product(int64_t rows, int64_t depth, int64_t cols, bool a_transposed, const Machine& m);

// Row blocks for tasks of at most max_rows rows, their count a multiple of the thread count while the blocks
// stay at least max_rows / 2 rows (at::parallel_for gives each thread an equal range of tasks). Block b is
// rows [M * b / blocks, M * (b + 1) / blocks).
int64_t balanced_row_blocks(int64_t rows, int64_t max_rows, int64_t threads);

// rowmajor_matmul's tasks: (panel, block of kRowMajorRowsPerTask rows), at least kRowMajorMinChunkFlops each.
struct TaskGrid {
  int64_t tasks = 0, grain = 1;
};
TaskGrid plan_rowmajor_product(int64_t rows, int64_t depth, int64_t cols);
// dot_matmul's tasks: blocks of kDotBlock x kDotBlock outputs, at least kDotMinChunkMacs each.
TaskGrid plan_dot_product(int64_t rows, int64_t depth, int64_t cols);

// The weight gradients d_gates^T @ input and d_gates^T @ h_prev (+ the bias sum): one pass of packed products
// sharing each gathered block of d_gates^T (up to shared_gather_max_packed_bytes of packed operands per pass),
// or, when the sequence is too short to repay packing, two products through plan_product.
struct WeightGradientPlan {
  bool packed = false;
  int64_t passes = 0;  // gathers of d_gates^T: 1 when both operands share it, else 2
  const char* reason = "";
};
// gate_rows = 4H, rows = R (all the sequence's rows), input_size = I, out_hidden = Hout.
WeightGradientPlan plan_weight_gradients(int64_t gate_rows, int64_t rows, int64_t input_size, int64_t out_hidden,
                                         bool vector_kernels, const Machine& m);
// How many consecutive operands of the given packed sizes share one pass, from `first`.
int64_t shared_gather_count(const int64_t* packed_operand_bytes, int64_t count, int64_t first, const Machine& m);

// ---- Recurrences (recurrence_cpu.cpp) ----

// Threads for a recurrence whose work per step is 8 H K N flops, at most one per slice (unit block or panel).
int64_t team_size(int64_t H, int64_t K, int64_t N, int64_t slices, const Machine& m);

// One forward recurrence direction: N rows per step (the batch), hidden H, h of Hout, input I, R rows in all.
struct ForwardShape {
  int64_t batch = 0, hidden = 0, out_hidden = 0, input_size = 0, rows = 0;
  bool float32 = true;
  bool projection = false;      // proj_size (w_hr): the per-step loop, always
  bool vector_kernels = true;   // the CPU runs fused_lstm's kernels (cpu_features.h)
  bool required = false;        // recurrence='persistent': the fused recurrence or an error
};

struct ForwardPlan {
  // Whether the fused recurrence runs at all (else the driver's per-step loop with per-product plans).
  bool fused = false;
  // Small batches with a large W_hh: W_hh read in place, after the driver's input projection. Otherwise the
  // weights are packed and the recurrence computes the input projection itself, each thread for its own gate
  // columns (no barrier between projection and recurrence).
  bool in_place = false;
  bool split_rows = false;           // threads split the batch, not the hidden units (no barrier per step)
  bool per_step_projection = false;  // x.W_ih in the same register tiles as h.W_hh, step by step ...
  int64_t chunk_steps = 1;           // ... else for chunks of steps
  int64_t threads = 1;
  const char* reason = "";
};
// The shape of one direction: N rows per step, hidden H, h of out_hidden (0: H, no projection), input I, R rows.
ForwardShape forward_shape(int64_t batch, int64_t hidden, int64_t input_size, int64_t rows, int64_t out_hidden,
                           bool projection, bool required);
ForwardPlan plan_forward(const ForwardShape& shape, const Machine& m);

// One bfloat16 forward recurrence direction (bf16_recurrence.cpp): the driver projects the input (ATen's
// GEMM), the recurrence packs W_hh into VNNI pairs and runs h_{t-1} @ W_hh^T with `kernel` and the pointwise step
// in float32, threads splitting the hidden units (a barrier per step) or the batch rows (none).
struct Bf16ForwardPlan {
  bool fused = false;
  CpuBf16Kernels kernel = CpuBf16Kernels::aten;  // amx or avx512_bf16 when fused
  bool split_rows = false;
  int64_t row_tile = 1;        // rows per product tile: a row split cuts the batch at multiples of it
  int64_t packed_depth = 0;    // Hout padded to kBf16PackedDepthMultiple
  int64_t chunk_steps = 1;     // steps per chunk of the input projection (ATen's GEMM between team runs)
  int64_t threads = 1;
  const char* reason = "";
};
Bf16ForwardPlan plan_bf16_forward(const ForwardShape& shape, const Machine& m);

// One bfloat16 backward recurrence direction (bf16_recurrence.cpp): W_hh packed into VNNI pairs of 64 units, each
// thread owning whole panels of dh = d_gates @ W_hh, one barrier per step (as plan_backward's float32 one).
struct Bf16BackwardPlan {
  bool fused = false;
  CpuBf16Kernels kernel = CpuBf16Kernels::aten;
  int64_t packed_depth = 0;  // 4H padded to kBf16PackedDepthMultiple
  int64_t threads = 1;
  const char* reason = "";
};
Bf16BackwardPlan plan_bf16_backward(int64_t batch, int64_t hidden, int64_t rows, bool projection, const Machine& m);

// One backward recurrence direction (never with projections: those take the per-step loop).
struct BackwardPlan {
  bool fused = false;
  int64_t threads = 1;    // each owns 64-unit panels of dh = d_gates @ W_hh
  int64_t k_chunks = 1;   // of kPanelChunkK over the 4H reduction
  const char* reason = "";
};
BackwardPlan plan_backward(int64_t batch, int64_t hidden, int64_t rows, bool float32, bool projection,
                           bool vector_kernels, const Machine& m);

}  // namespace fused_lstm::cpu_plan
