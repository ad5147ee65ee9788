#include "bf16_dot_gemm.h"

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define FUSED_LSTM_BF16_DOT_KERNEL 1
#include "bf16_simd.h"
#endif

#include "cpu_features.h"
#include "cpu_limits.h"
#include "dot_gemm.h"
#include "simd.h"

namespace fused_lstm {

#if FUSED_LSTM_BF16_DOT_KERNEL
namespace {

// Everything here runs only where cpu_features.cpp found AVX512-BF16 (the planner checks cpu_bf16_kernels()).
#define FUSED_LSTM_BF16_DOT_TARGET __attribute__((target("arch=x86-64-v4,avx512bf16")))

constexpr int kTileRows = 4;  // rows of a per tile (x kTileCols rows of W: 16 accumulators, 4 W vectors, 1 a)
constexpr int kTileCols = 4;
constexpr int64_t kPairsPerVector = 32;  // bfloat16 per zmm: 16 pairs, one float32 lane each

// Bits of a bfloat16 as the float32 it stands for (exact).
FUSED_LSTM_ALWAYS_INLINE float bf16_bits_to_float(uint16_t bits) {
  const uint32_t wide = uint32_t{bits} << 16;
  float f;
  std::memcpy(&f, &wide, sizeof(f));
  return f;
}

// The sums of the 16 lanes of a, b, c and d, in lanes 0..3.
FUSED_LSTM_BF16_DOT_TARGET FUSED_LSTM_ALWAYS_INLINE __m128 reduce_add_4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d; then [a, b, c, d] per lane.
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

// 16 bfloat16 (the lanes of mask; zero elsewhere) as float32: the bits shifted into a float's high half.
FUSED_LSTM_BF16_DOT_TARGET FUSED_LSTM_ALWAYS_INLINE __m512 load_as_float(const uint16_t* p, __mmask16 mask) {
  return widen_bf16(_mm256_maskz_loadu_epi16(mask, p));
}
FUSED_LSTM_BF16_DOT_TARGET FUSED_LSTM_ALWAYS_INLINE __m512 load_as_float(const float* p, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, p);
}
FUSED_LSTM_ALWAYS_INLINE float as_float(uint16_t bits) { return bf16_bits_to_float(bits); }
FUSED_LSTM_ALWAYS_INLINE float as_float(float value) { return value; }

// Lanes `mask` of one output row: sum plus out's old value (accumulate) or plus bias (if given), rounded as
// c10::BFloat16 rounds (narrow_bf16).
FUSED_LSTM_BF16_DOT_TARGET FUSED_LSTM_ALWAYS_INLINE void store_row(__m512 sum, uint16_t* out, bool accumulate,
                                                                   const uint16_t* bias, __mmask16 mask) {
  if (accumulate) {
    sum = _mm512_add_ps(sum, load_as_float(out, mask));
  } else if (bias) {
    sum = _mm512_add_ps(sum, load_as_float(bias, mask));
  }
  _mm256_mask_storeu_epi16(out, mask, narrow_bf16(sum));
}

// Rows x Cols outputs: out[r, c] (+)= bias[c] + sum_k a[r, k] * w[c, k]. Each accumulator lane sums one k pair of
// every 32 k; the lanes are added at the end. The last K mod 32 k are read with a masked load (zeros past K).
template <int Rows, int Cols>
FUSED_LSTM_BF16_DOT_TARGET FUSED_LSTM_ALWAYS_INLINE void bf16_dot_tile(
    const uint16_t* a, int64_t a_rs, const uint16_t* w, int64_t w_rs, int64_t K, uint16_t* out, int64_t out_rs,
    bool accumulate, const uint16_t* bias) {
  static_assert(Cols == 4 || Cols == 1, "a group of four columns, or one");
  __m512 acc[Rows][Cols];
  for (int r = 0; r < Rows; ++r) {
    for (int c = 0; c < Cols; ++c) acc[r][c] = _mm512_setzero_ps();
  }
  int64_t k = 0;
  for (; k + kPairsPerVector <= K; k += kPairsPerVector) {
    __m512bh wv[Cols];
    for (int c = 0; c < Cols; ++c) wv[c] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + c * w_rs + k));
    for (int r = 0; r < Rows; ++r) {
      const __m512bh av = reinterpret_cast<__m512bh>(_mm512_loadu_si512(a + r * a_rs + k));
      for (int c = 0; c < Cols; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], av, wv[c]);
    }
  }
  if (k < K) {
    const __mmask32 mask = (__mmask32{1} << (K - k)) - 1;  // K - k < 32
    __m512bh wv[Cols];
    for (int c = 0; c < Cols; ++c) {
      wv[c] = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(mask, w + c * w_rs + k));
    }
    for (int r = 0; r < Rows; ++r) {
      const __m512bh av = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(mask, a + r * a_rs + k));
      for (int c = 0; c < Cols; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], av, wv[c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < Rows; ++r) {
    uint16_t* o = out + r * out_rs;
    if constexpr (Cols == 4) {
      // The four sums at once (a quarter of four separate reductions' shuffles).
      const __m128 sums = reduce_add_4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
      store_row(_mm512_castps128_ps512(sums), o, accumulate, bias, 0xF);
    } else {
      store_row(_mm512_castps128_ps512(_mm_set_ss(_mm512_reduce_add_ps(acc[r][0]))), o, accumulate, bias, 0x1);
    }
  }
}

