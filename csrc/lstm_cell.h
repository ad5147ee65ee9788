// The LSTM cell math, written once and shared by the CPU kernels (csrc/cpu/) and the CUDA kernels
// (csrc/cuda/). Everything here is scalar and header-only so that both compilers inline it into their
// own loops: the CPU walks rows with at::parallel_for, CUDA walks them with one thread per element.
//
// Gate order is PyTorch's: i, f, g, o. With pre-activations a_i, a_f, a_g, a_o (input projection plus
// recurrent projection plus both biases):
//   i = sigmoid(a_i)   f = sigmoid(a_f)   g = tanh(a_g)   o = sigmoid(a_o)
//   c' = f * c + i * g
//   h' = o * tanh(c')
// Backward of one step, from the saved post-activation gates and the previous cell state (c' is
// recomputed, which is cheaper than storing it):
//   dc_total = dc' + dh' * o * (1 - tanh(c')^2)
//   di = dc_total * g * i (1 - i)        df = dc_total * c * f (1 - f)
//   dg = dc_total * i * (1 - g^2)        do = dh' * tanh(c') * o (1 - o)
//   dc = dc_total * f
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSED_LSTM_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced, so that the CPU kernels' per-ISA clones (csrc/cpu/) inline and vectorise the math.
#define FUSED_LSTM_HOST_DEVICE inline __attribute__((always_inline))
#else
#define FUSED_LSTM_HOST_DEVICE inline
#endif

