// The LSTM activations on whole vectors, for the CPU kernels' explicit pointwise loops (VectorActivations,
// passed to cell_forward / cell_backward in csrc/lstm_cell.h). They evaluate lstm_cell.h's own range
// reductions and polynomials, so a vector lane gives what the scalar code gives; only the clamps (lane
// selects) and the scaling by 2^n (integer lanes) are written here.
//
// Why explicit vectors: the auto-vectorised scalar loop (step_spans.h) took twice as long per unit as these in
// its AVX2 build (66-67 against 36 ns per 16 units, forward step, 64 rows x 128 units in cache). With AVX-512
// it is the faster one (15.5 against 18.2 ns), so that build keeps it (simd.h, kPointwiseLanes).
#pragma once

#include "../lstm_cell.h"
#include "simd.h"

namespace fused_lstm {

template <int Lanes>
struct IntVectorOf {
  typedef int32_t type __attribute__((vector_size(Lanes * sizeof(int32_t))));
};
// Lanes int32s, the integer view of a vec<Lanes>.
template <int L>
using ivec = typename IntVectorOf<L>::type;

template <int L>
FUSED_LSTM_ALWAYS_INLINE vec<L> broadcast(float x) {
  return vec<L>{} + x;
}

// Lane-wise max(x, lo) and min(x, hi) that keep a NaN lane NaN, as the scalar clamps do.
template <int L>
FUSED_LSTM_ALWAYS_INLINE vec<L> at_least(vec<L> x, float lo) {
  return x < lo ? broadcast<L>(lo) : x;
}
template <int L>
FUSED_LSTM_ALWAYS_INLINE vec<L> at_most(vec<L> x, float hi) {
  return x > hi ? broadcast<L>(hi) : x;
}

template <int L>
FUSED_LSTM_ALWAYS_INLINE ivec<L> bits_of(vec<L> x) {
  ivec<L> bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}
template <int L>
FUSED_LSTM_ALWAYS_INLINE vec<L> from_bits(ivec<L> bits) {
  vec<L> x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// 2^n for integral n in [-126, 127], through the exponent bits (detail::pow2_integral per lane).
template <int L>
FUSED_LSTM_ALWAYS_INLINE vec<L> pow2_integral(vec<L> n) {
  return from_bits<L>((__builtin_convertvector(n, ivec<L>) + 127) << 23);
}

template <int L>
FUSED_LSTM_ALWAYS_INLINE vec<L> exp_vec(vec<L> x) {
  x = at_most<L>(at_least<L>(x, detail::kExpMin), detail::kExpMax);
  vec<L> n;
  const vec<L> r = detail::reduce_by_ln2(x, &n);
  return detail::exp_reduced(r) * pow2_integral<L>(n);
}

// detail::tanh_host per lane.
template <int L>
FUSED_LSTM_ALWAYS_INLINE vec<L> tanh_vec(vec<L> x) {
  const ivec<L> sign = bits_of<L>(x) & static_cast<int32_t>(0x80000000u);
  const vec<L> y = at_least<L>(from_bits<L>(bits_of<L>(x) | static_cast<int32_t>(0x80000000u)) * 2.0f,
                               detail::kTanhMinExponent);  // -2|x|
  vec<L> n;
  const vec<L> r = detail::reduce_by_ln2(y, &n);
  const vec<L> scale = pow2_integral<L>(n);
  const vec<L> u = scale * detail::expm1_reduced(r) + (scale - 1.0f);
  const vec<L> magnitude = -u / (2.0f + u);  // tanh|x|, or -0 at x = 0
  return from_bits<L>((bits_of<L>(magnitude) & 0x7fffffff) | sign);  // copysign(magnitude, x)
}

template <int L>
struct VectorActivations {
  FUSED_LSTM_ALWAYS_INLINE static vec<L> sigmoid(vec<L> x) { return 1.0f / (1.0f + exp_vec<L>(-x)); }
  FUSED_LSTM_ALWAYS_INLINE static vec<L> tanh(vec<L> x) { return tanh_vec<L>(x); }
};

}  // namespace fused_lstm