// bf16_dot_tile<.., Cols> over `rows` rows in tiles of kTileRows (the remainder with a smaller tile).
template <int Cols>
FUSED_LSTM_BF16_DOT_TARGET FUSED_LSTM_ALWAYS_INLINE void bf16_dot_rows(
    const uint16_t* a, int64_t a_rs, const uint16_t* w, int64_t w_rs, int64_t K, uint16_t* out, int64_t out_rs,
    bool accumulate, const uint16_t* bias, int64_t rows) {
  static_assert(kTileRows == 4, "one case per remainder below");
  int64_t r = 0;
  for (; r + kTileRows <= rows; r += kTileRows) {
    bf16_dot_tile<kTileRows, Cols>(a + r * a_rs, a_rs, w, w_rs, K, out + r * out_rs, out_rs, accumulate, bias);
  }
  a += r * a_rs;
  out += r * out_rs;
  switch (rows - r) {
    case 1: bf16_dot_tile<1, Cols>(a, a_rs, w, w_rs, K, out, out_rs, accumulate, bias); break;
    case 2: bf16_dot_tile<2, Cols>(a, a_rs, w, w_rs, K, out, out_rs, accumulate, bias); break;
    case 3: bf16_dot_tile<3, Cols>(a, a_rs, w, w_rs, K, out, out_rs, accumulate, bias); break;
    default: break;
  }
}

// A rows x cols block: each W tile (kTileCols rows of W) stays in L1 while every row tile of a passes over it.
FUSED_LSTM_BF16_DOT_TARGET void bf16_dot_block(const uint16_t* a, int64_t a_rs, const uint16_t* w, int64_t w_rs,
                                               int64_t K, uint16_t* out, int64_t out_rs, bool accumulate,
                                               const uint16_t* bias, int64_t rows, int64_t cols) {
  int64_t c = 0;
  for (; c + kTileCols <= cols; c += kTileCols) {
    bf16_dot_rows<kTileCols>(a, a_rs, w + c * w_rs, w_rs, K, out + c, out_rs, accumulate, bias ? bias + c : nullptr,
                             rows);
  }
  for (; c < cols; ++c) {
    bf16_dot_rows<1>(a, a_rs, w + c * w_rs, w_rs, K, out + c, out_rs, accumulate, bias ? bias + c : nullptr, rows);
  }
}

