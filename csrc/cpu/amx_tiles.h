// Configuring AMX tiles (palette 1), for the bfloat16 kernels that use them (bf16_recurrence.cpp,
// bf16_dot_gemm.cpp). Included only where those kernels are built (GCC, x86-64); the functions run only where
// cpu_bf16_kernels() is amx (the OS granted the tile state, cpu_features.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace fused_lstm {

// The 64-byte operand of ldtilecfg: per tile, its rows and bytes per row (at most 16 and 64).
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Loads config into this thread's tile state. GCC 12 does not see ldtilecfg read its operand, and where the
// config is filled just before, drops the stores without the barrier.
__attribute__((target("amx-tile"))) inline void load_tile_config(const AmxTileConfig& config) {
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

}  // namespace fused_lstm
