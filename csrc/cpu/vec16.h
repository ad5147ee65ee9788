// 16-float vectors in GCC vector extensions for the CPU kernels: one zmm in the AVX-512 clones, two ymm in
// the AVX2 ones. The helpers are always inlined into the ISA clones, so no vector crosses an ABI boundary.
#pragma once

#include <cstdint>
#include <cstring>

#include "step_spans.h"

#pragma GCC diagnostic ignored "-Wpsabi"

namespace fused_lstm {

constexpr int64_t kLanes = 16;  // floats per vector

typedef float vec16 __attribute__((vector_size(kLanes * sizeof(float))));
typedef float vec4 __attribute__((vector_size(4 * sizeof(float))));

FUSED_LSTM_ALWAYS_INLINE vec16 load16(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The first n (< 16) floats of p, zero past them: the tail of a row whose length is not a multiple of 16.
FUSED_LSTM_ALWAYS_INLINE vec16 load16_partial(const float* p, int64_t n) {
  vec16 v = {};
  std::memcpy(&v, p, n * sizeof(float));
  return v;
}

FUSED_LSTM_ALWAYS_INLINE void store16(float* p, vec16 v) { std::memcpy(p, &v, sizeof(v)); }

// A vector's lanes summed down to four: {sum of lanes l = i mod 4}.
FUSED_LSTM_ALWAYS_INLINE vec4 fold_to4(vec16 v) {
  typedef float vec8 __attribute__((vector_size(8 * sizeof(float))));
  const vec8 half = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                    __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return __builtin_shufflevector(half, half, 0, 1, 2, 3) + __builtin_shufflevector(half, half, 4, 5, 6, 7);
}

// The sums of four vectors' lanes, as one 4-vector: {sum(v0), sum(v1), sum(v2), sum(v3)}. Folding each to
// four lanes first and transposing the last steps shares the final shuffles among the four.
FUSED_LSTM_ALWAYS_INLINE vec4 reduce_add4(vec16 v0, vec16 v1, vec16 v2, vec16 v3) {
  const vec4 q0 = fold_to4(v0), q1 = fold_to4(v1), q2 = fold_to4(v2), q3 = fold_to4(v3);
  // t01 = {q0[0]+q0[2], q0[1]+q0[3], q1[0]+q1[2], q1[1]+q1[3]}, likewise t23; then pairwise again.
  const vec4 t01 = __builtin_shufflevector(q0, q1, 0, 1, 4, 5) + __builtin_shufflevector(q0, q1, 2, 3, 6, 7);
  const vec4 t23 = __builtin_shufflevector(q2, q3, 0, 1, 4, 5) + __builtin_shufflevector(q2, q3, 2, 3, 6, 7);
  return __builtin_shufflevector(t01, t23, 0, 2, 4, 6) + __builtin_shufflevector(t01, t23, 1, 3, 5, 7);
}

}  // namespace fused_lstm
