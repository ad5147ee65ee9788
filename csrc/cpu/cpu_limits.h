// Where the CPU backend switches between kernel forms, in one place: measured on a 2-core AVX-512 machine
// (benchmarks/NOTES.md) and exposed as fused_lstm._C.cpu_kernel_limits() so that the tests cover both
// sides of each switch.
#pragma once

#include <cstdint>

namespace fused_lstm::cpu_limits {

// Float32 products W-rows-contiguous (out = a @ W^T) with fewer rows of a than kMaxInPlaceRows, or than
// kMaxInPlaceRowsLargeWeight when W has at least kLargeWeightBytes, read W in place (dot_gemm.h) instead of
// packing it: packing reads and writes all of W once per call, which a large W repays only over more rows.
// A W that a second product of the same call uses (the per-step loop's W_hh and W_hr) is packed from then
// on, when the rows are at least kMinPackedRows: its packed copy serves every later step.
// LSTMCell loops, T = 50, inference (ms, in place / packed; AVX-512, then the AVX2 kernels): batch 64,
// H = 128 5.2 / 4.1, 8.0 / 5.4; H = 256 11.8 / 10.0, 23.7 / 17.5; H = 512 (4 MB) 38 / 38-41, 80-84 / 79-81;
// H = 1024 (16 MB) 164-172 / 198-238; batch 100, H = 1024 310-313 / 290; batch 48, H = 128 3.3 / 2.8,
// 6.2 / 6.8; batch 32, H = 128 3.4 / 4.6, 4.6 / 5.4; H = 512 20.5 / 24.7, 41 / 44.5 (the switch was 128 rows
// for every W before these). The per-step loop (proj_size), packed from the second step: batch 100, H = 512,
// proj 256 48.6 -> 38.0 ms, batch 32, H = 256, proj 128 4.4 -> 3.8, batch 16, H = 128, proj 64 1.10 -> 0.88.
constexpr int64_t kMaxInPlaceRows = 64;
constexpr int64_t kMaxInPlaceRowsLargeWeight = 128;
constexpr int64_t kLargeWeightBytes = int64_t{4} << 20;

// Other products with fewer rows than this, or with a transposed left operand over fewer k than
// kMinPackedDepth (the weight gradients of a step or a short sequence, d_gates^T @ x), read the right
// operand in place when its rows are contiguous (packed_gemm.h, rowmajor_matmul) and go through ATen
// otherwise: packing costs about as much as multiplying a handful of rows, and with a short reduction
// each packed element serves a handful of k. An LSTMCell training step at batch 8, H = 256: 0.70-0.75 ms
// packed, 0.32 ms through ATen (whose small products wake MKL's OpenMP team on every call), 0.24 in place.
constexpr int64_t kMinPackedRows = 16;
constexpr int64_t kMinPackedDepth = 16;

// Fused forward recurrences with batches up to kMaxInPlaceBatch read W_hh in place when it is at least
// kInPlaceMinWeightBytes; otherwise they pack it once per call. Packing a large W_hh costs more than a
// few rows gain from it (batch 1, H = 512: 1.4 ms in place vs 1.8-3.7 packed); a small one is cheap to
// pack, and the in-place kernel's per-output reductions weigh more at small K (batch 4, H = 128: 0.24 ms
// in place vs 0.20 packed; T=20, batch 4, H=64: 0.104 vs 0.076).
constexpr int64_t kMaxInPlaceBatch = 4;
constexpr int64_t kInPlaceMinWeightBytes = int64_t{2} << 20;

// A packed forward recurrence computes the input projection itself, each thread for its own gate columns.
// Step by step, in the same register tiles as the recurrent product, when a step has rows enough to reuse
// each thread's W_ih panels (at least kFusedProjectionMinBatch) and the thread's share of packed W_ih and
// W_hh fits in kFusedProjectionMaxSliceBytes (half this machine's L2); otherwise step by step would re-read
// W_ih from L3 every step (batch 32, H = 1024: 74 ms vs 60 ms with the whole projection first) ...
constexpr int64_t kFusedProjectionMinBatch = 32;
constexpr int64_t kFusedProjectionMaxSliceBytes = int64_t{1} << 20;

// ... and it projects chunks of steps of about this many rows at a time instead (one pass of its W_ih
// panels per chunk; the chunk's gates, [rows, 4H], stay in cache until its steps use them; against the
// driver projecting the whole sequence into a [R, 4H] buffer first, batch 64, H = 1024: 128 -> 116 ms) ...
constexpr int64_t kProjectionChunkRows = 256;

// ... unless W_ih and W_hh together, packed, exceed kProjectionChunkMaxWeightBytes: then the chunks hold up to
// kLargeProjectionChunkBytes of gates (rows = that / 16 H: 1536 at H = 1024). Every pass of W_ih over a chunk
// pushes W_hh out of the shared L3 (32 MB here; the two weights take 32 MB at H = I = 1024), so the steps
// after it stream W_hh from memory again, and at such sizes a chunk's gates no longer stay in cache anyway.
// Inference, H = 1024 (ms, 256-row chunks / 24 MB chunks, alternating runs): with the heap kept (benchmarks/
// NOTES.md) batch 64 123-126 / 119-121, batch 32 65-66 / 61-62, batch 8 21.6-22.1 / 18.0-18.4; with glibc's
// default heap batch 64 123-133 / 121-125, batch 32 67-68 / 60-63, batch 8 19.5-30 / 18-21.6. Larger chunks
// are no faster with the heap kept, and past glibc's 32 MB ceiling for reusing freed mmap'd blocks the buffer
// is mapped and faulted in afresh by every call (64 MB: 142-148 ms at batch 64). At H = 512 (8 MB of
// weights) chunk size makes no difference; at H = 128-256 small batches lose with long chunks (batch 8,
// H = 256: 1.1-1.3 ms / 1.4).
constexpr int64_t kProjectionChunkMaxWeightBytes = int64_t{16} << 20;
constexpr int64_t kLargeProjectionChunkBytes = int64_t{24} << 20;

// A packed forward recurrence gives each thread whole sequences (rows of the batch) instead of a slice of
// the hidden units when the batch has at least kRowSplitMinBatch rows, all of its packed weights (W_ih and
// W_hh) fit in kRowSplitMaxWeightBytes and the split uses as many threads as the unit split would: the
// threads then never wait for each other, where the unit split meets at a barrier every step (batch 64,
// H = 128: 2.05 ms vs 2.17 ms). Each thread then streams all the weights every step, from L2 or L3: at
// 2 MB (H = 256, I = 256) the row split still gains (batch 64 inference 7.59-7.64 ms vs 7.64-8.17, training
// 26.1-26.4 vs 26.8-27.0, batch 32 4.0-4.1 vs 4.1-4.3; three alternating runs), at 8 MB (H = 512) nothing
// (29.0-29.2 ms either way). At least kRowSplitMinRowsPerThread rows per thread.
constexpr int64_t kRowSplitMinBatch = 32;
constexpr int64_t kRowSplitMinRowsPerThread = 16;
constexpr int64_t kRowSplitMaxWeightBytes = int64_t{2} << 20;

// A packed fused recurrence (forward with a larger batch, or backward) needs at least this many rows in
// the whole sequence; with fewer, the per-step loop is cheaper than packing.
constexpr int64_t kMinRecurrenceRows = 16;

// Weight gradients (d_gates^T @ input and d_gates^T @ h_prev) share one gather of each d_gates^T block
// while their packed right operands together stay within this many bytes; beyond it each runs its own
// pass (and gather), since every row block streams all the packed operands it serves and twice the
// bytes no longer stay in the shared L3 across blocks. T=50, batch 64, both products and the bias sum
// (ms, separate / shared): H=256 (6.5 MB packed) 8.62 / 8.03, H=512 (13 MB) 31.7 / 31.3, H=1024 (26 MB)
// 126.0 / 130.6 (64-row blocks); with 256-row blocks 113.6-114.4 / 112.1-114.8, so still separate.
constexpr int64_t kSharedGatherMaxPackedBytes = int64_t{16} << 20;

}  // namespace fused_lstm::cpu_limits
