// The bfloat16 forward recurrence (bf16_recurrence.h). Per call, W_hh [4H, Hout] is packed once into one
// panel per 16-unit block, in VNNI pairs: panel ub holds, for each pair p of the reduction and each of its 64
// columns c = q * 16 + l (gate q of unit ub * 16 + l), the two bfloat16 W_hh[q H + unit][2p], [2p + 1] side by
// side. That one layout serves both product kernels:
//   - AMX: an A tile is 16 rows of h by 32 k (64 bytes a row), a B tile 16 pairs by the 16 columns of one gate
//     (its rows 256 bytes apart in the panel), and a block's four gates are four C tiles of 16 x 16 float32;
//   - vdpbf16ps: per pair, a 32-bit broadcast of h's two bfloat16 against four 64-byte panel vectors.
// h lives in two bfloat16 buffers (h_{t-1} read by everyone, h_t written), rows padded so a 16-row tile never
// reads past them and the reduction padded with zeros like W_hh. The team splits the hidden units (one barrier
// per step) or the batch rows (none), as the float32 recurrence does (recurrence_cpu.cpp); the planner decides
// (cpu_plan.h, plan_bf16_forward).
#include "bf16_recurrence.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define FUSED_LSTM_BF16_KERNELS 1
#include "bf16_simd.h"
#endif

#include "cpu_limits.h"
#include "cpu_plan.h"
#include "recurrence_team.h"
#include "simd_math.h"

