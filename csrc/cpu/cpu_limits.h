// Where the CPU backend switches between kernel forms, in one place: measured on a 2-core AVX-512 machine
// (benchmarks/NOTES.md) and exposed as fused_lstm._C.cpu_kernel_limits() so that the tests cover both
// sides of each switch.
#pragma once

#include <cstdint>

namespace fused_lstm::cpu_limits {

// Float32 products W-rows-contiguous (out = a @ W^T) with fewer rows of a than this read W in place
// (dot_gemm.h) instead of packing it: packing reads and writes all of W once per call.
constexpr int64_t kMaxInPlaceRows = 128;

// Other products with fewer rows than this, whose right operand does not come back, go through ATen:
// packing costs about as much as multiplying a handful of rows.
constexpr int64_t kMinPackedRows = 16;

// Fused forward recurrences with batches up to this read W_hh in place; larger ones pack it once per call.
constexpr int64_t kMaxInPlaceBatch = 4;

// A packed fused recurrence (forward with a larger batch, or backward) needs at least this many rows in
// the whole sequence; with fewer, the per-step loop is cheaper than packing.
constexpr int64_t kMinRecurrenceRows = 16;

}  // namespace fused_lstm::cpu_limits