// Rows x (up to kRowPanel) outputs of out (+)= bias + a @ b, b's rows read in place: per k, a[r, k] broadcast
// against b[k, c0 .. c0 + 64) as float32, float32 FMAs. A and B: bfloat16 bits (uint16_t), or float32 copies
// (bf16_rowmajor_matmul widens short reductions once: each k then costs 4 loads and 16 FMAs, not 4 loads,
// 8 widening ops and 4 scalar widenings). masks: the lanes of this panel's four 16-column vectors.
template <int Rows, typename A, typename B>
FUSED_LSTM_BF16_DOT_TARGET FUSED_LSTM_ALWAYS_INLINE void bf16_rowmajor_tile(
    const A* a, int64_t a_rs, int64_t a_cs, const B* b, int64_t b_rs, int64_t K, uint16_t* out, int64_t out_rs,
    bool accumulate, const uint16_t* bias, const __mmask16* masks) {
  __m512 acc[Rows][4];
  for (int r = 0; r < Rows; ++r) {
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[4];
    for (int q = 0; q < 4; ++q) bv[q] = load_as_float(b + k * b_rs + q * 16, masks[q]);
    for (int r = 0; r < Rows; ++r) {
      const __m512 av = _mm512_set1_ps(as_float(a[r * a_rs + k * a_cs]));
      for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_fmadd_ps(av, bv[q], acc[r][q]);
    }
  }
  // Unrolled so that every index into acc is a constant: a loop here leaves acc in memory, and GCC then stores
  // all of it on every k (measured 1.4x slower at K = 8).
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r) {
    uint16_t* o = out + r * out_rs;
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      store_row(acc[r][q], o + q * 16, accumulate, bias ? bias + q * 16 : nullptr, masks[q]);
    }
  }
}

// A rows x cols block in panels of 64 columns, each panel's rows of b streamed once per 4 rows of a.
template <typename A, typename B>
FUSED_LSTM_BF16_DOT_TARGET void bf16_rowmajor_block(const A* a, int64_t a_rs, int64_t a_cs, const B* b, int64_t b_rs,
                                                    int64_t K, uint16_t* out, int64_t out_rs, bool accumulate,
                                                    const uint16_t* bias, int64_t rows, int64_t cols) {
  for (int64_t c = 0; c < cols; c += 64) {
    __mmask16 masks[4];
    for (int q = 0; q < 4; ++q) {
      const int64_t left = std::clamp<int64_t>(cols - c - q * 16, 0, 16);
      masks[q] = lane_mask16(left);
    }
    const B* bc = b + c;
    uint16_t* oc = out + c;
    const uint16_t* biasc = bias ? bias + c : nullptr;
    int64_t r = 0;
    for (; r + kTileRows <= rows; r += kTileRows) {
      bf16_rowmajor_tile<kTileRows>(a + r * a_rs, a_rs, a_cs, bc, b_rs, K, oc + r * out_rs, out_rs, accumulate, biasc,
                                    masks);
    }
    const A* ar = a + r * a_rs;
    uint16_t* orow = oc + r * out_rs;
    switch (rows - r) {
      case 1: bf16_rowmajor_tile<1>(ar, a_rs, a_cs, bc, b_rs, K, orow, out_rs, accumulate, biasc, masks); break;
      case 2: bf16_rowmajor_tile<2>(ar, a_rs, a_cs, bc, b_rs, K, orow, out_rs, accumulate, biasc, masks); break;
      case 3: bf16_rowmajor_tile<3>(ar, a_rs, a_cs, bc, b_rs, K, orow, out_rs, accumulate, biasc, masks); break;
      default: break;
    }
  }
}

// t [rows, cols] (any strides, bfloat16) as row-major float32 (exact).
std::vector<float> widened(const at::Tensor& t) {
  const int64_t rows = t.size(0), cols = t.size(1), rs = t.stride(0), cs = t.stride(1);
  const auto* src = reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>());
  std::vector<float> out(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = bf16_bits_to_float(src[r * rs + c * cs]);
  }
  return out;
}

const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>()); }