namespace fused_lstm {

#if FUSED_LSTM_BF16_KERNELS
namespace {

// Everything below runs only where cpu_features.cpp found AVX512-BF16 (and, for the AMX kernel, AMX-BF16 with
// the OS's permission); the AMX instructions are only ever issued by AmxProduct. FUSED_LSTM_BF16_TARGET:
// bf16_simd.h.

constexpr int64_t kPanel = 4 * kGroup;             // columns per panel: the 4 gates of 16 units
constexpr int64_t kTileRows = cpu_limits::kAmxTileRows;
constexpr int64_t kTileDepth = cpu_limits::kAmxTileDepth;  // bfloat16 per AMX tile row (64 bytes)
constexpr int64_t kPanelPairStride = 2 * kPanel;    // bfloat16 per pair of the reduction in a panel

// What every thread of the team reads. Row r of a buffer with row stride s is at base + r * s.
struct Team {
  int64_t N, H, Hout, Kp;       // Kp: Hout padded to kBf16PackedDepthMultiple (the packed reduction)
  int64_t blocks, h_rows;       // 16-unit blocks; rows of each h buffer (N and a tile's padding)
  bool reverse, split_rows;
  int64_t row_tile;
  const std::vector<int64_t>* step_rows;
  const std::vector<int64_t>* step_offset;
  const uint16_t* w_hh;   // [4H, Hout]
  uint16_t* packed;       // [blocks][Kp / 2][64][2]
  uint16_t* h_buf;        // [2][h_rows][Kp]: h_{t-1} and h_t, swapped every step
  float* c;               // [N, H] float32 cell state
  uint16_t* gates;        // [rows of this chunk, 4H]: input projection in, post-activation gates out (save_gates)
  int64_t gates_origin;   // the input row whose gates are gates[0]
  bool save_gates;        // training: the backward reads the post-activation gates
  const float* bias;      // [4H] b_ih + b_hh in float32, or null
  uint16_t* output;       // [R, Hout], row stride output_stride
  int64_t output_stride;
  uint16_t* c_prev_saved;  // [R, H] or null
  uint16_t* h_prev_saved;  // [R, Hout] or null
  int64_t parity;         // which h buffer holds h_{t-1} when a chunk of steps starts
};

// The forward's B = W_hh^T: panel ub holds the four gates of units ub * 16 + [0, 16). Per gate and 32 k: the 16
// units' rows of W_hh, 16 pairs each, transposed as 16 x 16 dwords, give the 16 B rows of those pairs.
FUSED_LSTM_BF16_TARGET void pack_forward_blocks(const Team& t, int64_t block_begin, int64_t block_end) {
  for (int64_t ub = block_begin; ub < block_end; ++ub) {
    uint16_t* panel = t.packed + ub * t.Kp * kPanel;
    for (int64_t k0 = 0; k0 < t.Kp; k0 += kTileDepth) {
      const int64_t depth = std::clamp<int64_t>(t.Hout - k0, 0, kTileDepth);
      const __mmask32 valid = depth == kTileDepth ? ~__mmask32{0} : (__mmask32{1} << depth) - 1;
      for (int64_t q = 0; q < 4; ++q) {
        vec<16> rows[kGroup];
        for (int64_t l = 0; l < kGroup; ++l) {
          const int64_t unit = ub * kGroup + l;
          rows[l] = unit < t.H ? reinterpret_cast<vec<16>>(
                                     _mm512_maskz_loadu_epi16(valid, t.w_hh + (q * t.H + unit) * t.Hout + k0))
                               : vec<16>{};
        }
        transpose<16>(rows);
        for (int64_t p = 0; p < kTileDepth / 2; ++p) {
          store<16>(reinterpret_cast<float*>(panel + (k0 / 2 + p) * kPanelPairStride + q * 2 * kGroup), rows[p]);
        }
      }
    }
  }
}

// bfloat16 -> float32 (exact), as the vec<16> the pointwise math takes.
FUSED_LSTM_BF16_TARGET FUSED_LSTM_ALWAYS_INLINE vec<16> widen(__m256i bf16) {
  return reinterpret_cast<vec<16>>(widen_bf16(bf16));
}

// narrow_bf16 on the vec<16> the pointwise math returns.
FUSED_LSTM_BF16_TARGET FUSED_LSTM_ALWAYS_INLINE __m256i narrow(vec<16> x) {
  return narrow_bf16(reinterpret_cast<__m512>(x));
}

// The pointwise step of row b (of this step's rows, which start at input row row0) for the units of block ub,
// from the block's product acc [64] (gate q's 16 units at acc + 16 q): as forward_span (step_spans.h) with the
// cell state in float32.
FUSED_LSTM_BF16_TARGET FUSED_LSTM_ALWAYS_INLINE void pointwise(const Team& t, int64_t row0, int64_t b, int64_t ub,
                                                               const float* acc, const uint16_t* h_cur,
                                                               uint16_t* h_next) {
  const int64_t H = t.H, u0 = ub * kGroup, n = std::min(kGroup, H - u0);
  const __mmask16 m = lane_mask16(n);
  const int64_t row = row0 + b;
  uint16_t* g = t.gates + (row - t.gates_origin) * 4 * H + u0;
  vec<16> pre[4];
  for (int64_t q = 0; q < 4; ++q) pre[q] = load<16>(acc + q * kGroup) + widen(_mm256_maskz_loadu_epi16(m, g + q * H));
  if (t.bias) {
    for (int64_t q = 0; q < 4; ++q) pre[q] += reinterpret_cast<vec<16>>(_mm512_maskz_loadu_ps(m, t.bias + q * H + u0));
  }
  float* c = t.c + b * H + u0;
  const vec<16> c_prev = reinterpret_cast<vec<16>>(_mm512_maskz_loadu_ps(m, c));
  if (t.c_prev_saved) _mm256_mask_storeu_epi16(t.c_prev_saved + row * H + u0, m, narrow(c_prev));
  if (t.h_prev_saved) {
    _mm256_mask_storeu_epi16(t.h_prev_saved + row * t.Hout + u0, m, _mm256_maskz_loadu_epi16(m, h_cur + b * t.Kp + u0));
  }
  vec<16> c_next, h;
  const Gates<vec<16>> gate =
      cell_forward<vec<16>, VectorActivations<16>>(pre[0], pre[1], pre[2], pre[3], c_prev, &c_next, &h);
  if (t.save_gates) {
    _mm256_mask_storeu_epi16(g, m, narrow(gate.i));
    _mm256_mask_storeu_epi16(g + H, m, narrow(gate.f));
    _mm256_mask_storeu_epi16(g + 2 * H, m, narrow(gate.g));
    _mm256_mask_storeu_epi16(g + 3 * H, m, narrow(gate.o));
  }
  _mm512_mask_storeu_ps(c, m, reinterpret_cast<__m512>(c_next));
  const __m256i h_bf16 = narrow(h);
  _mm256_mask_storeu_epi16(h_next + b * t.Kp + u0, m, h_bf16);
  _mm256_mask_storeu_epi16(t.output + row * t.output_stride + u0, m, h_bf16);
}

// The product of up to 16 rows of h (row stride Kp) with one block's panel on AMX tiles: tiles 0-3 accumulate
// the four gates, tile 4 holds the rows' 32 k, tiles 5-7 rotate through the panel's B tiles. Always 16 rows:
// the rows past `rows` are padding or other rows, and their results are not read (a tile's rows are
// independent).
struct AmxProduct {
  static constexpr int64_t kRowTile = kTileRows;

