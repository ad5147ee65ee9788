// Every constant behind the CPU planner's decisions (cpu_plan.h), each with the reason it has this value. The
// planner turns them and the CPU's own cache sizes (read from the OS once per process) into a plan; the
// kernels only execute plans. The measurements behind each value: docs/cpu.md ("The limits and their
// numbers"). Exposed as fused_lstm._C.cpu_kernel_limits() so that the tests cover both sides of each switch.
#pragma once

#include <cstdint>

namespace fused_lstm::cpu_limits {

// ---- The CPU's caches (cpu_plan.cpp reads them from sysconf, then /sys/devices/system/cpu/cpu0/cache) ----

// One core's L2 when the OS does not say: the smallest per-core L2 of the x86-64-v3/v4 CPUs the kernels target
// (AMD Zen 4/5), so that a wrong guess only costs speed, never thrashes.
constexpr int64_t kFallbackL2Bytes = int64_t{1} << 20;
// The shared L3 when the OS does not say: one AMD CCD's (Zen 4/5), the smallest L3 one core of those CPUs sees.
constexpr int64_t kFallbackL3Bytes = int64_t{32} << 20;
// The most L3 one layer counts on: a VM reports its host socket's whole L3 (hundreds of MB), shared with
// other tenants, and an AMD core sees only its CCD's 32 MB whatever the socket holds.
constexpr int64_t kMaxUsableL3Bytes = int64_t{32} << 20;

// ---- Products out = a @ b (CpuBackend::matmul, packed_gemm.h, dot_gemm.h) ----

// b = W^T with W's rows contiguous and fewer rows of a than this: W read in place by the dot kernel, since
// packing reads and writes all of W once per call, which only more rows repay.
constexpr int64_t kMaxInPlaceRows = 64;
// ... or than this when W has at least kLargeWeightBytes: a larger W costs more to pack.
constexpr int64_t kMaxInPlaceRowsLargeWeight = 128;
constexpr int64_t kLargeWeightBytes = int64_t{4} << 20;
// Fewer rows than this (or a transposed a over fewer k than kMinPackedDepth) never pack b: packing costs about
// as much as multiplying a handful of rows, and with a short reduction each packed element serves few k. A W
// read in place once is packed from its second use in the call (the per-step loop's W_hh) only with at least
// kMinPackedRows rows.
constexpr int64_t kMinPackedRows = 16;
constexpr int64_t kMinPackedDepth = 16;
// Reductions longer than this run in k chunks: a [1024][64] float panel chunk is 256 KB and stays in L2 next to
// the rows that pass over it. Fixed, not read from the CPU: the chunking decides the rounding, and results
// must not depend on the machine.
constexpr int64_t kPanelChunkK = 1024;
// The register tile moves its sums into a second set every this many k of an operand: whole-K running sums had
// 1.2-1.9x torch.nn.LSTM's float32 error. Fixed for the same reason as kPanelChunkK.
constexpr int64_t kSumChunkK = 256;
// Packed products with a panel's reduction in one piece: one parallel chunk holds at least this many
// (tile x k) steps (the rows of a task in whole tiles times K), since waking a thread costs a few µs.
constexpr int64_t kMinPanelChunkTileSteps = 8192;
// Packed products: row groups per panel so that every thread gets about this many tasks (a panel streams
// from memory once per task, so rows are split no further than load balance needs).
constexpr int64_t kPanelTasksPerThread = 4;
// Long reductions (K > kPanelChunkK): a task is a block of rows, a thread's share up to this many (each panel
// chunk then streams from L3 once per block and serves the block's row tiles from L2).
constexpr int64_t kMaxLongReductionBlockRows = 1024;
// Transposed left operands (the weight gradients' d_gates^T): a task gathers up to this many rows ...
constexpr int64_t kGatherRows = 256;
// ... by this many k at a time: a 512 KB block next to a 128 KB panel chunk in L2.
constexpr int64_t kGatherChunkK = 512;
// The weight gradients share one gather of d_gates^T while their packed operands together stay within this
// fraction (1 / kSharedGatherL3Divisor) of the usable L3: every row block streams all of them, and twice
// the bytes no longer stay in L3 across blocks.
constexpr int64_t kSharedGatherL3Divisor = 2;
// A row-major b read in place (rowmajor_matmul): tasks of this many rows by one 64-column panel ...
constexpr int64_t kRowMajorRowsPerTask = 64;
// ... with at least this many flops per parallel chunk (small products stay on the calling thread).
constexpr int64_t kRowMajorMinChunkFlops = int64_t{256} << 10;
// The dot kernel (W read in place): blocks of this many rows x columns (at K = 1024 each block's share of a and
// of W is 256 KB, so both stay in L2) ...
constexpr int64_t kDotBlock = 64;
// ... with at least this many multiply-adds per parallel chunk: waking a thread costs a few µs.
constexpr int64_t kDotMinChunkMacs = int64_t{1} << 18;
// bfloat16 products of fused_lstm's own kernels (bf16_dot_gemm.h) while they have fewer multiply-adds than this
// (about ATen's per-call cost, ~30 µs at N = 1 from oneDNN reordering W, in float32 FMAs on one core); more go to
// ATen, whose AMX GEMM repays that cost. Measured on a 2-core Xeon (AMX), one thread, T = 50 cell loops: at
// N = 8, H = 512 (8M multiply-adds a product) the in-place kernels lost to ATen, at N = 1, H = 512 (1M) tied.
constexpr int64_t kMaxBf16SmallProductMacs = int64_t{1} << 21;
// ... and, against W^T (vdpbf16ps), fewer rows than this.
constexpr int64_t kMaxBf16DotRows = 16;
// The per-step pointwise spans (all dtypes): at least this many elements (row x unit) per parallel chunk.
constexpr int64_t kPointwiseGrain = 4096;

// ---- Recurrences (recurrence_cpu.cpp) ----

// Threads for a recurrence with a barrier per step: one per this many flops of recurrent work per step. Below
// it the barrier costs more than the thread saves, and a barrier is where a busy machine hurts most.
constexpr int64_t kFlopsPerThread = int64_t{256} << 10;
// A packed fused recurrence needs at least this many rows in the whole sequence; with fewer, packing costs more
// than the per-step loop.
constexpr int64_t kMinRecurrenceRows = 16;
// Forward recurrences with batches up to this read W_hh in place when it has at least kInPlaceMinWeightBytes:
// packing a large W_hh costs more than a few rows gain, while a small one is cheap to pack and the in-place
// kernel's per-output reductions weigh more at small K.
constexpr int64_t kMaxInPlaceBatch = 4;
constexpr int64_t kInPlaceMinWeightBytes = int64_t{2} << 20;
// The input projection fused step by step into the recurrent product's register tiles needs this many rows per
// step to reuse each thread's W_ih panels ...
constexpr int64_t kFusedProjectionMinBatch = 32;
// ... and a thread's share of packed W_ih + W_hh within 1 / kFusedProjectionL2Divisor of its core's L2 (the
// rest holds the step's rows and gates); else every step would re-read W_ih from L3.
constexpr int64_t kFusedProjectionL2Divisor = 2;
// Otherwise the recurrence projects chunks of steps of about this many rows (one pass of W_ih per chunk; the
// chunk's gates stay in cache until its steps use them) ...
constexpr int64_t kProjectionChunkRows = 256;
// ... unless packed W_ih + W_hh exceed 1 / kProjectionChunkL3Divisor of the usable L3: then each pass of W_ih
// evicts W_hh, and longer chunks of kLargeProjectionChunkBytes of gates make fewer passes. That size stays
// under glibc's 32 MB ceiling for reusing freed mmap'd blocks (above it every call faults its buffer in).
constexpr int64_t kProjectionChunkL3Divisor = 2;
constexpr int64_t kLargeProjectionChunkBytes = int64_t{24} << 20;
// Threads split the batch rows instead of the hidden units (no barrier per step) when the batch has at least
// kRowSplitMinBatch rows, kRowSplitMinRowsPerThread per thread, and all the packed weights fit in
// kRowSplitL2Multiple x one core's L2: each thread then streams all of them every step.
constexpr int64_t kRowSplitMinBatch = 32;
constexpr int64_t kRowSplitMinRowsPerThread = 16;
constexpr int64_t kRowSplitL2Multiple = 1;

// ---- The bfloat16 forward recurrence (bf16_recurrence.cpp) ----

// W_hh is packed with its reduction (Hout) padded to a multiple of this: one AMX tile row is 32 bfloat16 (64
// bytes), and vdpbf16ps reads pairs. The padding is zeros in W_hh and in h, so it adds nothing.
constexpr int64_t kBf16PackedDepthMultiple = 32;
// Rows per AMX tile: the tile multiplies this many rows whatever the batch (padding rows are zeros).
constexpr int64_t kAmxTileRows = 16;
// bfloat16 per AMX A tile row (64 bytes): a product on tiles runs over a multiple of this many k.
constexpr int64_t kAmxTileDepth = 32;
// Rows per vdpbf16ps register tile: 4 accumulators (the 64 columns of a panel) per row, plus 4 panel vectors
// and a broadcast, within AVX-512's 32 registers.
constexpr int64_t kDpbf16RowTile = 6;
// Batches below this take the vdpbf16ps kernel even where AMX runs: an AMX tile computes 16 rows whatever
// the batch, so at a few rows it does 16/N times the work of vdpbf16ps for the same weights read. At 4 rows
// AMX already took 0.67 / 7.6 ms against vdpbf16ps' 0.88 / 10.3 (T = 50, H = 128 / 512, one Xeon core); below,
// unmeasured, vdpbf16ps is kept.
constexpr int64_t kAmxMinBatch = 4;
// bfloat16 splits the batch rows (as kRowSplit* above) only while the packed W_hh takes at most 1 /
// kBf16RowSplitL2Divisor of one core's L2: each thread streams all of it every step next to its rows' gates, and
// at exactly one L2 (H = 512) the units split ran 3% faster (16.4 against 17.0 ms, N = 64, 2 Xeon cores).
constexpr int64_t kBf16RowSplitL2Divisor = 2;
// The input projection runs in chunks of steps whose bfloat16 gates take at most 1 / kBf16ProjectionL2Divisor of
// one core's L2, just before the team runs them, so that the pointwise step finds them in cache ...
constexpr int64_t kBf16ProjectionL2Divisor = 2;
// ... but of kBf16ProjectionChunkRows rows, fewer (whole steps) where their buffer (inference's; training writes
// the workspace) would pass kBf16ProjectionChunkBytes, and never fewer than kBf16MinProjectionChunkRows: oneDNN's
// bfloat16 GEMM reorders W_ih on every call, a cost the size of the GEMM of a fixed number of rows whatever H and
// I (docs/cpu.md). The byte limit stays under glibc's 32 MiB ceiling for reusing a freed mmap'd block, with room
// for its header (above it every call faults its buffer in).
constexpr int64_t kBf16ProjectionChunkRows = 4096;
constexpr int64_t kBf16ProjectionChunkBytes = int64_t{30} << 20;
constexpr int64_t kBf16MinProjectionChunkRows = 1024;
// The pointwise step prefetches the gates of the row this many rows ahead (they are 8H bytes apart, too far for
// the hardware's stride prefetcher from H = 256 on).
constexpr int64_t kBf16PrefetchRows = 4;

// Per-step weight gradients (recycled_gradients.h): at most this many freed blocks are kept within a backward
// pass, the two weight gradients of each of four cells per step.
constexpr int64_t kMaxKeptGradientBlocks = 8;

}  // namespace fused_lstm::cpu_limits
