// Float vectors in GCC vector extensions for the CPU kernels, the instruction sets the kernels are built for,
// and the dispatch that runs a kernel's build for the CPU at hand.
//
// A kernel is a struct with a static member template `run<Isa>` (always inlined); run_kernel<Kernel>(args...)
// calls it through a function compiled for the selected instruction set (cpu_features.h), so one source
// holds every ISA's kernel and each build gets its own vector width and tile shape. (GCC's target_clones
// cannot do this: all clones share one source and so one vector type, and a 16-float vector has no register
// below AVX-512 — that build of the kernels ran 16-38x slower than the AVX-512 one.)
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

#include "cpu_features.h"

#pragma GCC diagnostic ignored "-Wpsabi"

// Functions marked FUSED_LSTM_SIMD_CLONES get AVX2 and AVX-512 clones, picked at load time, so one binary is
// both portable and auto-vectorised (packed_gemm.cpp's gather). The kernels instead get one build per
// instruction set from templates (run_kernel below).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSED_LSTM_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FUSED_LSTM_SIMD_CLONES
#endif
#define FUSED_LSTM_ALWAYS_INLINE inline __attribute__((always_inline))

namespace fused_lstm {

// Floats per column group: a packed panel is 4 groups of 16 columns (the four gates of 16 hidden units in
// the recurrences), whatever the vector width.
constexpr int64_t kGroup = 16;

template <int Lanes>
struct VectorOf {
  typedef float type __attribute__((vector_size(Lanes * sizeof(float))));
};
// Lanes floats: one zmm (16), ymm (8) or xmm (4) register.
template <int Lanes>
using vec = typename VectorOf<Lanes>::type;
using vec4 = vec<4>;

// What the kernels (packed_gemm.h, dot_gemm.h, step_spans.h) need to know of an instruction set.
//   kLanes:           floats per vector register
//   kRowTile:         rows per packed-panel tile (at most)
//   kEvenRowTiles:    split a product's rows into tiles as even as they can be (64 rows in tiles of 6: nine of 6
//                     and two of 5; 8 rows: two of 4), rather than full tiles and a remainder (10 x 6 + 4; 6 + 2)
//   pass_vecs(r):     vectors of columns per pass over a 64-column panel for a tile of r rows: the tile holds
//                     r x pass_vecs accumulators next to the panel vectors and a broadcast
//   kDotRows:         rows per in-place dot-product tile (x 4 columns of W)
//   kPointwiseLanes:  the float32 pointwise step in explicit vectors of this many floats (simd_math.h), or 0
//                     for the scalar loop that `omp simd` vectorises
//   kGroupMajorPanels: packed panels stored group by group ([4][K][16]) rather than row by row ([K][64]), so
//                     that each pass of 16 columns reads contiguous memory (packed_gemm.h, PanelLayout)
// Why these shapes (docs/cpu.md has the measurements): AVX-512 has 32 vector registers, so a 6 x 4 tile covers
// a whole panel in one pass (29 registers) and each panel vector serves 6 FMAs (it reaches 267-272 of the
// core's 273 GFLOP/s in cache); even tiles keep a 2-row remainder from doing 8 FMAs per 4 panel loads. AVX2
// has 16: 6 rows x 2 vectors per pass, four passes per panel (15 registers), the classic AVX2 SGEMM shape.
// Tiles of fewer rows take wider passes so that they still have 8 independent accumulators (one row with 2
// would wait on the 4-cycle FMA latency every 2 FMAs). The pointwise step: `omp simd` vectorises the scalar
// loop well for AVX-512 but not for AVX2, which gets explicit vectors (simd_math.h).
struct Avx512 {
  static constexpr int kLanes = 16, kRowTile = 6, kDotRows = 4, kPointwiseLanes = 0;
  static constexpr bool kEvenRowTiles = true, kGroupMajorPanels = false;
  static constexpr int pass_vecs(int /*rows*/) { return 4; }
};
struct Avx2 {
  static constexpr int kLanes = 8, kRowTile = 6, kDotRows = 2, kPointwiseLanes = 8;
  static constexpr bool kEvenRowTiles = false, kGroupMajorPanels = true;
  static constexpr int pass_vecs(int rows) { return rows == 1 ? 8 : rows == 2 ? 4 : 2; }
};

template <int L>
FUSED_LSTM_ALWAYS_INLINE vec<L> load(const float* p) {
  vec<L> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The first n (< L) floats of p, zero past them: the tail of a row whose length is not a multiple of L.
template <int L>
FUSED_LSTM_ALWAYS_INLINE vec<L> load_partial(const float* p, int64_t n) {
  vec<L> v = {};
  std::memcpy(&v, p, n * sizeof(float));
  return v;
}

template <int L>
FUSED_LSTM_ALWAYS_INLINE void store(float* p, vec<L> v) {
  std::memcpy(p, &v, sizeof(v));
}

// A store that bypasses the caches (non-temporal): for data written now and read only much later, which
// would otherwise first read each destination line in (read for ownership) only to evict it again. Such
// stores are weakly ordered: a kernel issues stream_fence() before other threads may read what it wrote.
template <int L>
FUSED_LSTM_ALWAYS_INLINE void stream_store(float* p, vec<L> v) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if constexpr (L == 16) {
    __builtin_ia32_movntps512(p, v);
  } else if constexpr (L == 8) {
    __builtin_ia32_movntps256(p, v);
  } else {
    store<L>(p, v);
  }
#else
  store<L>(p, v);
#endif
}
FUSED_LSTM_ALWAYS_INLINE void stream_fence() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_ia32_sfence();
#endif
}
// dst[0, n) = src[0, n), dst's vector-aligned whole vectors through stream_store.
template <int L>
FUSED_LSTM_ALWAYS_INLINE void stream_copy(const float* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i < n && reinterpret_cast<uintptr_t>(dst + i) % sizeof(vec<L>) != 0; ++i) dst[i] = src[i];
  for (; i + L <= n; i += L) stream_store<L>(dst + i, load<L>(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}

// A vector's lanes summed down to four: {sum of lanes l = i mod 4}.
FUSED_LSTM_ALWAYS_INLINE vec4 fold_to4(vec<8> v) {
  return __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
}
FUSED_LSTM_ALWAYS_INLINE vec4 fold_to4(vec<16> v) {
  return fold_to4(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
}

// The sums of four vectors' lanes, as one 4-vector: {sum(v0), sum(v1), sum(v2), sum(v3)}. Folding each to
// four lanes first and transposing the last steps shares the final shuffles among the four.
template <int L>
FUSED_LSTM_ALWAYS_INLINE vec4 reduce_add4(vec<L> v0, vec<L> v1, vec<L> v2, vec<L> v3) {
  const vec4 q0 = fold_to4(v0), q1 = fold_to4(v1), q2 = fold_to4(v2), q3 = fold_to4(v3);
  // t01 = {q0[0]+q0[2], q0[1]+q0[3], q1[0]+q1[2], q1[1]+q1[3]}, likewise t23; then pairwise again.
  const vec4 t01 = __builtin_shufflevector(q0, q1, 0, 1, 4, 5) + __builtin_shufflevector(q0, q1, 2, 3, 6, 7);
  const vec4 t23 = __builtin_shufflevector(q2, q3, 0, 1, 4, 5) + __builtin_shufflevector(q2, q3, 2, 3, 6, 7);
  return __builtin_shufflevector(t01, t23, 0, 2, 4, 6) + __builtin_shufflevector(t01, t23, 1, 3, 5, 7);
}

namespace detail {

// Lane i of the first result of swapping the off-diagonal B x B blocks of a pair (a, b) of rows i and i + B
// of a 2B x 2B block: a's lane where bit B of i is clear, else b's lane i - B (shufflevector index L + i - B).
template <int L, int B>
constexpr int low_index(int i) {
  return (i / B) % 2 ? L + i - B : i;
}
// ... and of the second result: a's lane i + B where bit B of i is clear, else b's lane i.
template <int L, int B>
constexpr int high_index(int i) {
  return (i / B) % 2 ? L + i : i + B;
}

template <int L, int B, size_t... I>
FUSED_LSTM_ALWAYS_INLINE void swap_off_diagonal_pair(vec<L>& a, vec<L>& b, std::index_sequence<I...>) {
  const vec<L> low = __builtin_shufflevector(a, b, low_index<L, B>(I)...);
  b = __builtin_shufflevector(a, b, high_index<L, B>(I)...);
  a = low;
}

// One round of the transpose: swaps the off-diagonal B x B blocks inside every 2B x 2B block, one two-source
// shuffle per vector.
template <int L, int B>
FUSED_LSTM_ALWAYS_INLINE void swap_off_diagonal_blocks(vec<L> (&v)[L]) {
  for (int i = 0; i < L; ++i) {
    if ((i / B) % 2 == 0) swap_off_diagonal_pair<L, B>(v[i], v[i + B], std::make_index_sequence<L>{});
  }
}

template <int L, int B>
FUSED_LSTM_ALWAYS_INLINE void transpose_rounds(vec<L> (&v)[L]) {
  swap_off_diagonal_blocks<L, B>(v);
  if constexpr (B > 1) transpose_rounds<L, B / 2>(v);
}

}  // namespace detail

// In-place transpose of an L x L block held as L row vectors: log2(L) rounds (B = L/2, ..., 2, 1).
template <int L>
FUSED_LSTM_ALWAYS_INLINE void transpose(vec<L> (&v)[L]) {
  detail::transpose_rounds<L, L / 2>(v);
}

// Runs Kernel::run<Isa>(args...) for the instruction set the CPU backend selected (cpu_features.h), compiled
// for that instruction set. Only for CpuKernels::avx2 and avx512.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
template <typename Kernel, typename... Args>
__attribute__((target("arch=x86-64-v4"))) void run_avx512(Args&&... args) {
  Kernel::template run<Avx512>(std::forward<Args>(args)...);
}
template <typename Kernel, typename... Args>
__attribute__((target("arch=x86-64-v3"))) void run_avx2(Args&&... args) {
  Kernel::template run<Avx2>(std::forward<Args>(args)...);
}
#else  // never selected (cpu_features.cpp), but compiled
template <typename Kernel, typename... Args>
void run_avx512(Args&&... args) {
  Kernel::template run<Avx512>(std::forward<Args>(args)...);
}
template <typename Kernel, typename... Args>
void run_avx2(Args&&... args) {
  Kernel::template run<Avx2>(std::forward<Args>(args)...);
}
#endif

// The instruction set the CPU backend selected: avx512 gives Avx512, avx2 gives Avx2 (the only sets run_kernel
// and the kernels' constants are asked for).
inline bool selected_avx512() { return cpu_kernels() == CpuKernels::avx512; }

template <typename Kernel, typename... Args>
void run_kernel(Args&&... args) {
  if (selected_avx512()) {
    run_avx512<Kernel>(std::forward<Args>(args)...);
  } else {
    run_avx2<Kernel>(std::forward<Args>(args)...);
  }
}

// What a kernel that also runs without fused_lstm's vector kernels (CpuKernels::aten: another CPU, or the
// kernels switched off) asks of its instruction set: the pointwise step's scalar loops, for the baseline ISA.
struct Baseline {
  static constexpr int kPointwiseLanes = 0;
};

// run_kernel where the CPU backend selected vector kernels, else Kernel::run<Baseline> (for kernels, like the
// pointwise step, that every dtype and CPU runs).
template <typename Kernel, typename... Args>
void run_kernel_or_baseline(Args&&... args) {
  if (cpu_kernels() == CpuKernels::aten) {
    Kernel::template run<Baseline>(std::forward<Args>(args)...);
  } else {
    run_kernel<Kernel>(std::forward<Args>(args)...);
  }
}

// f(Isa{}) for the selected instruction set: for its constants outside a kernel (task sizes, panel layouts).
template <typename F>
auto with_selected_isa(F&& f) {
  return selected_avx512() ? f(Avx512{}) : f(Avx2{});
}

}  // namespace fused_lstm
