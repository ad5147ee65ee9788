#include "cpu_plan_bindings.h"

#include "cpu_features.h"
#include "cpu_limits.h"
#include "cpu_plan.h"

namespace fused_lstm {
namespace {

namespace py = pybind11;
using namespace cpu_plan;

// This machine, with any of threads, row_tile, l2_bytes, l3_bytes taken from `overrides` (a dict or None):
// the tests plan for CPUs they do not run on.
Machine machine_from(const py::object& overrides) {
  Machine m = this_machine();
  if (overrides.is_none()) return m;
  const py::dict d = overrides.cast<py::dict>();
  for (const auto& item : d) {
    const std::string key = item.first.cast<std::string>();
    if (key == "bf16_kernels") {
      m.bf16_kernels = cpu_bf16_kernels_from_name(item.second.cast<std::string>().c_str());
      continue;
    }
    const int64_t value = item.second.cast<int64_t>();
    TORCH_CHECK(value > 0, "fused_lstm: machine['", key, "'] must be positive, got ", value);
    if (key == "threads") m.threads = value;
    else if (key == "row_tile") m.row_tile = value;
    else if (key == "l2_bytes") m.l2_bytes = value;
    else if (key == "l3_bytes") m.l3_bytes = value;
    else TORCH_CHECK(false, "fused_lstm: unknown machine key '", key, "' (threads, row_tile, l2_bytes, l3_bytes, "
                "bf16_kernels)");
  }
  return m;
}

py::dict machine_dict(const Machine& m) {
  py::dict d;
  d["threads"] = m.threads;
  d["row_tile"] = m.row_tile;
  d["l2_bytes"] = m.l2_bytes;
  d["l3_bytes"] = m.l3_bytes;
  d["bf16_kernels"] = cpu_bf16_kernels_name(m.bf16_kernels);
  return d;
}

}  // namespace

void register_cpu_plan_bindings(py::module_& m) {
  m.def("cpu_machine", [] {
    py::dict d = machine_dict(this_machine());
    d["l2_source"] = cpu_caches().l2_source;
    d["l3_source"] = cpu_caches().l3_source;
    d["kernels"] = cpu_kernels_name(cpu_kernels());
    return d;
  }, "What the CPU planner plans for in this process: threads, the kernels' row tile, the caches and where "
     "their sizes came from (csrc/cpu/cpu_plan.h)");

  m.def("cpu_kernel_limits", [](const py::object& machine) {
    namespace limits = cpu_limits;
    const Machine mach = machine_from(machine);
    py::dict d;
    d["max_in_place_rows"] = limits::kMaxInPlaceRows;
    d["max_bf16_dot_rows"] = limits::kMaxBf16DotRows;
    d["max_bf16_small_product_macs"] = limits::kMaxBf16SmallProductMacs;
    d["max_in_place_rows_large_weight"] = limits::kMaxInPlaceRowsLargeWeight;
    d["large_weight_bytes"] = limits::kLargeWeightBytes;
    d["min_packed_rows"] = limits::kMinPackedRows;
    d["min_packed_depth"] = limits::kMinPackedDepth;
    d["panel_chunk_k"] = limits::kPanelChunkK;
    d["max_in_place_batch"] = limits::kMaxInPlaceBatch;
    d["in_place_min_weight_bytes"] = limits::kInPlaceMinWeightBytes;
    d["min_recurrence_rows"] = limits::kMinRecurrenceRows;
    d["fused_projection_min_batch"] = limits::kFusedProjectionMinBatch;
    d["projection_chunk_rows"] = limits::kProjectionChunkRows;
    d["large_projection_chunk_bytes"] = limits::kLargeProjectionChunkBytes;
    d["row_split_min_batch"] = limits::kRowSplitMinBatch;
    d["row_split_min_rows_per_thread"] = limits::kRowSplitMinRowsPerThread;
    d["flops_per_thread"] = limits::kFlopsPerThread;
    d["bf16_packed_depth_multiple"] = limits::kBf16PackedDepthMultiple;
    d["amx_tile_rows"] = limits::kAmxTileRows;
    d["amx_tile_depth"] = limits::kAmxTileDepth;
    d["dpbf16_row_tile"] = limits::kDpbf16RowTile;
    d["amx_min_batch"] = limits::kAmxMinBatch;
    d["bf16_projection_l2_divisor"] = limits::kBf16ProjectionL2Divisor;
    d["bf16_row_split_l2_divisor"] = limits::kBf16RowSplitL2Divisor;
    d["bf16_min_projection_chunk_rows"] = limits::kBf16MinProjectionChunkRows;
    d["bf16_projection_chunk_rows"] = limits::kBf16ProjectionChunkRows;
    d["bf16_projection_chunk_bytes"] = limits::kBf16ProjectionChunkBytes;
    d["max_kept_gradient_blocks"] = limits::kMaxKeptGradientBlocks;
    // From the caches:
    d["usable_l3_bytes"] = usable_l3_bytes(mach);
    d["fused_projection_max_slice_bytes"] = fused_projection_max_slice_bytes(mach);
    d["projection_chunk_max_weight_bytes"] = projection_chunk_max_weight_bytes(mach);
    d["row_split_max_weight_bytes"] = row_split_max_weight_bytes(mach);
    d["shared_gather_max_packed_bytes"] = shared_gather_max_packed_bytes(mach);
    return d;
  }, py::arg("machine") = py::none(),
     "Sizes where the CPU kernels switch form (csrc/cpu/cpu_limits.h), those that follow from the caches for "
     "this machine or `machine` (a dict of threads, row_tile, l2_bytes, l3_bytes overriding this one's)");

  m.def("cpu_plan_product",
        [](int64_t rows, int64_t depth, int64_t cols, bool vector_kernels, bool a_rows_contiguous, bool a_transposed,
           bool b_is_w_transposed, bool b_rows_contiguous, bool b_packed_before, bool b_in_place_before,
           bool bf16_dot_kernels, bool bf16_amx, const py::object& machine) {
          ProductShape s;
          s.rows = rows;
          s.depth = depth;
          s.cols = cols;
          s.vector_kernels = vector_kernels;
          s.a_rows_contiguous = a_rows_contiguous;
          s.a_transposed = a_transposed;
          s.b_is_w_transposed = b_is_w_transposed;
          s.b_rows_contiguous = b_rows_contiguous;
          s.b_packed_before = b_packed_before;
          s.b_in_place_before = b_in_place_before;
          s.bf16_dot_kernels = bf16_dot_kernels;
          s.bf16_amx = bf16_amx;
          const ProductPlan plan = plan_product(s);
          const Machine mach = machine_from(machine);
          py::dict d;
          d["kernel"] = name(plan.kernel);
          d["first_in_place_use"] = plan.first_in_place_use;
          d["reason"] = plan.reason;
          if (plan.kernel == ProductKernel::packed) {
            const PackedProductPlan p = plan_packed_product(rows, depth, cols, !a_rows_contiguous, mach);
            d["schedule"] = name(p.schedule);
            d["tasks"] = p.tasks;
            d["grain"] = p.grain;
            d["rows_per_task"] = p.rows_per_task;
            d["schedule_reason"] = p.reason;
          } else if (plan.kernel != ProductKernel::aten && plan.kernel != ProductKernel::bf16_amx &&
                     plan.kernel != ProductKernel::bf16_amx_rowmajor) {
            const TaskGrid g = plan.kernel != ProductKernel::rowmajor ? plan_dot_product(rows, depth, cols)
                                                                 : plan_rowmajor_product(rows, depth, cols);
            d["tasks"] = g.tasks;
            d["grain"] = g.grain;
          }
          return d;
        },
        py::arg("rows"), py::arg("depth"), py::arg("cols"), py::kw_only(), py::arg("vector_kernels") = true,
        py::arg("a_rows_contiguous") = true, py::arg("a_transposed") = false, py::arg("b_is_w_transposed") = false,
        py::arg("b_rows_contiguous") = true, py::arg("b_packed_before") = false, py::arg("b_in_place_before") = false,
        py::arg("bf16_dot_kernels") = false, py::arg("bf16_amx") = false, py::arg("machine") = py::none(),
        "The CPU planner's choice for one product out[rows, cols] (+)= a[rows, depth] @ b (cpu_plan.h, "
        "plan_product; for packed products also plan_packed_product's schedule)");

  m.def("cpu_plan_forward",
        [](int64_t batch, int64_t hidden, int64_t input_size, int64_t rows, int64_t out_hidden, bool float32,
           bool projection, bool vector_kernels, bool required, const py::object& machine) {
          ForwardShape s = forward_shape(batch, hidden, input_size, rows, out_hidden, projection, required);
          s.float32 = float32;
          s.vector_kernels = vector_kernels;
          const ForwardPlan p = plan_forward(s, machine_from(machine));
          py::dict d;
          d["fused"] = p.fused;
          d["in_place"] = p.in_place;
          d["split_rows"] = p.split_rows;
          d["per_step_projection"] = p.per_step_projection;
          d["chunk_steps"] = p.chunk_steps;
          d["threads"] = p.threads;
          d["reason"] = p.reason;
          return d;
        },
        py::arg("batch"), py::arg("hidden"), py::arg("input_size"), py::arg("rows"), py::kw_only(),
        py::arg("out_hidden") = 0, py::arg("float32") = true, py::arg("projection") = false,
        py::arg("vector_kernels") = true, py::arg("required") = false, py::arg("machine") = py::none(),
        "The CPU planner's forward recurrence of one direction (cpu_plan.h, plan_forward)");

  m.def("cpu_plan_bf16_forward",
        [](int64_t batch, int64_t hidden, int64_t input_size, int64_t rows, int64_t out_hidden, bool projection,
           bool required, const py::object& machine) {
          ForwardShape s = forward_shape(batch, hidden, input_size, rows, out_hidden, projection, required);
          const Bf16ForwardPlan p = plan_bf16_forward(s, machine_from(machine));
          py::dict d;
          d["fused"] = p.fused;
          d["kernel"] = cpu_bf16_kernels_name(p.kernel);
          d["split_rows"] = p.split_rows;
          d["row_tile"] = p.row_tile;
          d["packed_depth"] = p.packed_depth;
          d["chunk_steps"] = p.chunk_steps;
          d["threads"] = p.threads;
          d["reason"] = p.reason;
          return d;
        },
        py::arg("batch"), py::arg("hidden"), py::arg("input_size"), py::arg("rows"), py::kw_only(),
        py::arg("out_hidden") = 0, py::arg("projection") = false, py::arg("required") = false,
        py::arg("machine") = py::none(),
        "The CPU planner's bfloat16 forward recurrence of one direction (cpu_plan.h, plan_bf16_forward)");

  m.def("cpu_plan_bf16_backward",
        [](int64_t batch, int64_t hidden, int64_t rows, bool projection, const py::object& machine) {
          const Bf16BackwardPlan p = plan_bf16_backward(batch, hidden, rows, projection, machine_from(machine));
          py::dict d;
          d["fused"] = p.fused;
          d["kernel"] = cpu_bf16_kernels_name(p.kernel);
          d["packed_depth"] = p.packed_depth;
          d["threads"] = p.threads;
          d["reason"] = p.reason;
          return d;
        },
        py::arg("batch"), py::arg("hidden"), py::arg("rows"), py::kw_only(), py::arg("projection") = false,
        py::arg("machine") = py::none(),
        "The CPU planner's bfloat16 backward recurrence of one direction (cpu_plan.h, plan_bf16_backward)");

  m.def(
      "_set_cpu_bf16_kernels",
      [](const std::string& name) {
        return std::string(cpu_bf16_kernels_name(set_cpu_bf16_kernels(cpu_bf16_kernels_from_name(name.c_str()))));
      },
      py::arg("name"),
      "Selects the bfloat16 recurrence's product kernel: 'amx', 'avx512_bf16' or 'aten' (csrc/cpu/cpu_features.h), "
      "any this CPU supports; returns the previous selection. For tests and measurements.");
  m.def("_supported_cpu_bf16_kernels", &supported_cpu_bf16_kernel_names,
        "The bfloat16 product kernels this CPU can run, for _set_cpu_bf16_kernels.");

  m.def("cpu_plan_backward",
        [](int64_t batch, int64_t hidden, int64_t rows, bool float32, bool projection, bool vector_kernels,
           const py::object& machine) {
          const BackwardPlan p = plan_backward(batch, hidden, rows, float32, projection, vector_kernels,
                                               machine_from(machine));
          py::dict d;
          d["fused"] = p.fused;
          d["threads"] = p.threads;
          d["k_chunks"] = p.k_chunks;
          d["reason"] = p.reason;
          return d;
        },
        py::arg("batch"), py::arg("hidden"), py::arg("rows"), py::kw_only(), py::arg("float32") = true,
        py::arg("projection") = false, py::arg("vector_kernels") = true, py::arg("machine") = py::none(),
        "The CPU planner's backward recurrence of one direction (cpu_plan.h, plan_backward)");

  m.def("cpu_plan_weight_gradients",
        [](int64_t hidden, int64_t rows, int64_t input_size, int64_t out_hidden, bool vector_kernels,
           const py::object& machine) {
          const WeightGradientPlan p = plan_weight_gradients(4 * hidden, rows, input_size,
                                                             out_hidden > 0 ? out_hidden : hidden, vector_kernels,
                                                             machine_from(machine));
          py::dict d;
          d["packed"] = p.packed;
          d["passes"] = p.passes;
          d["reason"] = p.reason;
          return d;
        },
        py::arg("hidden"), py::arg("rows"), py::arg("input_size"), py::kw_only(), py::arg("out_hidden") = 0,
        py::arg("vector_kernels") = true, py::arg("machine") = py::none(),
        "The CPU planner's weight gradients of one direction (cpu_plan.h, plan_weight_gradients)");
}

}  // namespace fused_lstm
