// Vector and tile helpers the bfloat16 kernels share (bf16_recurrence.cpp, bf16_dot_gemm.cpp). Included only
// where those kernels are built (GCC, x86-64); they run only where cpu_bf16_kernels() found the instructions
// (AVX512-BF16, and for the tiles AMX with the OS's permission, cpu_features.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace fused_lstm {

#define FUSED_LSTM_BF16_SIMD_TARGET __attribute__((target("avx512f,avx512bw")))
// The target of the bfloat16 kernels that may issue AMX instructions (the recurrences, the cell's tile products).
#define FUSED_LSTM_BF16_TARGET __attribute__((target("arch=x86-64-v4,avx512bf16,amx-tile,amx-bf16")))

// The first n (<= 16) lanes.
inline __mmask16 lane_mask16(int64_t n) { return static_cast<__mmask16>((uint32_t{1} << n) - 1); }

// 16 bfloat16 as float32 (exact): the bits shifted into each float's high half.
FUSED_LSTM_BF16_SIMD_TARGET inline __m512 widen_bf16(__m256i bf16) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
}

// 16 float32 as bfloat16 rounded to nearest even, NaN to the quiet NaN 0x7fc0: c10::BFloat16's conversion, bit
// for bit (vcvtneps2bf16 would flush denormals), so that every kernel here writes what c10's conversions (the
// per-step loop, ATen's elementwise ops) write for the same float32 value.
FUSED_LSTM_BF16_SIMD_TARGET inline __m256i narrow_bf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc00000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

// The VNNI pair layout of vdpbf16ps and AMX B tiles: 16 columns of two consecutive reduction rows, row k's
// bfloat16 in the low half of each 32-bit lane and row k + 1's in the high half.
FUSED_LSTM_BF16_SIMD_TARGET inline __m512i vnni_pairs(__m256i even, __m256i odd) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(even), _mm512_slli_epi32(_mm512_cvtepu16_epi32(odd), 16));
}

// The 64-byte operand of ldtilecfg: per tile, its rows and bytes per row (at most 16 and 64).
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// The first `tiles` tiles with `rows` rows of 64 bytes; the others unused.
inline AmxTileConfig amx_tile_config(int tiles, int64_t rows) {
  AmxTileConfig config;
  for (int i = 0; i < tiles; ++i) {
    config.rows[i] = static_cast<uint8_t>(rows);
    config.bytes_per_row[i] = 64;
  }
  return config;
}

// Loads config into this thread's tile state. GCC 12 does not see ldtilecfg read its operand, and where the
// config is filled just before, drops the stores without the barrier.
__attribute__((target("amx-tile"))) inline void load_tile_config(const AmxTileConfig& config) {
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

}  // namespace fused_lstm