namespace fused_lstm {

namespace detail {

// Host float exp and tanh without branches (Cephes polynomials, a few ulp): the C library's expf and
// tanhf are opaque calls the compiler cannot vectorise, and the pointwise step is almost all
// transcendental math, so with them a step costs ~10x more than the recurrent GEMM at small batch.
// The range reductions and polynomials below are templates over T, a float or a GCC vector of floats (+, -
// and * with float constants only), so that the CPU's explicit vector kernels (csrc/cpu/simd_math.h)
// evaluate exactly these on whole vectors; the clamps and the scaling by 2^n, which need selects and bit
// operations, are written per type.

// round(x) for |x| < 2^22 by the 1.5 * 2^23 trick, which stays a plain add/sub in every vector ISA.
template <typename T>
FUSED_LSTM_HOST_DEVICE T round_small(T x) {
  return (x + 12582912.0f) - 12582912.0f;
}

// n = round(x / ln 2) and r = x - n ln 2 (ln 2 in two parts, so r keeps its precision); |r| <= ln 2 / 2.
template <typename T>
FUSED_LSTM_HOST_DEVICE T reduce_by_ln2(T x, T* n) {
  *n = round_small(x * 1.44269504088896341f);
  return (x - *n * 0.693359375f) + *n * 2.12194440e-4f;
}

// e^r for |r| <= ln 2 / 2.
template <typename T>
FUSED_LSTM_HOST_DEVICE T exp_reduced(T r) {
  T p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// e^r - 1 for |r| <= ln 2 / 2: r + r^2 (1/2 + r/6 + ... + r^5/5040); the first term left out is < 2e-8
// relative.
template <typename T>
FUSED_LSTM_HOST_DEVICE T expm1_reduced(T r) {
  T p = r * 1.98412698e-4f + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  return p * r * r + r;
}

// Bounds of the clamps: beyond them exp over- or underflows, and tanh is +-1 in float while 2^n stays normal.
constexpr float kExpMin = -87.33654f, kExpMax = 88.3762626647949f, kTanhMinExponent = -20.0f;

// 2^n for integral n in [-126, 127], through the exponent bits.
FUSED_LSTM_HOST_DEVICE float pow2_integral(float n) {
  union {
    int32_t i;
    float f;
  } scale;
  scale.i = (static_cast<int32_t>(n) + 127) << 23;
  return scale.f;
}

FUSED_LSTM_HOST_DEVICE float exp_host(float x) {
  x = x < kExpMin ? kExpMin : (x > kExpMax ? kExpMax : x);
  float n;
  const float r = reduce_by_ln2(x, &n);
  return exp_reduced(r) * pow2_integral(n);
}

// One path for every x: tanh|x| = -u / (2 + u) with u = expm1(-2|x|) in (-1, 0]. expm1 keeps full relative
// precision near 0, where 1 - 2 / (e^2x + 1) cancels, so no separate small-x polynomial and select (the
// vectorised step evaluated both). <= 2.5 ulp over [-12, 12] (emulated against float64).
FUSED_LSTM_HOST_DEVICE float tanh_host(float x) {
  float y = -2.0f * std::fabs(x);
  y = y < kTanhMinExponent ? kTanhMinExponent : y;  // NaN passes through
  float n;
  const float r = reduce_by_ln2(y, &n);  // n in [-29, 0]
  const float scale = pow2_integral(n);
  const float u = scale * expm1_reduced(r) + (scale - 1.0f);  // expm1(y) = 2^n expm1(r) + (2^n - 1), exact 2^n - 1
  return std::copysign(-u / (2.0f + u), x);
}

}  // namespace detail

// Activations in the compute type T (float for float/half/bfloat16 storage, double for double).
// On the device the CUDA math library is used; on the host, float uses the vectorisable versions
// above and double the C library (the float64 path is the accuracy reference).
template <typename T>
FUSED_LSTM_HOST_DEVICE T sigmoid(T x) {
#if defined(__CUDA_ARCH__)
  return T(1) / (T(1) + exp(-x));
#else
  if constexpr (std::is_same_v<T, float>) {
    return 1.0f / (1.0f + detail::exp_host(-x));
  } else {
    return T(1) / (T(1) + std::exp(-x));
  }
#endif
}

template <typename T>
FUSED_LSTM_HOST_DEVICE T hyperbolic_tangent(T x) {  // not `tanh`: in this namespace it would hide std::tanh
#if defined(__CUDA_ARCH__)
  return tanh(x);
#else
  if constexpr (std::is_same_v<T, float>) {
    return detail::tanh_host(x);
  } else {
    return std::tanh(x);
  }
#endif
}

// The activations cell_forward and cell_backward use: the ones above, for scalars. The CPU's vector kernels
// pass their own (csrc/cpu/simd_math.h) with the same interface for whole vectors.
struct ScalarActivations {
  template <typename T>
  FUSED_LSTM_HOST_DEVICE static T sigmoid(T x) {
    return fused_lstm::sigmoid(x);
  }
  template <typename T>
  FUSED_LSTM_HOST_DEVICE static T tanh(T x) {
    return fused_lstm::hyperbolic_tangent(x);
  }
};

// Post-activation gates of one hidden unit.
template <typename T>
struct Gates {
  T i, f, g, o;
};

// Forward of one hidden unit (or, with T a vector and its Activations, of a vector of units): activates the
// four pre-activations and advances the state. Returns the activated gates (what backward needs) and
// writes the new c and h.
template <typename T, typename Act = ScalarActivations>
FUSED_LSTM_HOST_DEVICE Gates<T> cell_forward(T a_i, T a_f, T a_g, T a_o, T c_prev, T* c_next, T* h_next) {
  Gates<T> gate{Act::sigmoid(a_i), Act::sigmoid(a_f), Act::tanh(a_g), Act::sigmoid(a_o)};
  const T c = gate.f * c_prev + gate.i * gate.g;
  *c_next = c;
  *h_next = gate.o * Act::tanh(c);
  return gate;
}

// Gradients of the four pre-activations of one hidden unit.
template <typename T>
struct GateGrads {
  T i, f, g, o;
};

// Backward of one hidden unit.
//   gate:   post-activation gates saved by the forward pass
//   c_prev: the cell state this step started from
//   dh:     gradient reaching h' (from the output, the next step and h_n)
//   dc:     gradient reaching c' (from the next step and c_n)
// Writes the gradient for c_prev and h' (= o * tanh(c'), needed for the projection's weight gradient)
// and returns the pre-activation gradients.
template <typename T, typename Act = ScalarActivations>
FUSED_LSTM_HOST_DEVICE GateGrads<T> cell_backward(const Gates<T>& gate, T c_prev, T dh, T dc, T* dc_prev,
                                                  T* h_next) {
  const T c = gate.f * c_prev + gate.i * gate.g;
  const T tanh_c = Act::tanh(c);
  *h_next = gate.o * tanh_c;
  // 1 - x, not T(1) - x: a GCC vector type has no conversion from a scalar.
  const T dc_total = dc + dh * gate.o * (1 - tanh_c * tanh_c);
  *dc_prev = dc_total * gate.f;
  return GateGrads<T>{dc_total * gate.g * gate.i * (1 - gate.i),
                      dc_total * c_prev * gate.f * (1 - gate.f),
                      dc_total * gate.i * (1 - gate.g * gate.g),
                      dh * tanh_c * gate.o * (1 - gate.o)};
}

}  // namespace fused_lstm
