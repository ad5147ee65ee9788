// The fused pointwise step of the CPU backend over a span of hidden units of one batch row, shared by the
// per-step backend (lstm_cpu.cpp) and the fused recurrence (recurrence_cpu.cpp). Arguments as in
// StepForwardArgs / StepBackwardArgs (csrc/lstm_layer.h); the math is csrc/lstm_cell.h. The scalar loops are
// written so that `omp simd` vectorises them in each instruction set's build of their callers (run_kernel,
// simd.h); float32 also has explicit vector loops. bfloat16 and float16 spans run the float32 code on float32
// copies of a chunk of units at a time (the loop over their own types does not vectorise: 40 ns a unit against
// about 1 for float32, the LSTMCell step's largest cost under bf16 autocast at batch 8, H=512).
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../lstm_cell.h"
#include "../lstm_layer.h"
#include "simd_math.h"

namespace fused_lstm {

// The loads and stores of a row's last, partial vector (n < L floats) and of whole ones.
template <int L>
FUSED_LSTM_ALWAYS_INLINE vec<L> load_n(const float* p, int64_t n) {
  return n == L ? load<L>(p) : load_partial<L>(p, n);
}
template <int L>
FUSED_LSTM_ALWAYS_INLINE void store_n(float* p, vec<L> v, int64_t n) {
  if (n == L) {
    store<L>(p, v);
  } else {
    std::memcpy(p, &v, n * sizeof(float));
  }
}

// dst[0, n) = src[0, n) for n > 0 (nothing otherwise), through stream_copy when StreamLanes > 0 (see
// forward_span).
template <int StreamLanes, typename scalar_t>
FUSED_LSTM_ALWAYS_INLINE void save_span(const scalar_t* src, scalar_t* dst, int64_t n) {
  if (n <= 0) return;
  if constexpr (StreamLanes > 0) {
    stream_copy<StreamLanes>(src, dst, n);
  } else {
    std::copy(src, src + n, dst);
  }
}

// 16-bit storage types (c10::Half, c10::BFloat16) go through float32 copies; see the file comment.
template <typename scalar_t>
constexpr bool kThroughFloat = std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>;

// forward_span and backward_span (below) for float32 and float64.
template <typename scalar_t, int Lanes, int StreamLanes>
FUSED_LSTM_ALWAYS_INLINE void forward_span_native(const StepForwardArgs& a, int64_t b, int64_t j0, int64_t j1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.hidden, Hout = a.out_hidden;
  scalar_t* g = a.gates.row<scalar_t>(b);
  scalar_t* c = a.c_state.row<scalar_t>(b);
  scalar_t* h_next = a.h_next.row<scalar_t>(b);
  scalar_t* output = a.output ? a.output.row<scalar_t>(b) : nullptr;
  // h is saved before the loop below overwrites it (h_next may be the state itself).
  if (a.h_prev_saved) {  // h has Hout columns: with proj_size the span may reach past them
    save_span<StreamLanes>(a.h_state.row<const scalar_t>(b) + j0, a.h_prev_saved.row<scalar_t>(b) + j0,
                           std::min(j1, Hout) - j0);
  }
  if (a.c_prev_saved) save_span<StreamLanes>(c + j0, a.c_prev_saved.row<scalar_t>(b) + j0, j1 - j0);
  if constexpr (Lanes == 0) {
#pragma omp simd
    for (int64_t j = j0; j < j1; ++j) {
      acc_t c_next, h;
      const Gates<acc_t> gate = cell_forward<acc_t>(g[j], g[H + j], g[2 * H + j], g[3 * H + j], c[j], &c_next, &h);
      g[j] = gate.i;
      g[H + j] = gate.f;
      g[2 * H + j] = gate.g;
      g[3 * H + j] = gate.o;
      c[j] = c_next;
      h_next[j] = h;
    }
  } else {
    static_assert(std::is_same_v<scalar_t, float>);
    constexpr int L = Lanes;
    for (int64_t j = j0; j < j1; j += L) {
      const int64_t n = std::min<int64_t>(L, j1 - j);
      vec<L> c_next, h;
      const Gates<vec<L>> gate = cell_forward<vec<L>, VectorActivations<L>>(
          load_n<L>(g + j, n), load_n<L>(g + H + j, n), load_n<L>(g + 2 * H + j, n), load_n<L>(g + 3 * H + j, n),
          load_n<L>(c + j, n), &c_next, &h);
      store_n<L>(g + j, gate.i, n);
      store_n<L>(g + H + j, gate.f, n);
      store_n<L>(g + 2 * H + j, gate.g, n);
      store_n<L>(g + 3 * H + j, gate.o, n);
      store_n<L>(c + j, c_next, n);
      store_n<L>(h_next + j, h, n);
    }
  }
  if (output) std::copy(h_next + j0, h_next + j1, output + j0);
}

// Batch row b's operands of a backward step (StepBackwardArgs), typed; d_output and h_next null when absent.
template <typename scalar_t>
struct BackwardRow {
  const scalar_t *gates, *c_prev, *dh, *d_output;
  scalar_t *dc, *d_gates, *h_next;
  BackwardRow(const StepBackwardArgs& a, int64_t b)
      : gates(a.gates.row<const scalar_t>(b)),
        c_prev(a.c_prev.row<const scalar_t>(b)),
        dh(a.dh.row<const scalar_t>(b)),
        d_output(a.d_output ? a.d_output.row<const scalar_t>(b) : nullptr),
        dc(a.dc_state.row<scalar_t>(b)),
        d_gates(a.d_gates.row<scalar_t>(b)),
        h_next(a.h_next ? a.h_next.row<scalar_t>(b) : nullptr) {}
};

template <typename scalar_t, int Lanes>
FUSED_LSTM_ALWAYS_INLINE void backward_span_native(const StepBackwardArgs& a, int64_t b, int64_t j0, int64_t j1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.hidden;
  const BackwardRow<scalar_t> r(a, b);
  const scalar_t *g = r.gates, *c_prev = r.c_prev, *dh = r.dh, *d_output = r.d_output;
  scalar_t *dc = r.dc, *dg = r.d_gates, *h_next = r.h_next;
  if constexpr (Lanes == 0) {
#pragma omp simd
    for (int64_t j = j0; j < j1; ++j) {
      const Gates<acc_t> gate{g[j], g[H + j], g[2 * H + j], g[3 * H + j]};
      const acc_t dh_j = d_output ? acc_t(dh[j]) + acc_t(d_output[j]) : acc_t(dh[j]);
      acc_t dc_prev, h;
      const GateGrads<acc_t> grad = cell_backward<acc_t>(gate, c_prev[j], dh_j, dc[j], &dc_prev, &h);
      dg[j] = grad.i;
      dg[H + j] = grad.f;
      dg[2 * H + j] = grad.g;
      dg[3 * H + j] = grad.o;
      dc[j] = dc_prev;
      if (h_next) h_next[j] = h;
    }
  } else {
    static_assert(std::is_same_v<scalar_t, float>);
    constexpr int L = Lanes;
    for (int64_t j = j0; j < j1; j += L) {
      const int64_t n = std::min<int64_t>(L, j1 - j);
      const Gates<vec<L>> gate{load_n<L>(g + j, n), load_n<L>(g + H + j, n), load_n<L>(g + 2 * H + j, n),
                               load_n<L>(g + 3 * H + j, n)};
      const vec<L> dh_j = d_output ? load_n<L>(dh + j, n) + load_n<L>(d_output + j, n) : load_n<L>(dh + j, n);
      vec<L> dc_prev, h;
      const GateGrads<vec<L>> grad = cell_backward<vec<L>, VectorActivations<L>>(
          gate, load_n<L>(c_prev + j, n), dh_j, load_n<L>(dc + j, n), &dc_prev, &h);
      store_n<L>(dg + j, grad.i, n);
      store_n<L>(dg + H + j, grad.f, n);
      store_n<L>(dg + 2 * H + j, grad.g, n);
      store_n<L>(dg + 3 * H + j, grad.o, n);
      store_n<L>(dc + j, dc_prev, n);
      if (h_next) store_n<L>(h_next + j, h, n);
    }
  }
}

// Units per chunk of the 16-bit spans: the chunk's float32 copies (11 rows of it, backward) stay in L1.
constexpr int64_t kFloatChunk = 128;

template <typename scalar_t>
FUSED_LSTM_ALWAYS_INLINE void widen(const scalar_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename scalar_t>
FUSED_LSTM_ALWAYS_INLINE void narrow(const float* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // c10's rounding (to nearest even, NaN to 0x7FC0) on the bits: its own conversion branches on NaN and
    // does not vectorise.
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      uint32_t bits;
      std::memcpy(&bits, src + i, sizeof(bits));
      const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
      dst[i].x = static_cast<uint16_t>(src[i] != src[i] ? 0x7FC0u : rounded);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// forward_span of a 16-bit type: each chunk's gates and c widened to float32, the float32 span on them (a
// one-row step of kFloatChunk units), the results rounded back: the same values as the scalar loop over the type.
template <typename scalar_t, int Lanes>
FUSED_LSTM_ALWAYS_INLINE void forward_span_through_float(const StepForwardArgs& a, int64_t b, int64_t j0, int64_t j1) {
  const int64_t H = a.hidden, Hout = a.out_hidden;
  if (a.h_prev_saved) {
    save_span<0>(a.h_state.row<const scalar_t>(b) + j0, a.h_prev_saved.row<scalar_t>(b) + j0, std::min(j1, Hout) - j0);
  }
  scalar_t* g = a.gates.row<scalar_t>(b);
  scalar_t* c = a.c_state.row<scalar_t>(b);
  if (a.c_prev_saved) save_span<0>(c + j0, a.c_prev_saved.row<scalar_t>(b) + j0, j1 - j0);
  scalar_t* h_next = a.h_next.row<scalar_t>(b);
  scalar_t* output = a.output ? a.output.row<scalar_t>(b) : nullptr;
  alignas(64) float g32[4 * kFloatChunk], c32[kFloatChunk], h32[kFloatChunk];
  StepForwardArgs chunk{};
  chunk.dtype = at::kFloat;
  chunk.rows = 1;
  chunk.hidden = chunk.out_hidden = kFloatChunk;
  chunk.gates = {g32, 4 * kFloatChunk};
  chunk.c_state = {c32, kFloatChunk};
  chunk.h_next = {h32, kFloatChunk};
  for (int64_t j = j0; j < j1; j += kFloatChunk) {
    const int64_t n = std::min(kFloatChunk, j1 - j);
    for (int q = 0; q < 4; ++q) widen(g + q * H + j, g32 + q * kFloatChunk, n);
    widen(c + j, c32, n);
    forward_span_native<float, Lanes, 0>(chunk, 0, 0, n);
    for (int q = 0; q < 4; ++q) narrow(g32 + q * kFloatChunk, g + q * H + j, n);
    narrow(c32, c + j, n);
    narrow(h32, h_next + j, n);
    if (output) narrow(h32, output + j, n);
  }
}

// backward_span of a 16-bit type, the same way.
template <typename scalar_t, int Lanes>
FUSED_LSTM_ALWAYS_INLINE void backward_span_through_float(const StepBackwardArgs& a, int64_t b, int64_t j0,
                                                          int64_t j1) {
  const int64_t H = a.hidden;
  const BackwardRow<scalar_t> r(a, b);
  const scalar_t *g = r.gates, *c_prev = r.c_prev, *dh = r.dh, *d_output = r.d_output;
  scalar_t *dc = r.dc, *dg = r.d_gates, *h_next = r.h_next;
  alignas(64) float g32[4 * kFloatChunk], c32[kFloatChunk], dh32[kFloatChunk], out32[kFloatChunk];
  alignas(64) float dc32[kFloatChunk], dg32[4 * kFloatChunk], h32[kFloatChunk];
  StepBackwardArgs chunk{};
  chunk.dtype = at::kFloat;
  chunk.rows = 1;
  chunk.hidden = kFloatChunk;
  chunk.gates = {g32, 4 * kFloatChunk};
  chunk.c_prev = {c32, kFloatChunk};
  chunk.dh = {dh32, kFloatChunk};
  if (d_output) chunk.d_output = {out32, kFloatChunk};
  chunk.dc_state = {dc32, kFloatChunk};
  chunk.d_gates = {dg32, 4 * kFloatChunk};
  if (h_next) chunk.h_next = {h32, kFloatChunk};
  for (int64_t j = j0; j < j1; j += kFloatChunk) {
    const int64_t n = std::min(kFloatChunk, j1 - j);
    for (int q = 0; q < 4; ++q) widen(g + q * H + j, g32 + q * kFloatChunk, n);
    widen(c_prev + j, c32, n);
    widen(dh + j, dh32, n);
    if (d_output) widen(d_output + j, out32, n);
    widen(dc + j, dc32, n);
    backward_span_native<float, Lanes>(chunk, 0, 0, n);
    for (int q = 0; q < 4; ++q) narrow(dg32 + q * kFloatChunk, dg + q * H + j, n);
    narrow(dc32, dc + j, n);
    if (h_next) narrow(h32, h_next + j, n);
  }
}

// Forward of hidden units [j0, j1) of batch row b. Arguments as in StepForwardArgs. Lanes = 0: scalar code
// that `omp simd` vectorises; Lanes > 0: float32 math in explicit vectors of that many floats (simd_math.h),
// for the kernels built per instruction set (simd.h). 16-bit types run the float32 code (kThroughFloat) with
// Lanes. StreamLanes > 0 (float32, kernels built per instruction set): the saved h_prev and c_prev, which only
// the backward reads, go out through stream_copy in vectors of that many floats, and the caller issues
// stream_fence() before they are read.
template <typename scalar_t, int Lanes = 0, int StreamLanes = 0>
FUSED_LSTM_ALWAYS_INLINE void forward_span(const StepForwardArgs& a, int64_t b, int64_t j0, int64_t j1) {
  if constexpr (kThroughFloat<scalar_t>) {
    forward_span_through_float<scalar_t, Lanes>(a, b, j0, j1);
  } else {
    forward_span_native<scalar_t, Lanes, StreamLanes>(a, b, j0, j1);
  }
}

// Backward of hidden units [j0, j1) of batch row b. Arguments as in StepBackwardArgs; Lanes as in
// forward_span.
template <typename scalar_t, int Lanes = 0>
FUSED_LSTM_ALWAYS_INLINE void backward_span(const StepBackwardArgs& a, int64_t b, int64_t j0, int64_t j1) {
  if constexpr (kThroughFloat<scalar_t>) {
    backward_span_through_float<scalar_t, Lanes>(a, b, j0, j1);
  } else {
    backward_span_native<scalar_t, Lanes>(a, b, j0, j1);
  }
}

}  // namespace fused_lstm