// out (+)= a @ b (+ bias) as every entry point below reads it: raw bfloat16 words and strides in elements. b is
// the right operand as given (W for the W^T products). bias is null when absent or accumulating.
struct Operands {
  const uint16_t *a, *b, *bias;
  uint16_t* out;
  int64_t a_rs, a_cs, b_rs, out_rs;
};
Operands operands(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                  const at::Tensor& bias) {
  return {bits(a), bits(b), bias.defined() && !accumulate ? bits(bias) : nullptr,
          reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), a.stride(0), a.stride(1), b.stride(0),
          out.stride(0)};
}

// ---- AMX tiles: a step's few rows (2 to 16) against a weight read in place ----
// AMX multiplies an A tile of 16 rows x 32 k (k contiguous, any row stride) by a B tile of 16 k pairs x 16
// columns (VNNI pairs). Against W^T (bf16_amx_matmul), W [Nc, K] has exactly the A layout, so it is read in place,
// 16 of its rows per tile, and the product is computed transposed: C [16 W rows][16 rows of a] = W_tile @ a^T;
// only a, a few rows, is packed (once per call, as a^T in pairs). Against a row-major b (bf16_amx_rowmajor_matmul),
// a's rows are the A tiles in place and b's rows are paired into B tiles on the fly. Either way the weight
// streams through once with no reorder (ATen's oneDNN reorders it on every call).

constexpr int64_t kAmxRows = cpu_limits::kAmxTileRows;    // rows of every tile
constexpr int64_t kAmxDepth = cpu_limits::kAmxTileDepth;  // bfloat16 per A tile row; 16 pairs per B tile

// Tiles 0-1: C, 2-3: A, 4: B; `rows` rows in C and A (an A tile of a's own rows reads no further), 16 in B,
// all of 64 bytes.
FUSED_LSTM_BF16_TARGET void amx_begin(int64_t rows = kAmxRows) {
  AmxTileConfig config = amx_tile_config(5, rows);
  config.rows[4] = kAmxRows;
  load_tile_config(config);
}
FUSED_LSTM_BF16_TARGET void amx_end() { _tile_release(); }

// Rows r < rows of out[:, 0 .. cols) from a C tile stored in c_tile [16][16] float32: row r of the tile, or
// column r when the tile holds out transposed (the W^T product's C = W_tile @ a^T), through store_row; lanes
// past `cols` are not written.
template <bool kTransposed>
FUSED_LSTM_BF16_TARGET FUSED_LSTM_ALWAYS_INLINE void amx_write_rows(const float* c_tile, int64_t rows,
                                                                    int64_t cols, uint16_t* out, int64_t out_rs,
                                                                    bool accumulate, const uint16_t* bias) {
  const __mmask16 mask = lane_mask16(cols);
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(kAmxRows));
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 c = kTransposed ? _mm512_i32gather_ps(column, c_tile + r, 4) : _mm512_load_ps(c_tile + r * kAmxRows);
    store_row(c, out + r * out_rs, accumulate, bias, mask);
  }
}

// C tiles 0 .. Tiles - 1 (Tiles = 1 or 2) = W's rows [16 t, 16 t + 16) @ a^T over K, stored to c_tiles[t]: each
// B tile load (a_pairs, as below) serves every W tile.
template <int Tiles>
FUSED_LSTM_BF16_TARGET FUSED_LSTM_ALWAYS_INLINE void amx_w_tile_group(const uint16_t* w, int64_t w_rs, int64_t K,
                                                                      const uint16_t* a_pairs,
                                                                      float (*c_tiles)[kAmxRows * kAmxRows]) {
  static_assert(Tiles == 1 || Tiles == 2, "C tiles 0-1, A tiles 2-3");
  const int64_t w_bytes = w_rs * 2;
  _tile_zero(0);
  if constexpr (Tiles == 2) _tile_zero(1);
  for (int64_t k0 = 0; k0 < K; k0 += kAmxDepth) {
    _tile_loadd(4, a_pairs + k0 * kAmxRows, 64);
    _tile_loadd(2, w + k0, w_bytes);
    _tile_dpbf16ps(0, 2, 4);
    if constexpr (Tiles == 2) {
      _tile_loadd(3, w + kAmxRows * w_rs + k0, w_bytes);
      _tile_dpbf16ps(1, 3, 4);
    }
  }
  _tile_stored(0, c_tiles[0], 64);
  if constexpr (Tiles == 2) _tile_stored(1, c_tiles[1], 64);
}

