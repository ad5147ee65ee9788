// The forward recurrence of one direction in bfloat16 on the CPU (autocast's dtype), the whole sequence in one
// OpenMP team like the float32 one (recurrence_cpu.h). The product h_{t-1} @ W_hh^T runs on AMX tiles or with
// vdpbf16ps (cpu_features.h, CpuBf16Kernels), accumulating in float32; the cell state stays float32 inside
// the call and the pointwise step runs in float32 (lstm_cell.h); what is written out (output, h_n, c_n and the
// workspace: post-activation gates, c_prev, h_prev) is bfloat16 in the layout the driver's per-step loop writes,
// so the backward reads either alike.
#pragma once

#include "../lstm_layer.h"

namespace fused_lstm {

// Runs the forward time loop of one bfloat16 direction whose input projection the driver computed into
// args.gates (args.projected), and returns the name of the product kernel that ran ("amx", "avx512_bf16"); or
// returns nullptr when it does not apply (the planner says why: cpu_plan.h, plan_bf16_forward), so that the
// driver runs its per-step loop.
const char* cpu_bf16_recurrence_forward(const RecurrenceForwardArgs& args);

// The backward time loop of one bfloat16 direction likewise: dh and dc in float32 inside the call, d_gates
// written in bfloat16 (the driver's weight-gradient GEMMs read it) and multiplied by W_hh packed once.
const char* cpu_bf16_recurrence_backward(const RecurrenceBackwardArgs& args);

}  // namespace fused_lstm