  FUSED_LSTM_BF16_TARGET static void begin() {
    load_tile_config(amx_tile_config(8, kTileRows));
  }
  FUSED_LSTM_BF16_TARGET static void end() { _tile_release(); }

  // Rows per block() call when `left` rows remain: two tiles while 32 remain (each B tile then serves two
  // row tiles: half the panel reads from L2 per product), else one.
  static int64_t rows_per_block(int64_t left) { return left >= 2 * kTileRows ? 2 * kTileRows : std::min(kTileRows, left); }

  // out [rows][64] = a's rows [rows][Kp] @ panel; rows is 32 (two row tiles) or at most 16 (one tile: its rows
  // past `rows` read padding or other rows, and their results are not read). between(s, S) runs after the tile
  // instructions of each of the S k steps: the tile unit works through them while the core runs that vector
  // work (another block's pointwise step), which otherwise waits for the product and leaves the tile unit idle.
  template <class Between>
  FUSED_LSTM_BF16_TARGET FUSED_LSTM_ALWAYS_INLINE static void block(const uint16_t* a, int64_t a_stride, int64_t Kp,
                                                                    int64_t rows, const uint16_t* panel, float* out,
                                                                    Between&& between) {
    constexpr int64_t kPanelRowBytes = kPanelPairStride * 2, kOutRowBytes = kPanel * 4;
    const int64_t k_steps = Kp / kTileDepth;
    if (rows > kTileRows) {
      // Two passes of two gates: C tiles 0-1 the first row tile's, 2-3 the second's, A tiles 4-5, B tiles 6-7.
      const uint16_t* a1 = a + kTileRows * a_stride;
      for (int64_t q = 0; q < 4; q += 2) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t k = 0; k < k_steps; ++k) {
          const int64_t k0 = k * kTileDepth;
          const uint16_t* b = panel + (k0 / 2) * kPanelPairStride + q * 2 * kGroup;
          _tile_loadd(4, a + k0, a_stride * 2);
          _tile_loadd(6, b, kPanelRowBytes);
          _tile_dpbf16ps(0, 4, 6);
          _tile_loadd(7, b + 2 * kGroup, kPanelRowBytes);
          _tile_dpbf16ps(1, 4, 7);
          _tile_loadd(5, a1 + k0, a_stride * 2);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
          between((q / 2) * k_steps + k, 2 * k_steps);
        }
        _tile_stored(0, out + q * kGroup, kOutRowBytes);
        _tile_stored(1, out + (q + 1) * kGroup, kOutRowBytes);
        _tile_stored(2, out + kTileRows * kPanel + q * kGroup, kOutRowBytes);
        _tile_stored(3, out + kTileRows * kPanel + (q + 1) * kGroup, kOutRowBytes);
      }
      return;
    }
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < k_steps; ++k) {
      const int64_t k0 = k * kTileDepth;
      const uint16_t* b = panel + (k0 / 2) * kPanelPairStride;
      _tile_loadd(4, a + k0, a_stride * 2);
      _tile_loadd(5, b, kPanelRowBytes);
      _tile_loadd(6, b + 2 * kGroup, kPanelRowBytes);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(7, b + 4 * kGroup, kPanelRowBytes);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(5, b + 6 * kGroup, kPanelRowBytes);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 4, 5);
      between(k, k_steps);
    }
    _tile_stored(0, out, kOutRowBytes);
    _tile_stored(1, out + kGroup, kOutRowBytes);
    _tile_stored(2, out + 2 * kGroup, kOutRowBytes);
    _tile_stored(3, out + 3 * kGroup, kOutRowBytes);
  }
};

// The same with vdpbf16ps for up to kDpbf16RowTile rows: R x 4 accumulators in registers.
struct Dpbf16Product {
  static constexpr int64_t kRowTile = cpu_limits::kDpbf16RowTile;
  static int64_t rows_per_block(int64_t left) { return std::min(kRowTile, left); }
  static void begin() {}
  static void end() {}