// out[:, 0 .. valid) = a @ w[0 .. count)^T for `count` rows of W (a multiple of 16: whole tiles, the last one
// from a zero-padded copy when W ends inside it) against every row of a, given as a_pairs [K / 32][16 pairs]
// [16 rows][2] (a^T in pairs, rows past `rows` zero). out and bias start at w's first row's column.
FUSED_LSTM_BF16_TARGET void amx_w_tiles(const uint16_t* w, int64_t w_rs, int64_t K, const uint16_t* a_pairs,
                                        int64_t rows, int64_t count, int64_t valid, uint16_t* out,
                                        int64_t out_rs, bool accumulate, const uint16_t* bias) {
  alignas(64) float c_tiles[2][kAmxRows * kAmxRows];
  const auto write = [&](int t, int64_t n) FUSED_LSTM_BF16_TARGET {
    amx_write_rows<true>(c_tiles[t], rows, std::min(kAmxRows, valid - n), out + n, out_rs, accumulate,
                         bias ? bias + n : nullptr);
  };
  int64_t n = 0;
  for (; n + 2 * kAmxRows <= count; n += 2 * kAmxRows) {  // two W tiles per B tile load
    amx_w_tile_group<2>(w + n * w_rs, w_rs, K, a_pairs, c_tiles);
    write(0, n);
    write(1, n + kAmxRows);
  }
  if (n < count) {
    amx_w_tile_group<1>(w + n * w_rs, w_rs, K, a_pairs, c_tiles);
    write(0, n);
  }
}

// out[:, c0 .. c0 + cols) for every row of a (at most 16, the tiles' rows), cols <= 32 = two C tiles: A tiles
// are a's rows in place; B tiles are b's rows paired on the fly (row 2p in the low half of each 32-bit lane,
// 2p + 1 in the high half: the VNNI layout), both column halves from one 64-byte line of each row.
FUSED_LSTM_BF16_TARGET void amx_rowmajor_block(const uint16_t* a, int64_t a_rs, const uint16_t* b, int64_t b_rs,
                                               int64_t K, int64_t rows, int64_t cols, uint16_t* out,
                                               int64_t out_rs, bool accumulate, const uint16_t* bias) {
  alignas(64) uint32_t b_tiles[2][kAmxRows * kAmxRows];
  alignas(64) float c_tiles[2][kAmxRows * kAmxRows];
  __mmask16 masks[2];
  for (int half = 0; half < 2; ++half) {
    const int64_t left = std::clamp<int64_t>(cols - half * kAmxRows, 0, kAmxRows);
    masks[half] = lane_mask16(left);
  }
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t k0 = 0; k0 < K; k0 += kAmxDepth) {
    for (int64_t p = 0; p < kAmxRows; ++p) {
      const uint16_t* even = b + (k0 + 2 * p) * b_rs;
      for (int half = 0; half < 2; ++half) {
        const uint16_t* e = even + half * kAmxRows;
        _mm512_store_si512(b_tiles[half] + p * kAmxRows,
                           vnni_pairs(_mm256_maskz_loadu_epi16(masks[half], e),
                                      _mm256_maskz_loadu_epi16(masks[half], e + b_rs)));
      }
    }
    _tile_loadd(2, a + k0, a_rs * 2);
    _tile_loadd(4, b_tiles[0], 64);
    _tile_dpbf16ps(0, 2, 4);
    _tile_loadd(4, b_tiles[1], 64);
    _tile_dpbf16ps(1, 2, 4);
  }
  _tile_stored(0, c_tiles[0], 64);
  _tile_stored(1, c_tiles[1], 64);
  for (int64_t half = 0; half < 2 && half * kAmxRows < cols; ++half) {
    const int64_t c = half * kAmxRows;
    amx_write_rows<false>(c_tiles[half], rows, std::min(kAmxRows, cols - c), out + c, out_rs, accumulate,
                          bias ? bias + c : nullptr);
  }
}

}  // namespace

