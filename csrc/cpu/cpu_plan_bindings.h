// Python bindings of the CPU planner (cpu_plan.h): fused_lstm._C.cpu_machine, cpu_kernel_limits and the
// cpu_plan_* functions, which fused_lstm.explain and tests/test_cpu_plan.py call.
#pragma once

#include <torch/extension.h>

namespace fused_lstm {

void register_cpu_plan_bindings(pybind11::module_& m);

}  // namespace fused_lstm