  // Not inlined: inside the step loop GCC spills half of the 24 accumulators on every k pair (measured: 2x
  // slower); on its own it keeps them in registers.
  template <int R>
  FUSED_LSTM_BF16_TARGET __attribute__((noinline)) static void rows_block(const uint16_t* a, int64_t a_stride,
                                                                          int64_t Kp, const uint16_t* panel,
                                                                          float* out) {
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r) {
      for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_setzero_ps();
    }
    for (int64_t p = 0; p < Kp / 2; ++p) {
      const uint16_t* b = panel + p * kPanelPairStride;
      __m512bh w[4];
      for (int q = 0; q < 4; ++q) w[q] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + q * 2 * kGroup));
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, a + r * a_stride + 2 * p, sizeof(pair));
        const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
        for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_dpbf16_ps(acc[r][q], x, w[q]);
      }
    }
    // Unrolled so that every index into acc is a constant: GCC otherwise keeps acc in memory and stores all of
    // it on every k pair.
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) _mm512_storeu_ps(out + r * kPanel + q * kGroup, acc[r][q]);
    }
  }

  // between(0, 1) runs first: the vector work would compete with this product for the same ports.
  template <class Between>
  FUSED_LSTM_BF16_TARGET FUSED_LSTM_ALWAYS_INLINE static void block(const uint16_t* a, int64_t a_stride, int64_t Kp,
                                                                    int64_t rows, const uint16_t* panel, float* out,
                                                                    Between&& between) {
    between(0, 1);
    static_assert(kRowTile == 6, "one case per row count below");
    switch (rows) {
      case 1: rows_block<1>(a, a_stride, Kp, panel, out); break;
      case 2: rows_block<2>(a, a_stride, Kp, panel, out); break;
      case 3: rows_block<3>(a, a_stride, Kp, panel, out); break;
      case 4: rows_block<4>(a, a_stride, Kp, panel, out); break;
      case 5: rows_block<5>(a, a_stride, Kp, panel, out); break;
      default: rows_block<6>(a, a_stride, Kp, panel, out); break;
    }
  }
};

// One thread's steps [step_begin, step_end) (one chunk of the input projection): on the first chunk it packs its
// share of the blocks; per step it runs the product and the pointwise step of its blocks for its rows (all rows
// when the team splits units), in the team's walk (recurrence_team.h).
template <class Product>
FUSED_LSTM_BF16_TARGET void thread_sequence(Team& t, int64_t thread, int64_t team, int64_t step_begin,
                                            int64_t step_end) {
  const int64_t pack_begin = t.blocks * thread / team, pack_end = t.blocks * (thread + 1) / team;
  if (step_begin == 0) {
    pack_forward_blocks(t, pack_begin, pack_end);
    if (t.split_rows) {
#pragma omp barrier
    }
  }
  const int64_t block_begin = t.split_rows ? 0 : pack_begin, block_end = t.split_rows ? t.blocks : pack_end;
  const int64_t unit_begin = block_begin * kGroup, unit_end = std::min(t.H, block_end * kGroup);
  const int64_t tiles = (t.N + t.row_tile - 1) / t.row_tile;
  const int64_t own_begin = t.split_rows ? std::min(t.N, tiles * thread / team * t.row_tile) : 0;
  const int64_t own_end = t.split_rows ? std::min(t.N, tiles * (thread + 1) / team * t.row_tile) : t.N;
  const TeamWalk<uint16_t> walk(t.step_rows, t.step_offset, t.reverse, t.split_rows, {own_begin, own_end},
                                {unit_begin, unit_end}, t.h_buf, t.h_rows * t.Kp, t.Kp);
  // Two product blocks' rows (AmxProduct: up to two tiles each): the pointwise step of one block runs while the
  // next block's product is computed (AmxProduct::block).
  alignas(64) float acc[2][2 * kTileRows * kPanel];
  Product::begin();
  const int64_t parity = walk_steps(
      walk, t.parity, step_begin, step_end, [](int64_t, int64_t) {},
      [&](int64_t, int64_t row0, int64_t r0, int64_t r1, const uint16_t* h_cur, uint16_t* h_next)
          FUSED_LSTM_BF16_TARGET {
        // The block whose product is in acc[pending] and whose pointwise step is not yet done: rows
        // [pending_tile, pending_tile + pending_rows) of unit block pending_ub, the first `next` of them done.
        int64_t pending = 0, pending_ub = 0, pending_tile = 0, pending_rows = 0, next = 0;
        const auto pointwise_until = [&](int64_t end) FUSED_LSTM_BF16_TARGET {
          for (; next < end; ++next) {
            const int64_t b = pending_tile + next;
            // An address, not a pointer: near the chunk's end it lies past the gates (harmless to prefetch).
            const uintptr_t ahead =
                reinterpret_cast<uintptr_t>(t.gates) +
                ((row0 + b + cpu_limits::kBf16PrefetchRows - t.gates_origin) * 4 * t.H + pending_ub * kGroup) * 2;
            for (int64_t q = 0; q < 4; ++q) {
              _mm_prefetch(reinterpret_cast<const char*>(ahead + q * t.H * 2), _MM_HINT_T0);
            }
            pointwise(t, row0, b, pending_ub, acc[pending] + next * kPanel, h_cur, h_next);
          }
        };
        for (int64_t ub = block_begin; ub < block_end && r1 > r0; ++ub) {
          const uint16_t* panel = t.packed + ub * t.Kp * kPanel;  // read once from L2 per step, for every tile
          for (int64_t tile = r0, tile_rows = 0; tile < r1; tile += tile_rows) {
            tile_rows = Product::rows_per_block(r1 - tile);
            // The pending block's rows spread evenly over this product's k steps: by the end of step s, the
            // first pending_rows * (s + 1) / steps, rounded up.
            Product::block(h_cur + tile * t.Kp, t.Kp, t.Kp, tile_rows, panel, acc[1 - pending],
                           [&](int64_t s, int64_t steps) FUSED_LSTM_BF16_TARGET {
                             pointwise_until((pending_rows * (s + 1) + steps - 1) / steps);
                           });
            // Both products' last between() call (s + 1 == steps) finished the pending block.
            TORCH_INTERNAL_ASSERT_DEBUG_ONLY(next == pending_rows);
            pending = 1 - pending;
            pending_ub = ub;
            pending_tile = tile;
            pending_rows = tile_rows;
            next = 0;
          }
        }
        pointwise_until(pending_rows);
      });
  Product::end();
#pragma omp barrier
  if (thread == 0) t.parity = parity;  // read when the next region starts
}