void bf16_dot_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& w, bool accumulate,
                     const at::Tensor& bias) {
  TORCH_INTERNAL_ASSERT(cpu_bf16_kernels() != CpuBf16Kernels::aten, "fused_lstm: bf16_dot_matmul needs AVX512-BF16");
  const int64_t M = a.size(0), Nc = w.size(0), K = a.size(1);
  if (M == 0 || Nc == 0) return;
  const Operands o = operands(out, a, w, accumulate, bias);
  for_each_dot_block(M, K, Nc, [&](int64_t r0, int64_t c0, int64_t rows, int64_t cols) {
    bf16_dot_block(o.a + r0 * o.a_rs, o.a_rs, o.b + c0 * o.b_rs, o.b_rs, K, o.out + r0 * o.out_rs + c0, o.out_rs,
                   accumulate, o.bias ? o.bias + c0 : nullptr, rows, cols);
  });
}

void bf16_rowmajor_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                          const at::Tensor& bias) {
  TORCH_INTERNAL_ASSERT(cpu_bf16_kernels() != CpuBf16Kernels::aten, "fused_lstm: bf16_rowmajor_matmul needs AVX512");
  const int64_t M = a.size(0), Nc = b.size(1), K = a.size(1);
  if (M == 0 || Nc == 0) return;
  const Operands o = operands(out, a, b, accumulate, bias);
  if (K < cpu_limits::kMinPackedDepth) {
    // A short reduction (a step's weight gradients, K = its rows): both operands are small next to out, so
    // widen them once and let every tile read float32.
    const std::vector<float> a_wide = widened(a), b_wide = widened(b);
    for_each_dot_block(M, K, Nc, [&](int64_t r0, int64_t c0, int64_t rows, int64_t cols) {
      bf16_rowmajor_block(a_wide.data() + r0 * K, K, 1, b_wide.data() + c0, Nc, K, o.out + r0 * o.out_rs + c0,
                          o.out_rs, accumulate, o.bias ? o.bias + c0 : nullptr, rows, cols);
    });
    return;
  }
  for_each_dot_block(M, K, Nc, [&](int64_t r0, int64_t c0, int64_t rows, int64_t cols) {
    bf16_rowmajor_block(o.a + r0 * o.a_rs, o.a_rs, o.a_cs, o.b + c0, o.b_rs, K, o.out + r0 * o.out_rs + c0,
                        o.out_rs, accumulate, o.bias ? o.bias + c0 : nullptr, rows, cols);
  });
}

