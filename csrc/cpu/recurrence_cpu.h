// The whole forward and backward recurrences of one direction on the CPU, for float32 without projections.
#pragma once

#include "../lstm_layer.h"

namespace fused_lstm {

// Runs the forward time loop of one direction (semantics of the driver's per-step loop in
// lstm_layer.cpp) and returns true, or returns false when it does not apply (dtype other than
// float32, projections) so that the driver runs its generic loop.
bool cpu_recurrence_forward(const RecurrenceForwardArgs& args);

// The backward time loop of one direction, likewise (float32; the driver never passes projections).
bool cpu_recurrence_backward(const RecurrenceBackwardArgs& args);

}  // namespace fused_lstm