// What every thread of a backward team reads.
struct BackwardTeam {
  int64_t H, K4p;           // K4p: 4H padded to kBf16PackedDepthMultiple (the packed reduction)
  int64_t panels, dg_rows;  // 64-unit panels of dh; rows of each d_gates buffer (N and a tile's padding)
  bool reverse, need_h0_grad;
  const std::vector<int64_t>* step_rows;
  const std::vector<int64_t>* step_offset;
  const uint16_t* w_hh;      // [4H, H]
  uint16_t* packed;          // [panels][K4p / 2][64][2]
  const uint16_t* gates;     // [R, 4H] saved post-activation gates
  const uint16_t* c_prev;    // [R, H]
  const uint16_t* d_output;  // [R, H], row stride d_output_stride
  int64_t d_output_stride;
  float* dh;                 // [N, H] float32
  float* dc;                 // [N, H] float32
  uint16_t* d_gates;         // [R, 4H] out
  uint16_t* dg_buf;          // [2][dg_rows][K4p]: this step's d_gates rows, zero past 4H, for the product
};

// The backward's B = W_hh [4H, H]: panel p holds units p * 64 + [0, 64). Per pair of rows k, k + 1 and 16
// units: their bfloat16 interleaved (one dword per unit) is one 64-byte row of a B tile.
FUSED_LSTM_BF16_TARGET void pack_backward_panels(const BackwardTeam& t, int64_t panel_begin, int64_t panel_end) {
  const int64_t K = 4 * t.H;
  for (int64_t p = panel_begin; p < panel_end; ++p) {
    uint16_t* panel = t.packed + p * t.K4p * kPanel;
    for (int64_t k = 0; k < t.K4p; k += 2) {
      for (int64_t g = 0; g < 4; ++g) {
        const int64_t u0 = p * kPanel + g * kGroup, n = std::clamp<int64_t>(t.H - u0, 0, kGroup);
        const __mmask16 m = lane_mask16(n);
        const __m256i even = k < K ? _mm256_maskz_loadu_epi16(m, t.w_hh + k * t.H + u0) : _mm256_setzero_si256();
        const __m256i odd = k + 1 < K ? _mm256_maskz_loadu_epi16(m, t.w_hh + (k + 1) * t.H + u0) : _mm256_setzero_si256();
        _mm512_storeu_si512(panel + (k / 2) * kPanelPairStride + g * 2 * kGroup, vnni_pairs(even, odd));
      }
    }
  }
}

