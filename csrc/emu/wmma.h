// The emulated nvcuda::wmma (CUDA's warp matrix functions, <mma.h>): the fragment API of the tensor-core
// shapes the persistent kernels use, m16n16k16 with __half / __nv_bfloat16 inputs and m16n16k8 with TF32
// inputs, float accumulators.
//
// Semantics kept: every call is a warp collective (all 32 lanes, converged; checked like a shuffle); load
// pointers must be 256-bit aligned and ldm a multiple of 16 bytes (checked: on a GPU a violation is
// undefined); products of 16-bit or TF32 inputs are exact in float32 and summed in float32; a TF32 fragment
// holds what __float_to_tf32 made of its floats. What a fragment's x[] holds per lane is unspecified on a GPU,
// so code may only apply one element-wise function to all of them (as for __float_to_tf32); here every lane
// holds the whole tile. The order of the float32 sums is the emulator's own, not the tensor cores'.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "runtime.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
 public:
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  using element_type = std::conditional_t<std::is_same_v<T, precision::tf32>, float, T>;
  static constexpr int num_elements = rows * cols;
  element_type x[num_elements];
};

namespace detail {

inline void converged(const char* what, const char* file, int line) {
  ::fused_lstm::emu::warp_collective(::fused_lstm::emu::WarpOp::Sync, 0xffffffffu, 0, 0, warpSize, {file, line});
  (void)what;
}

inline void check_operand(const void* p, unsigned ldm, size_t element_size, const char* file, int line) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(p) % 32 == 0, "fused_lstm emulator: wmma load/store at ", file, ":", line,
              " from an address not 256-bit aligned");
  TORCH_CHECK((ldm * element_size) % 16 == 0, "fused_lstm emulator: wmma load/store at ", file, ":", line,
              " with ldm ", ldm, " (not a multiple of 16 bytes)");
}

template <typename T>
float to_float(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return static_cast<float>(v);
  }
}

}  // namespace detail

// float32 -> TF32 (10 explicit mantissa bits, rounded to nearest, ties away: cvt.rna.tf32.f32).
inline float __float_to_tf32(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7F800000u) != 0x7F800000u) bits = (bits + 0x1000u) & 0xFFFFE000u;
  std::memcpy(&x, &bits, 4);
  return x;
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename S>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const S* p, unsigned ldm,
                      const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using F = fragment<Use, M, N, K, T, Layout>;
  detail::converged("load_matrix_sync", file, line);
  detail::check_operand(p, ldm, sizeof(S), file, line);
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) {
      const S v = std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r];
      f.x[r * F::cols + c] = static_cast<typename F::element_type>(v);
    }
  }
}

template <int M, int N, int K, typename T>
void fill_fragment(fragment<accumulator, M, N, K, T>& f, T value, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  detail::converged("fill_fragment", file, line);
  for (int i = 0; i < M * N; ++i) f.x[i] = value;
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c,
              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  detail::converged("mma_sync", file, line);
  float out[M * N];
  for (int r = 0; r < M; ++r) {
    for (int col = 0; col < N; ++col) {
      float sum = c.x[r * N + col];
      for (int k = 0; k < K; ++k) {
        sum += detail::to_float(a.x[r * K + k]) * detail::to_float(b.x[k * N + col]);
      }
      out[r * N + col] = sum;
    }
  }
  std::memcpy(d.x, out, sizeof out);
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout,
                       const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  detail::converged("store_matrix_sync", file, line);
  detail::check_operand(p, ldm, sizeof(float), file, line);
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) {
      (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * N + c];
    }
  }
}

}  // namespace wmma
}  // namespace nvcuda
