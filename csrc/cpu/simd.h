// 16-float vectors in GCC vector extensions for the CPU kernels: one zmm in the AVX-512 clones. The other
// clones have no register this wide and keep every such vector in memory (16-38x slower), so the backend runs
// these kernels only on AVX-512 CPUs (cpu_features.h). The helpers are always inlined into the ISA clones,
// so no vector crosses an ABI boundary.
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

// In-place transpose of a 16 x 16 block held as 16 row vectors: four rounds, each swapping the off-diagonal
// B x B blocks inside every 2B x 2B block (B = 8, 4, 2, 1), one two-source shuffle per vector per round.
template <int B>
FUSED_LSTM_ALWAYS_INLINE void swap_off_diagonal_blocks(vec16 (&v)[16]) {
  for (int i = 0; i < 16; ++i) {
    if ((i / B) % 2) continue;
    const vec16 a = v[i], b = v[i + B];
    if constexpr (B == 8) {
      v[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
      v[i + B] = __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    } else if constexpr (B == 4) {
      v[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
      v[i + B] = __builtin_shufflevector(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    } else if constexpr (B == 2) {
      v[i] = __builtin_shufflevector(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
      v[i + B] = __builtin_shufflevector(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    } else {
      static_assert(B == 1);
      v[i] = __builtin_shufflevector(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
      v[i + B] = __builtin_shufflevector(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    }
  }
}

FUSED_LSTM_ALWAYS_INLINE void transpose16x16(vec16 (&v)[16]) {
  swap_off_diagonal_blocks<8>(v);
  swap_off_diagonal_blocks<4>(v);
  swap_off_diagonal_blocks<2>(v);
  swap_off_diagonal_blocks<1>(v);
}

}  // namespace fused_lstm