// The pointwise backward of row b (input row row0 + b) for units [u0, u0 + n), n <= 16: as backward_span
// (step_spans.h) with dh and dc in float32; d_gates goes to the workspace and to this step's product rows.
FUSED_LSTM_BF16_TARGET FUSED_LSTM_ALWAYS_INLINE void pointwise_backward(const BackwardTeam& t, int64_t row0, int64_t b,
                                                                        int64_t u0, int64_t n, uint16_t* dg_rows) {
  const int64_t H = t.H, row = row0 + b;
  const __mmask16 m = lane_mask16(n);
  const uint16_t* g = t.gates + row * 4 * H + u0;
  const Gates<vec<16>> gate{widen(_mm256_maskz_loadu_epi16(m, g)), widen(_mm256_maskz_loadu_epi16(m, g + H)),
                            widen(_mm256_maskz_loadu_epi16(m, g + 2 * H)),
                            widen(_mm256_maskz_loadu_epi16(m, g + 3 * H))};
  const vec<16> c_prev = widen(_mm256_maskz_loadu_epi16(m, t.c_prev + row * H + u0));
  float* dh = t.dh + b * H + u0;
  float* dc = t.dc + b * H + u0;
  const vec<16> dh_total = reinterpret_cast<vec<16>>(_mm512_maskz_loadu_ps(m, dh)) +
                           widen(_mm256_maskz_loadu_epi16(m, t.d_output + row * t.d_output_stride + u0));
  vec<16> dc_prev, h;
  const GateGrads<vec<16>> grad = cell_backward<vec<16>, VectorActivations<16>>(
      gate, c_prev, dh_total, reinterpret_cast<vec<16>>(_mm512_maskz_loadu_ps(m, dc)), &dc_prev, &h);
  _mm512_mask_storeu_ps(dc, m, reinterpret_cast<__m512>(dc_prev));
  const vec<16> grads[4] = {grad.i, grad.f, grad.g, grad.o};
  for (int64_t q = 0; q < 4; ++q) {
    const __m256i bits = narrow(grads[q]);
    _mm256_mask_storeu_epi16(t.d_gates + row * 4 * H + q * H + u0, m, bits);
    _mm256_mask_storeu_epi16(dg_rows + b * t.K4p + q * H + u0, m, bits);
  }
}

// One thread's backward sequence: it owns 64-unit panels; per step it runs the pointwise backward of its units,
// meets the team (the product needs every unit's d_gates), then computes its columns of dh = d_gates @ W_hh,
// exactly the units its next pointwise step reads. The d_gates rows of the product alternate between two
// buffers: the next step's pointwise writes one while a slower thread may still multiply the other.
template <class Product>
FUSED_LSTM_BF16_TARGET void thread_backward(const BackwardTeam& t, int64_t thread, int64_t team) {
  const int64_t panel_begin = t.panels * thread / team, panel_end = t.panels * (thread + 1) / team;
  pack_backward_panels(t, panel_begin, panel_end);
  const int64_t unit_begin = panel_begin * kPanel, unit_end = std::min(t.H, panel_end * kPanel);
  alignas(64) float acc[2 * kTileRows * kPanel];  // a product block's rows (AmxProduct: up to two tiles)
  Product::begin();
  int64_t parity = 0;  // which d_gates buffer this step writes: the product reads it while the next step writes
  const auto pointwise = [&](int64_t rows, int64_t row0) FUSED_LSTM_BF16_TARGET {
    uint16_t* dg_rows = t.dg_buf + parity * t.dg_rows * t.K4p;
    for (int64_t b = 0; b < rows; ++b) {
      for (int64_t u0 = unit_begin; u0 < unit_end; u0 += kGroup) {
        pointwise_backward(t, row0, b, u0, std::min(kGroup, unit_end - u0), dg_rows);
      }
    }
  };
  const auto product = [&](int64_t carried, int64_t) FUSED_LSTM_BF16_TARGET {
    const uint16_t* dg_rows = t.dg_buf + parity * t.dg_rows * t.K4p;
    for (int64_t p = panel_begin; p < panel_end; ++p) {
      const int64_t columns = std::min(kPanel, t.H - p * kPanel);
      for (int64_t tile = 0, tile_rows = 0; tile < carried; tile += tile_rows) {
        tile_rows = Product::rows_per_block(carried - tile);
        Product::block(dg_rows + tile * t.K4p, t.K4p, t.K4p, tile_rows, t.packed + p * t.K4p * kPanel, acc,
                       [](int64_t, int64_t) {});
        for (int64_t b = 0; b < tile_rows; ++b) {
          std::copy(acc + b * kPanel, acc + b * kPanel + columns, t.dh + (tile + b) * t.H + p * kPanel);
        }
      }
    }
    parity = 1 - parity;
  };
  walk_backward_steps(*t.step_rows, *t.step_offset, t.reverse, t.need_h0_grad, pointwise, product);
  Product::end();
}

