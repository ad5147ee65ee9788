// The time walks one member of a recurrence's OpenMP team runs, shared by the float32 recurrences
// (recurrence_cpu.cpp) and the bfloat16 ones (bf16_recurrence.cpp), which differ in what a step computes.
// Forward: h is double-buffered (every thread reads all of h_{t-1} while others write h_t); the team splits the
// hidden units (a barrier per step) or the batch rows (none: a thread's sequences depend on nothing another
// writes). Backward: walk_backward_steps.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "../lstm_layer.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fused_lstm {

// (this thread's index, the team's size) inside an OpenMP parallel region.
inline std::pair<int64_t, int64_t> thread_in_team() {
#ifdef _OPENMP
  return {omp_get_thread_num(), omp_get_num_threads()};
#else
  return {0, 1};
#endif
}

// One thread's share of the walk. Element type T: the h buffers' (float or bfloat16 bits).
template <typename T>
struct TeamWalk {
  // The sequence (step tables as in RecurrenceForwardArgs), how the team splits it, this thread's share and the
  // two h buffers.
  TeamWalk(const std::vector<int64_t>* step_rows, const std::vector<int64_t>* step_offset, bool reverse,
           bool split_rows, std::pair<int64_t, int64_t> own_rows, std::pair<int64_t, int64_t> units, T* h_buf,
           int64_t h_size, int64_t h_stride)
      : steps(static_cast<int64_t>(step_rows->size())), reverse(reverse), split_rows(split_rows),
        step_rows(step_rows), step_offset(step_offset), own_rows_begin(own_rows.first),
        own_rows_end(own_rows.second), unit_begin(units.first), unit_end(units.second), h_buf(h_buf),
        h_size(h_size), h_stride(h_stride) {}
  int64_t steps;
  bool reverse;     // walk time from T-1 down to 0
  bool split_rows;  // the team splits the batch rows: no barrier per step
  const std::vector<int64_t>* step_rows;    // [T] active rows per step
  const std::vector<int64_t>* step_offset;  // [T] first row of each step
  int64_t own_rows_begin, own_rows_end;     // batch rows this thread runs
  int64_t unit_begin, unit_end;             // the h columns this thread writes
  T* h_buf;                                 // [2][h_size]: h_{t-1} and h_t, swapped every step
  int64_t h_size, h_stride;                 // elements per buffer and per batch row
};

// Walks steps [step_begin, step_end) from buffer `parity` and returns the parity after them. For every step,
// at_step(step, time) first (also for steps without rows); then for steps with rows,
// run_step(rows, row0, r0, r1, h_cur, h_next): the step's `rows` active rows start at input row row0, this
// thread computes rows [r0, r1) of them (r1 <= r0 when none) and its units. The walk then carries the thread's
// rows that are not active (finished sequences) into the buffer that becomes current and meets the team.
template <typename T, typename AtStep, typename RunStep>
inline __attribute__((always_inline)) int64_t walk_steps(const TeamWalk<T>& w, int64_t parity, int64_t step_begin,
                                                         int64_t step_end, AtStep&& at_step, RunStep&& run_step) {
  for (int64_t step = step_begin; step < step_end; ++step) {
    const int64_t time = w.reverse ? w.steps - 1 - step : step;
    at_step(step, time);
    const int64_t rows = (*w.step_rows)[time], row0 = (*w.step_offset)[time];
    if (rows == 0) continue;  // the same on every thread, so the barriers stay matched
    T* h_cur = w.h_buf + parity * w.h_size;
    T* h_next = w.h_buf + (1 - parity) * w.h_size;
    run_step(rows, row0, std::min(rows, w.own_rows_begin), std::min(rows, w.own_rows_end),
             static_cast<const T*>(h_cur), h_next);
    for (int64_t b = std::max(rows, w.own_rows_begin); b < w.own_rows_end; ++b) {
      std::copy(h_cur + b * w.h_stride + w.unit_begin, h_cur + b * w.h_stride + w.unit_end,
                h_next + b * w.h_stride + w.unit_begin);
    }
    parity = 1 - parity;
    if (!w.split_rows) {
#pragma omp barrier
    }
  }
  return parity;
}

// The backward walk: the forward's steps in reverse. Per step with rows, pointwise(rows, row0) (the step's `rows`
// active rows start at input row row0) for this thread's units; then, when some of those rows carry dh to the
// step before (carried_rows, lstm_layer.h), a barrier (every thread's d_gates are written) and
// product(carried, row0) for this thread's part of dh. A step without rows, or with none carried, is the same on
// every thread, so the barriers stay matched.
template <typename Pointwise, typename Product>
inline __attribute__((always_inline)) void walk_backward_steps(const std::vector<int64_t>& step_rows,
                                                               const std::vector<int64_t>& step_offset,
                                                               bool reverse, bool need_h0_grad,
                                                               Pointwise&& pointwise, Product&& product) {
  const int64_t steps = static_cast<int64_t>(step_rows.size());
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t time = reverse ? step : steps - 1 - step;
    const int64_t rows = step_rows[time], row0 = step_offset[time];
    if (rows == 0) continue;
    pointwise(rows, row0);
    const int64_t carried = carried_rows(step_rows, time, reverse, need_h0_grad);
    if (carried == 0) continue;
#pragma omp barrier
    product(carried, row0);
  }
}

}  // namespace fused_lstm
