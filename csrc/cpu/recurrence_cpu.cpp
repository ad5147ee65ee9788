// Forward and backward recurrences of one direction on the CPU, the whole sequence in one OpenMP team (the
// CPU counterpart of a persistent GPU kernel). A library GEMM per step re-reads all of W_hh on every core
// and forks and joins the thread pool twice per step (GEMM, then pointwise); here the team packs the
// weights once, computes each step's gates with a register-tiled kernel and runs the pointwise step on
// them right away. Work is split between threads one of two ways:
//   - by hidden units: each thread owns 16-unit blocks (all four gates of its units) for the whole
//     sequence, its share of the weights stays in its core's cache, and the threads meet at one barrier
//     per step (every thread reads all of h_{t-1} while others write h_t, so h is double-buffered);
//   - by batch rows, when all the weights fit in every core's L2: each thread runs whole sequences and
//     never waits for another.
// Small batches read W_hh in place (dot_gemm.h) instead of packing it. Which form runs where: the planner
// (cpu_plan.h, plan_forward and plan_backward).
#include "recurrence_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu_limits.h"
#include "cpu_plan.h"
#include "dot_gemm.h"
#include "packed_gemm.h"
#include "recurrence_team.h"
#include "step_spans.h"

namespace fused_lstm {
namespace {

// Packs unit blocks [block_begin, block_end) of w [4H, K] (W_hh or W_ih) into one panel per block, laid out as
// `layout` says: panel ub at packed + ub * K * 64 holds w[q * H + ub * 16 + l][k] at layout.at(k, q * 16 + l),
// zero for units past H. A block's panel holds the four gates of 16 units, so a thread owning whole blocks
// owns whole gate rows.
void pack_blocks(const float* w, int64_t H, int64_t K, const PanelLayout& layout, float* packed, int64_t block_begin,
                 int64_t block_end) {
  for (int64_t ub = block_begin; ub < block_end; ++ub) {
    const float* rows[kPanel];
    for (int64_t q = 0; q < 4; ++q) {
      for (int64_t l = 0; l < kGroup; ++l) {
        const int64_t unit = ub * kGroup + l;
        rows[q * kGroup + l] = unit < H ? w + (q * H + unit) * K : nullptr;
      }
    }
    fill_panel_from_rows(rows, 1, K, layout, packed + ub * K * kPanel);
  }
}

// The bias [4H] in the same block order: packed[ub * 64 + q * 16 + l] = bias[q * H + ub * 16 + l].
void pack_bias_blocks(const float* bias, int64_t H, float* packed, int64_t block_begin, int64_t block_end) {
  for (int64_t ub = block_begin; ub < block_end; ++ub) {
    for (int64_t q = 0; q < 4; ++q) {
      for (int64_t l = 0; l < kGroup; ++l) {
        const int64_t unit = ub * kGroup + l;
        packed[ub * kPanel + q * kGroup + l] = unit < H ? bias[q * H + unit] : 0.0f;
      }
    }
  }
}

// The packed input projection of one step, fused into the recurrence (null when the driver computed it).
struct StepProjection {
  const float* input = nullptr;        // [rows, I]: this step's rows of the layer input
  int64_t input_size = 0;              // I
  const float* packed_w_ih = nullptr;  // pack_blocks of W_ih
  PanelLayout w_ih_layout;
  const float* packed_bias = nullptr;  // pack_bias_blocks of b_ih + b_hh, or null
};

// One thread's share of one step: the gate pre-activations of its unit blocks for `rows` rows (with the
// input projection fused, the step's input rows against the block's W_ih panel and h against its W_hh
// panel sum in the same registers), then the pointwise step on its units
// [unit_begin, unit_end) (rows' pre-activations are complete once its own blocks are).
struct ThreadStep {
  template <typename Isa>
  FUSED_LSTM_ALWAYS_INLINE static void run(const StepForwardArgs& step, const StepProjection& projection,
                                           const float* packed_w_hh, const PanelLayout& w_hh_layout,
                                           int64_t block_begin, int64_t block_end) {
    const int64_t H = step.hidden, Hout = step.out_hidden, I = projection.input_size;
    const float* h = step.h_state.row<const float>(0);  // [rows, Hout]
    float* gates = step.gates.row<float>(0);            // [rows, 4H]
    const int64_t h_stride = step.h_state.row_stride, gates_stride = step.gates.row_stride;
    for (int64_t ub = block_begin; ub < block_end; ++ub) {
      const int64_t units = std::min(kGroup, H - ub * kGroup);
      const int64_t valid[4] = {units, units, units, units};
      // The panel's 4 column groups are the 4 gates of 16 units: they land H columns apart.
      const PanelOperand recurrent{h, h_stride, 1, packed_w_hh + ub * Hout * kPanel, Hout, w_hh_layout};
      if (projection.input) {
        const PanelOperand input{projection.input, I, 1, projection.packed_w_ih + ub * I * kPanel, I,
                                 projection.w_ih_layout};
        const PanelOperand both[2] = {input, recurrent};
        panel_rows<Isa>(both, gates + ub * kGroup, gates_stride, H, valid, /*accumulate=*/false,
                        projection.packed_bias ? projection.packed_bias + ub * kPanel : nullptr, step.rows);
      } else {
        const PanelOperand only[1] = {recurrent};
        panel_rows<Isa>(only, gates + ub * kGroup, gates_stride, H, valid, /*accumulate=*/true, /*bias=*/nullptr,
                        step.rows);
      }
    }
    const int64_t unit_begin = block_begin * kGroup, unit_end = std::min(H, block_end * kGroup);
    // The saved h_prev and c_prev are read only by the backward: streamed out (step_spans.h), so that their
    // lines are not read for ownership.
    for (int64_t b = 0; b < step.rows; ++b) {
      forward_span<float, Isa::kPointwiseLanes, Isa::kLanes>(step, b, unit_begin, unit_end);
    }
    stream_fence();
  }
};

// The same with W_hh read in place (dot_gemm.h): per gate, the thread's units are one contiguous block of
// W_hh's rows. For small batches, where packing W_hh would cost more than it saves.
struct ThreadStepInPlace {
  template <typename Isa>
  FUSED_LSTM_ALWAYS_INLINE static void run(const StepForwardArgs& step, const float* w_hh, int64_t unit_begin,
                                           int64_t unit_end) {
    const int64_t H = step.hidden, Hout = step.out_hidden;
    const float* h = step.h_state.row<const float>(0);  // [rows, Hout]
    float* gates = step.gates.row<float>(0);            // [rows, 4H]
    for (int64_t q = 0; q < 4; ++q) {
      dot_block<Isa>(h, step.h_state.row_stride, w_hh + (q * H + unit_begin) * Hout, Hout, Hout,
                     gates + q * H + unit_begin, step.gates.row_stride,
                     /*accumulate=*/true, /*bias=*/nullptr, step.rows, unit_end - unit_begin);
    }
    for (int64_t b = 0; b < step.rows; ++b) {
      forward_span<float, Isa::kPointwiseLanes, Isa::kLanes>(step, b, unit_begin, unit_end);
    }
    stream_fence();
  }
};

// The input projection of `rows` rows for unit blocks [block_begin, block_end): gates (row stride 4H) =
// input rows @ the blocks' W_ih panels + bias. One panel pass per block for all the rows.
struct ProjectBlocks {
  template <typename Isa>
  FUSED_LSTM_ALWAYS_INLINE static void run(const float* input, int64_t I, const float* packed_w_ih,
                                           const PanelLayout& w_ih_layout, const float* packed_bias, float* gates,
                                           int64_t H, int64_t rows, int64_t block_begin, int64_t block_end) {
    for (int64_t ub = block_begin; ub < block_end; ++ub) {
      const int64_t units = std::min(kGroup, H - ub * kGroup);
      const int64_t valid[4] = {units, units, units, units};
      const PanelOperand x[1] = {{input, I, 1, packed_w_ih + ub * I * kPanel, I, w_ih_layout}};
      panel_rows<Isa>(x, gates + ub * kGroup, 4 * H, H, valid, /*accumulate=*/false,
                      packed_bias ? packed_bias + ub * kPanel : nullptr, rows);
    }
  }
};

// The pointwise backward of units [unit_begin, unit_end) for every row of the step.
struct PointwiseBackwardUnits {
  template <typename Isa>
  FUSED_LSTM_ALWAYS_INLINE static void run(const StepBackwardArgs& step, int64_t unit_begin, int64_t unit_end) {
    for (int64_t b = 0; b < step.rows; ++b) {
      backward_span<float, Isa::kPointwiseLanes>(step, b, unit_begin, unit_end);
    }
  }
};

}  // namespace

bool cpu_recurrence_forward(const RecurrenceForwardArgs& a) {
  const at::ScalarType dtype = a.h_state.scalar_type();
  const bool supported = dtype == at::kFloat && !a.w_hr.defined();
  TORCH_CHECK(supported || !a.required, "fused_lstm: recurrence='persistent' on the CPU needs float32 and no "
              "proj_size (got ", dtype, a.w_hr.defined() ? " with proj_size" : "", ")");
  if (!supported) return false;
  const int64_t N = a.h_state.size(0), H = a.c_state.size(1), Hout = a.h_state.size(1);
  const int64_t I = a.input.size(1);
  const cpu_plan::ForwardShape shape =
      cpu_plan::forward_shape(N, H, I, a.input.size(0), Hout, /*projection=*/false, a.required);
  const cpu_plan::ForwardPlan plan = cpu_plan::plan_forward(shape, cpu_plan::this_machine());
  if (!plan.fused) return false;
  const bool in_place = plan.in_place, owns_projection = !plan.in_place, split_rows = plan.split_rows;
  if (a.projected == owns_projection) return false;  // offered the projection: take it iff we own it
  const bool per_step_projection = plan.per_step_projection;
  const int64_t chunk_steps = plan.chunk_steps;
  const int64_t blocks = (H + kGroup - 1) / kGroup;
  const int64_t steps = static_cast<int64_t>(a.step_rows->size());
  const auto opts = a.h_state.options();
  const at::Tensor w_hh = a.w_hh.contiguous();
  const at::Tensor w_ih = owns_projection ? a.w_ih.contiguous() : at::Tensor();
  const at::Tensor bias = owns_projection && a.bias.defined() ? a.bias.contiguous() : at::Tensor();
  // Both packed as the kernels in use read them best (PanelLayout, packed_gemm.h).
  const PanelLayout w_hh_layout = packed_layout(Hout), w_ih_layout = packed_layout(I);
  at::Tensor packed_w_hh = at::empty({in_place ? 0 : blocks * Hout * kPanel}, opts);
  at::Tensor packed_w_ih = at::empty({owns_projection ? blocks * I * kPanel : 0}, opts);
  at::Tensor packed_bias = at::empty({bias.defined() ? blocks * kPanel : 0}, opts);
  // Inference keeps no workspace: the gates of one step or one chunk of steps at a time.
  at::Tensor gates_buffer = a.gates.defined() ? a.gates : at::empty({chunk_steps * N, 4 * H}, opts);
  at::Tensor h_buffers = at::empty({2, N, Hout}, opts);  // h_{t-1} / h_t, swapped every step
  h_buffers[0].copy_(a.h_state);

  const float* w = w_hh.data_ptr<float>();
  float* packed_ptr = packed_w_hh.data_ptr<float>();
  float* packed_ih_ptr = packed_w_ih.data_ptr<float>();
  float* packed_bias_ptr = bias.defined() ? packed_bias.data_ptr<float>() : nullptr;
  const float* input = a.input.data_ptr<float>();
  float* h_buf = h_buffers.data_ptr<float>();
  float* gates = gates_buffer.data_ptr<float>();
  float* c_state = a.c_state.data_ptr<float>();
  float* output = a.output.data_ptr<float>();
  const int64_t output_stride = a.output.stride(0);
  float* c_prev = a.c_prev_saved.defined() ? a.c_prev_saved.data_ptr<float>() : nullptr;
  float* h_prev = a.h_prev_saved.defined() ? a.h_prev_saved.data_ptr<float>() : nullptr;
  const int threads = static_cast<int>(plan.threads);
  int64_t final_buffer = 0;  // which of h_buffers holds h after the last step

#pragma omp parallel num_threads(threads)
  {
    const auto [thread, team] = thread_in_team();
    // Each thread packs a share of the blocks. Split by units, it packs the blocks it owns (first touch by
    // the reader) and needs no barrier before the first step; split by rows, every thread reads every block.
    const int64_t pack_begin = blocks * thread / team, pack_end = blocks * (thread + 1) / team;
    if (!in_place) pack_blocks(w, H, Hout, w_hh_layout, packed_ptr, pack_begin, pack_end);
    if (owns_projection) pack_blocks(w_ih.data_ptr<float>(), H, I, w_ih_layout, packed_ih_ptr, pack_begin, pack_end);
    if (packed_bias_ptr) pack_bias_blocks(bias.data_ptr<float>(), H, packed_bias_ptr, pack_begin, pack_end);
    if (split_rows) {
#pragma omp barrier
    }
    const int64_t block_begin = split_rows ? 0 : pack_begin, block_end = split_rows ? blocks : pack_end;
    const int64_t unit_begin = block_begin * kGroup, unit_end = std::min(H, block_end * kGroup);
    const int64_t own_rows_begin = split_rows ? N * thread / team : 0;  // batch rows this thread runs
    const int64_t own_rows_end = split_rows ? N * (thread + 1) / team : N;
    const TeamWalk<float> walk(a.step_rows, a.step_offset, a.reverse, split_rows, {own_rows_begin, own_rows_end},
                               {unit_begin, unit_end}, h_buf, N * Hout, Hout);
    int64_t gates_origin = 0;  // the input row whose gates are gates[0]
    const auto at_step = [&](int64_t step, int64_t t) {
      if (owns_projection && !per_step_projection && step % chunk_steps == 0) {
        // The chunk's steps cover one contiguous range of input rows (rows are stored step by step).
        const int64_t last = std::min(steps, step + chunk_steps) - 1;
        const int64_t t_low = a.reverse ? steps - 1 - last : step, t_high = a.reverse ? t : last;
        const int64_t chunk_begin = (*a.step_offset)[t_low];
        const int64_t chunk_end = (*a.step_offset)[t_high] + (*a.step_rows)[t_high];
        if (!a.gates.defined()) gates_origin = chunk_begin;
        run_kernel<ProjectBlocks>(input + chunk_begin * I, I, packed_ih_ptr, w_ih_layout, packed_bias_ptr,
                                  gates + (chunk_begin - gates_origin) * 4 * H, H, chunk_end - chunk_begin,
                                  block_begin, block_end);
      }
    };
    const auto run_step = [&](int64_t rows, int64_t row0, int64_t r0, int64_t r1, const float* h_cur,
                              float* h_next) {
      if (per_step_projection && !a.gates.defined()) gates_origin = row0;
      if (r1 > r0) {
        const StepForwardArgs s = StepForwardArgs{
            .dtype = at::kFloat,
            .rows = rows,
            .hidden = H,
            .out_hidden = Hout,
            .gates = {gates + (row0 - gates_origin) * 4 * H, 4 * H},
            .c_state = {c_state, H},
            .h_state = {const_cast<float*>(h_cur), Hout},  // read only
            .h_next = {h_next, Hout},
            .output = {output + row0 * output_stride, output_stride},
            .c_prev_saved = {c_prev ? c_prev + row0 * H : nullptr, H},
            .h_prev_saved = {h_prev ? h_prev + row0 * Hout : nullptr, Hout},
        }.row_range(r0, r1 - r0);
        if (in_place) {
          run_kernel<ThreadStepInPlace>(s, w, unit_begin, unit_end);
        } else {
          StepProjection projection;
          if (per_step_projection) {
            projection.input = input + (row0 + r0) * I;
            projection.input_size = I;
            projection.packed_w_ih = packed_ih_ptr;
            projection.w_ih_layout = w_ih_layout;
            projection.packed_bias = packed_bias_ptr;
          }
          run_kernel<ThreadStep>(s, projection, packed_ptr, w_hh_layout, block_begin, block_end);
        }
      }
    };
    const int64_t parity = walk_steps(walk, 0, 0, steps, at_step, run_step);
    if (thread == 0) final_buffer = parity;
  }
  a.h_state.copy_(h_buffers[final_buffer]);
  return true;
}


// Each thread owns 64-unit panels of hidden units for the whole sequence: per step it runs the pointwise
// backward of its units (d_gates of its units' four gates), the team meets at a barrier, and it computes
// its columns of dh = d_gates @ w_hh from all units' d_gates. The dh columns it writes are exactly the
// units its next pointwise step reads, and c is per unit, so one barrier per step is enough.
bool cpu_recurrence_backward(const RecurrenceBackwardArgs& a) {
  const int64_t N = a.dh_state.size(0), H = a.dc_state.size(1);
  const cpu_plan::BackwardPlan plan =
      cpu_plan::plan_backward(N, H, a.gates.size(0), a.gates.scalar_type() == at::kFloat, /*projection=*/false,
                              /*vector_kernels=*/true, cpu_plan::this_machine());
  if (!plan.fused) return false;
  const PackedMatrix w_hh = pack_matrix(a.w_hh);  // [4H, H] in panels of 64 columns (units)
  const int threads = static_cast<int>(plan.threads);

  float* gates = a.gates.data_ptr<float>();  // read only, as c_prev and d_output
  float* c_prev = a.c_prev.data_ptr<float>();
  float* d_output = a.d_output.data_ptr<float>();
  const int64_t d_output_stride = a.d_output.stride(0);
  float* dh = a.dh_state.data_ptr<float>();
  float* dc = a.dc_state.data_ptr<float>();
  float* d_gates = a.d_gates.data_ptr<float>();

#pragma omp parallel num_threads(threads)
  {
    const auto [thread, team] = thread_in_team();
    const int64_t panel_begin = w_hh.count() * thread / team, panel_end = w_hh.count() * (thread + 1) / team;
    const int64_t unit_begin = panel_begin * kPanel, unit_end = std::min(H, panel_end * kPanel);
    const auto pointwise = [&](int64_t rows, int64_t row0) {
      const StepBackwardArgs s{
          .dtype = at::kFloat,
          .rows = rows,
          .hidden = H,
          .gates = {gates + row0 * 4 * H, 4 * H},
          .c_prev = {c_prev + row0 * H, H},
          .dh = {dh, H},
          .d_output = {d_output + row0 * d_output_stride, d_output_stride},
          .dc_state = {dc, H},
          .d_gates = {d_gates + row0 * 4 * H, 4 * H},
      };
      run_kernel<PointwiseBackwardUnits>(s, unit_begin, unit_end);
    };
    const auto product = [&](int64_t carried, int64_t row0) {
      // A panel is [4H][64]: at large H too much to stay in L2 next to the rows it multiplies, so each row
      // tile would stream it from L3 again. In k chunks of kPanelChunkK (plan.k_chunks of them) it does stay.
      constexpr int64_t kChunkK = cpu_limits::kPanelChunkK;
      for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
        for (int64_t k0 = 0; k0 < 4 * H; k0 += kChunkK) {
          matmul_panel(d_gates + row0 * 4 * H, 4 * H, 1, w_hh, dh, H, /*accumulate=*/k0 > 0, nullptr, panel, 0,
                       carried, k0, std::min(4 * H, k0 + kChunkK));
        }
      }
    };
    walk_backward_steps(*a.step_rows, *a.step_offset, a.reverse, a.need_h0_grad, pointwise, product);
  }
  return true;
}

}  // namespace fused_lstm