// A bfloat16 tensor's storage as raw 16-bit words, as the kernels address it.
uint16_t* bits(const at::Tensor& tensor) { return reinterpret_cast<uint16_t*>(tensor.data_ptr()); }

}  // namespace

const char* cpu_bf16_recurrence_forward(const RecurrenceForwardArgs& a) {
  if (a.h_state.scalar_type() != at::kBFloat16) return nullptr;
  const cpu_plan::ForwardShape shape =
      cpu_plan::forward_shape(a.h_state.size(0), a.c_state.size(1), a.input.size(1), a.input.size(0),
                              a.h_state.size(1), a.w_hr.defined(), a.required);
  const cpu_plan::Bf16ForwardPlan plan = cpu_plan::plan_bf16_forward(shape, cpu_plan::this_machine());
  TORCH_CHECK(plan.fused || !a.required, "fused_lstm: recurrence='persistent' on the CPU cannot run this bfloat16 "
              "layer: ", plan.reason);
  if (!plan.fused) return nullptr;
  const int64_t N = shape.batch, H = shape.hidden, Hout = shape.out_hidden, Kp = plan.packed_depth;
  const int64_t blocks = (H + kGroup - 1) / kGroup;
  const auto opts = a.h_state.options();
  // The input projection, offered first (a.projected false; declined once projected, which only a declined
  // offer leads to): ATen's GEMM (oneDNN, on AMX where the CPU has it) without the bias, which the pointwise step
  // adds in float32 (addmm would first copy the bias into every row, as much memory traffic as the product),
  // for chunks of plan.chunk_steps steps, each just before the team runs them: the chunk's gates are still in
  // cache, and in inference one chunk's buffer serves them all (no workspace of every step to fault in).
  if (a.projected) return nullptr;
  const bool save_gates = a.gates.defined();
  const int64_t steps = static_cast<int64_t>(a.step_rows->size()), chunk_steps = plan.chunk_steps;
  at::Tensor chunk_buffer = save_gates ? at::Tensor() : at::empty({std::min(shape.rows, chunk_steps * N), 4 * H}, opts);
  const at::Tensor bias = a.bias.defined() ? a.bias.to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor w_ih_t = a.w_ih.t();
  const at::Tensor w_hh = a.w_hh.contiguous();
  at::Tensor packed = at::empty({blocks * Kp * kPanel}, opts);
  // Zeros past N rows and Hout columns: the product reads them (a tile's padding) and they must add nothing.
  const int64_t h_rows = N + kTileRows;
  at::Tensor h_buffers = at::zeros({2, h_rows, Kp}, opts);
  h_buffers[0].narrow(0, 0, N).narrow(1, 0, Hout).copy_(a.h_state);
  at::Tensor c_state = a.c_state.to(at::kFloat).contiguous();

  Team t{
      .N = N, .H = H, .Hout = Hout, .Kp = Kp, .blocks = blocks, .h_rows = h_rows,
      .reverse = a.reverse, .split_rows = plan.split_rows, .row_tile = plan.row_tile,
      .step_rows = a.step_rows, .step_offset = a.step_offset,
      .w_hh = bits(w_hh), .packed = bits(packed), .h_buf = bits(h_buffers), .c = c_state.data_ptr<float>(),
      .gates = nullptr, .gates_origin = 0, .save_gates = save_gates,
      .bias = bias.defined() ? bias.data_ptr<float>() : nullptr,
      .output = bits(a.output), .output_stride = a.output.stride(0),
      .c_prev_saved = a.c_prev_saved.defined() ? bits(a.c_prev_saved) : nullptr,
      .h_prev_saved = a.h_prev_saved.defined() ? bits(a.h_prev_saved) : nullptr,
      .parity = 0,
  };
  const bool amx = plan.kernel == CpuBf16Kernels::amx;

  for (int64_t step_begin = 0; step_begin < steps; step_begin += chunk_steps) {
    const int64_t step_end = std::min(steps, step_begin + chunk_steps);
    // The chunk's steps cover one contiguous range of input rows (rows are stored step by step).
    const int64_t t_low = a.reverse ? steps - step_end : step_begin;
    const int64_t t_high = a.reverse ? steps - 1 - step_begin : step_end - 1;
    const int64_t row_begin = (*a.step_offset)[t_low];
    const int64_t chunk_rows = (*a.step_offset)[t_high] + (*a.step_rows)[t_high] - row_begin;
    at::Tensor gates = save_gates ? a.gates.narrow(0, row_begin, chunk_rows) : chunk_buffer.narrow(0, 0, chunk_rows);
    at::mm_out(gates, a.input.narrow(0, row_begin, chunk_rows), w_ih_t);
    t.gates = bits(gates);
    t.gates_origin = row_begin;
#pragma omp parallel num_threads(static_cast<int>(plan.threads))
    {
      const auto [thread, team] = thread_in_team();
      if (amx) {
        thread_sequence<AmxProduct>(t, thread, team, step_begin, step_end);
      } else {
        thread_sequence<Dpbf16Product>(t, thread, team, step_begin, step_end);
      }
    }
  }
  a.h_state.copy_(h_buffers[t.parity].narrow(0, 0, N).narrow(1, 0, Hout));
  a.c_state.copy_(c_state);
  return cpu_bf16_kernels_name(plan.kernel);
}