void bf16_amx_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& w, bool accumulate,
                     const at::Tensor& bias) {
  TORCH_INTERNAL_ASSERT(cpu_bf16_kernels() == CpuBf16Kernels::amx, "fused_lstm: bf16_amx_matmul needs AMX-BF16");
  const int64_t M = a.size(0), Nc = w.size(0), K = a.size(1);
  TORCH_INTERNAL_ASSERT(M <= kAmxRows && K % kAmxDepth == 0 && a.stride(1) == 1 && w.stride(1) == 1,
                        "fused_lstm: bf16_amx_matmul takes at most 16 rows over a multiple of 32 k, unit k strides");
  if (M == 0 || Nc == 0) return;
  const Operands o = operands(out, a, w, accumulate, bias);
  // a^T in pairs: [K / 32][16 pairs][16 rows][2], rows past M zero.
  std::vector<uint32_t> a_pairs(static_cast<size_t>(K / 2 * kAmxRows), 0);
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t p = 0; p < K / 2; ++p) {
      uint32_t pair;
      std::memcpy(&pair, o.a + r * o.a_rs + 2 * p, sizeof(pair));
      a_pairs[p * kAmxRows + r] = pair;
    }
  }
  const auto* pairs = reinterpret_cast<const uint16_t*>(a_pairs.data());
  // The last W tile, if partial, from a zero-padded copy: a tile load reads 16 whole rows.
  const int64_t whole = Nc / kAmxRows * kAmxRows;
  std::vector<uint16_t> tail;
  if (whole < Nc) {
    tail.assign(static_cast<size_t>(kAmxRows * K), 0);
    for (int64_t n = whole; n < Nc; ++n) std::memcpy(&tail[(n - whole) * K], o.b + n * o.b_rs, K * sizeof(uint16_t));
  }
  const int64_t tiles = (Nc + kAmxRows - 1) / kAmxRows;
  const int64_t grain = std::max<int64_t>(1, cpu_limits::kDotMinChunkMacs / (kAmxRows * kAmxRows * K));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    amx_begin();
    const int64_t n0 = begin * kAmxRows, n1 = std::min(whole, end * kAmxRows);
    if (n1 > n0) {
      amx_w_tiles(o.b + n0 * o.b_rs, o.b_rs, K, pairs, M, n1 - n0, Nc - n0, o.out + n0, o.out_rs, accumulate,
                  o.bias ? o.bias + n0 : nullptr);
    }
    if (end * kAmxRows > whole && whole < Nc) {  // the partial tile, from its zero-padded copy
      amx_w_tiles(tail.data(), K, K, pairs, M, kAmxRows, Nc - whole, o.out + whole, o.out_rs, accumulate,
                  o.bias ? o.bias + whole : nullptr);
    }
    amx_end();
  });
}

void bf16_amx_rowmajor_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                              const at::Tensor& bias) {
  TORCH_INTERNAL_ASSERT(cpu_bf16_kernels() == CpuBf16Kernels::amx,
                        "fused_lstm: bf16_amx_rowmajor_matmul needs AMX-BF16");
  const int64_t M = a.size(0), K = a.size(1), Nc = b.size(1);
  TORCH_INTERNAL_ASSERT(M <= kAmxRows && K % kAmxDepth == 0 && a.stride(1) == 1 && b.stride(1) == 1,
                        "fused_lstm: bf16_amx_rowmajor_matmul takes at most 16 rows over a multiple of 32 k, unit "
                        "column strides");
  if (M == 0 || Nc == 0) return;
  const Operands o = operands(out, a, b, accumulate, bias);
  constexpr int64_t kBlockCols = 2 * kAmxRows;  // two C tiles: one 64-byte line of each row of b
  const int64_t blocks = (Nc + kBlockCols - 1) / kBlockCols;
  const int64_t grain = std::max<int64_t>(1, cpu_limits::kDotMinChunkMacs / (kAmxRows * kBlockCols * K));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    amx_begin(M);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t c0 = block * kBlockCols;
      amx_rowmajor_block(o.a, o.a_rs, o.b + c0, o.b_rs, K, M, std::min(kBlockCols, Nc - c0), o.out + c0, o.out_rs,
                         accumulate, o.bias ? o.bias + c0 : nullptr);
    }
    amx_end();
  });
}

#else  // no GCC x86-64: cpu_bf16_kernels() is aten, so the planner never picks this

void bf16_amx_rowmajor_matmul(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, const at::Tensor&) {
  TORCH_CHECK(false, "fused_lstm: bf16_amx_rowmajor_matmul is built only for x86-64 with GCC");
}
void bf16_amx_matmul(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, const at::Tensor&) {
  TORCH_CHECK(false, "fused_lstm: bf16_amx_matmul is built only for x86-64 with GCC");
}
void bf16_dot_matmul(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, const at::Tensor&) {
  TORCH_CHECK(false, "fused_lstm: bf16_dot_matmul is built only for x86-64 with GCC");
}
void bf16_rowmajor_matmul(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, const at::Tensor&) {
  TORCH_CHECK(false, "fused_lstm: bf16_rowmajor_matmul is built only for x86-64 with GCC");
}

#endif

}  // namespace fused_lstm