const char* cpu_bf16_recurrence_backward(const RecurrenceBackwardArgs& a) {
  if (a.gates.scalar_type() != at::kBFloat16) return nullptr;
  const int64_t N = a.dh_state.size(0), H = a.dc_state.size(1);
  const cpu_plan::Bf16BackwardPlan plan =
      cpu_plan::plan_bf16_backward(N, H, a.gates.size(0), /*projection=*/false, cpu_plan::this_machine());
  if (!plan.fused) return nullptr;
  const auto opts = a.gates.options();
  const at::Tensor w_hh = a.w_hh.contiguous();
  const int64_t K4p = plan.packed_depth, panels = (H + kPanel - 1) / kPanel;
  at::Tensor packed = at::empty({panels * K4p * kPanel}, opts);
  const int64_t dg_rows = N + kTileRows;
  // Zeros past 4H columns: the product reads them and they must add nothing.
  at::Tensor dg_buffers = at::zeros({2, dg_rows, K4p}, opts);
  at::Tensor dh = a.dh_state.to(at::kFloat).contiguous();
  at::Tensor dc = a.dc_state.to(at::kFloat).contiguous();

  const BackwardTeam t{
      .H = H, .K4p = K4p, .panels = panels, .dg_rows = dg_rows,
      .reverse = a.reverse, .need_h0_grad = a.need_h0_grad,
      .step_rows = a.step_rows, .step_offset = a.step_offset, .w_hh = bits(w_hh), .packed = bits(packed),
      .gates = bits(a.gates), .c_prev = bits(a.c_prev),
      .d_output = bits(a.d_output), .d_output_stride = a.d_output.stride(0),
      .dh = dh.data_ptr<float>(), .dc = dc.data_ptr<float>(), .d_gates = bits(a.d_gates), .dg_buf = bits(dg_buffers),
  };
  const bool amx = plan.kernel == CpuBf16Kernels::amx;

#pragma omp parallel num_threads(static_cast<int>(plan.threads))
  {
    const auto [thread, team] = thread_in_team();
    if (amx) {
      thread_backward<AmxProduct>(t, thread, team);
    } else {
      thread_backward<Dpbf16Product>(t, thread, team);
    }
  }
  a.dh_state.copy_(dh);
  a.dc_state.copy_(dc);
  return cpu_bf16_kernels_name(plan.kernel);
}

#else  // no kernels built: cpu_features.cpp never reports AVX512-BF16 here

const char* cpu_bf16_recurrence_forward(const RecurrenceForwardArgs& a) {
  TORCH_CHECK(!a.required, "fused_lstm: recurrence='persistent' on the CPU cannot run bfloat16 with this build");
  return nullptr;
}

const char* cpu_bf16_recurrence_backward(const RecurrenceBackwardArgs&) { return nullptr; }

#endif

}  // namespace fused_lstm
