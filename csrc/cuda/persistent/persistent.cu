// Host side of the persistent recurrences (forward and backward): mode, support checks, the launch plan
// (grid and slice size from the device's occupancy, never from an assumed card) and the cooperative launches.
// The kernels are in persistent_forward.cuh and persistent_backward.cuh; the public interface in persistent.h.
#include "persistent.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <type_traits>
#include <vector>

#include "../gpu_runtime.h"
#include "../precision.h"
#include "cost_model.h"
#include "persistent_backward.cuh"
#include "persistent_forward.cuh"

namespace fused_lstm {
namespace {

using cuda::persistent::backward_shared_bytes;
using cuda::persistent::backward_weight_rows;
using cuda::persistent::BackwardParams;
using cuda::persistent::forward_shared_bytes;
using cuda::persistent::ForwardParams;
using cuda::persistent::Exchange;
using cuda::persistent::kBounds;
using cuda::persistent::kMaxClusterBlocks;
using cuda::persistent::kMaxBatch;
using cuda::persistent::kRowsPerTile;
using cuda::persistent::kThreads;
using cuda::persistent::lanes_per_tile;
using cuda::persistent::MmaTraits;
using cuda::persistent::Product;
using cuda::persistent::persistent_backward_kernel;
using cuda::persistent::persistent_forward_kernel;
using cuda::persistent::round_up;

std::atomic<int64_t> launch_count{0};

// Which persistent kernel a plan is for. Forward without the training workspace is its own instantiation
// (fewer stores), with the same shared memory.
enum class Pass { Forward, ForwardTraining, Backward };

const char* kernel_name(Pass pass) {
  return pass == Pass::Backward ? "persistent_backward_kernel" : "persistent_forward_kernel";
}

// Calls variant(product, exchange) with both as compile-time constants (std::integral_constant): the variants
// the kernels are built in. The cluster exchange exists for Fma only (candidate_variants).
template <typename F>
auto with_variant(Product product, Exchange exchange, F&& variant) {
  using Fma = std::integral_constant<Product, Product::Fma>;
  using Mma = std::integral_constant<Product, Product::Mma>;
  using Grid = std::integral_constant<Exchange, Exchange::Grid>;
  if (exchange == Exchange::Cluster) return variant(Fma{}, std::integral_constant<Exchange, Exchange::Cluster>{});
  return product == Product::Mma ? variant(Mma{}, Grid{}) : variant(Fma{}, Grid{});
}

// Calls f(std::true_type) or f(std::false_type).
template <typename F>
auto with_flag(bool flag, F&& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

template <typename scalar_t>
auto forward_kernel(bool save_workspace, Product product, Exchange exchange, bool project) {
  return with_variant(product, exchange, [&](auto p, auto e) {
    return with_flag(save_workspace, [&](auto save) {
      return with_flag(project, [&](auto proj) {
        return &persistent_forward_kernel<scalar_t, decltype(save)::value, decltype(p)::value, decltype(e)::value,
                                         decltype(proj)::value>;
      });
    });
  });
}

template <typename scalar_t>
auto backward_kernel(Product product, Exchange exchange, bool project) {
  return with_variant(product, exchange, [&](auto p, auto e) {
    return with_flag(project, [&](auto proj) {
      return &persistent_backward_kernel<scalar_t, decltype(proj)::value, decltype(p)::value, decltype(e)::value>;
    });
  });
}

// The storage dtypes the persistent kernels are built for: AT_DISPATCH over float32, float16 and bfloat16 (any
// other dtype throws; plans decline it first, see kernel_for).
#define FUSED_LSTM_DISPATCH_PERSISTENT_TYPES(TYPE, NAME, ...)                                      \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                          \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                       \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// The kernel instantiation for a pass, product variant, projection and storage dtype, untyped (for attribute and
// occupancy queries), or null for a dtype the kernels do not have.
const void* kernel_for(Pass pass, at::ScalarType dtype, Product product, Exchange exchange, bool project) {
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) return nullptr;
  const void* kernel = nullptr;
  FUSED_LSTM_DISPATCH_PERSISTENT_TYPES(dtype, "fused_lstm_persistent_kernel_for", [&] {
    kernel = pass == Pass::Backward
                 ? reinterpret_cast<const void*>(backward_kernel<scalar_t>(product, exchange, project))
                 : reinterpret_cast<const void*>(
                       forward_kernel<scalar_t>(pass == Pass::ForwardTraining, product, exchange, project));
  });
  return kernel;
}

// How one call runs: U units per block, `blocks` blocks (all co-resident), the product's variant and, for
// Fma, k_split lanes per tile.
struct Plan {
  int units_per_block;
  int blocks;
  Product product;
  Exchange exchange;  // Cluster: the blocks are one thread-block cluster, not a cooperative grid
  int k_split;
  int padded_k;      // the product's reduction length (forward H, backward 4H) rounded up to 16-byte vectors
                     // (Mma: to its k step)
  int padded_batch;  // N rounded up to the product's row tile (Fma 4, Mma 16)
  size_t smem_bytes;
  // With a projection (proj_size = Hout > 0): each block's V columns of Hout (forward: of h_t = h'_t @ W_hr^T;
  // backward: of dh), the projection product's lanes per tile and its padded reduction length (forward H,
  // backward Hout, rounded up to 16-byte vectors). Without one: V = units_per_block, the rest 0.
  int outs_per_block = 0;
  int proj_k_split = 0;
  int padded_proj_k = 0;
};

void set_reason(std::string* why_not, const std::string& reason) {
  if (why_not != nullptr) *why_not = reason;
}

// Shared memory a block of `pass` needs for U units (and, with a projection, V columns of Hout over a padded
// projection reduction of padded_proj_k; 0 without one).
size_t pass_shared_bytes(Pass pass, Product product, Exchange exchange, int units, int padded_k, int padded_batch,
                         int element_size, int outs = 0, int padded_proj_k = 0) {
  return pass == Pass::Backward
             ? backward_shared_bytes(units, padded_k, padded_batch, element_size, outs, padded_proj_k, product,
                                     exchange == Exchange::Cluster)
             : forward_shared_bytes(units, padded_k, padded_batch, element_size, exchange == Exchange::Cluster, outs,
                                    padded_proj_k);
}

// The k step of the Mma variant for a dtype (its reduction length is padded to it).
int mma_k_step(at::ScalarType dtype) {
  return dtype == at::kFloat ? MmaTraits<float>::kStep : MmaTraits<c10::Half>::kStep;
}

// The launch plan of `pass` for N = batch rows, H = hidden units and a projection to Hout = proj columns (0: none)
// on `device`, or nullopt (and the reason). The slice size U is the smallest for which ceil(H / U) blocks are
// co-resident by the occupancy API with the shared memory that U needs: the most blocks, so the most SMs, share
// the work; with a projection each block also takes V = ceil(Hout / blocks) columns of Hout (W_hr's rows
// forward, W_hh's columns backward). Only the pass, the dtype, N, H and Hout matter, so this is also what
// persistent_max_hidden searches over.
std::optional<Plan> make_plan_for(Pass pass, Product product, Exchange exchange, at::ScalarType dtype, int64_t batch,
                                  int64_t hidden, int64_t proj, c10::DeviceIndex device, std::string* why_not) {
  const bool project = proj > 0;
  const void* kernel = kernel_for(pass, dtype, product, exchange, project);
  if (kernel == nullptr) {
    set_reason(why_not, std::string("dtype ") + c10::toString(dtype) + " (float32, float16 and bfloat16 only)");
    return std::nullopt;
  }
  if (batch < 1 || batch > kMaxBatch) {
    set_reason(why_not, "batch " + std::to_string(batch) + " (1 to " + std::to_string(kMaxBatch) + " rows)");
    return std::nullopt;
  }
  if (hidden < 1 || hidden > (1 << 20) || proj < 0 || proj > hidden) {
    set_reason(why_not, "hidden size " + std::to_string(hidden) + " with proj_size " + std::to_string(proj));
    return std::nullopt;
  }
  const gpu::DeviceGuard guard(device);
  const gpu::DeviceLimits limits = gpu::device_limits(device);
  if (!limits.cooperative_launch) {
    set_reason(why_not, "the device does not support cooperative launches");
    return std::nullopt;
  }
  const size_t smem_limit = limits.shared_bytes_per_block_optin;
  // Opt in to the device's whole per-block shared memory, and prefer shared memory over L1 (the kernels
  // read everything they reuse from shared memory; global reads bypass L1 anyway).
  gpu::set_max_dynamic_shared(kernel, kernel_name(pass), smem_limit);

  const int H = static_cast<int>(hidden), N = static_cast<int>(batch);
  const int HO = project ? static_cast<int>(proj) : H;  // the columns of h, the output and dh
  const int element_size = static_cast<int>(c10::elementSize(dtype));
  const int vec = 16 / element_size;
  const bool mma = product == Product::Mma;
  const int K = round_up(pass == Pass::Backward ? 4 * H : HO, mma ? mma_k_step(dtype) : vec);
  // The projection product's reduction: forward h' (H), backward dh_total (Hout).
  const int proj_k = project ? round_up(pass == Pass::Backward ? HO : H, vec) : 0;
  const int n_pad = round_up(N, mma ? 16 : kRowsPerTile);
  // Mma tiles are 16 rows: forward, 16 gate rows (whole groups of 4 units); backward without a projection, 16 dh
  // columns (the block's units; with a projection the kernel pads its V columns of Hout to 16).
  const int unit_step = !mma ? 1 : pass != Pass::Backward ? 4 : project ? 1 : 16;
  const bool cluster = exchange == Exchange::Cluster;
  const int sms = limits.multiprocessors;
  const int blocks_per_sm_by_threads = std::max(1, limits.max_threads_per_sm / kThreads);
  // A cluster's blocks are few (one per SM of a GPC at most): as many blocks as it allows, never more (16 with the
  // non-portable size the plan allows for the cluster kernel; the device's own limit is checked per U below).
  const int64_t most_blocks = cluster ? kMaxClusterBlocks : static_cast<int64_t>(sms) * blocks_per_sm_by_threads;
  const int64_t first_units = round_up(static_cast<int>(std::max<int64_t>(1, (H + most_blocks - 1) / most_blocks)),
                                       unit_step);
  const auto outs_for = [&](int64_t blocks) { return project ? static_cast<int>((HO + blocks - 1) / blocks) : 0; };
  for (int64_t U = first_units; U < H + unit_step; U += unit_step) {
    const size_t smem = pass_shared_bytes(pass, product, exchange, static_cast<int>(U), K, n_pad, element_size,
                                          outs_for((H + U - 1) / U), proj_k);
    if (smem > smem_limit) {
      set_reason(why_not, "hidden size " + std::to_string(H) +
                              (project ? " with proj_size " + std::to_string(HO) : std::string()) + " with batch " +
                              std::to_string(N) + " in " +
                              c10::toString(dtype) + " does not fit the " +
                              (pass == Pass::Backward ? "backward" : "forward") + " kernel: " + std::to_string(U) +
                              " units per block need " + std::to_string(smem) +
                              " bytes of shared memory per block for all blocks to be co-resident, the device "
                              "allows " + std::to_string(smem_limit));
      return std::nullopt;
    }
    const int per_sm = gpu::max_active_blocks_per_sm(kernel, kBounds, kThreads, smem);
    const int64_t blocks = (H + U - 1) / U;
    const int64_t co_resident =
        cluster ? std::min<int64_t>(most_blocks,
                                    gpu::max_cluster_blocks(kernel, kernel_name(pass), kBounds, kThreads, smem))
                : static_cast<int64_t>(per_sm) * sms;
    if (per_sm > 0 && blocks <= co_resident) {
      Plan plan;
      // Spread the units evenly: no more blocks, and no more shared memory per block, than U needs.
      plan.units_per_block = round_up(static_cast<int>((H + blocks - 1) / blocks), unit_step);
      plan.blocks = (H + plan.units_per_block - 1) / plan.units_per_block;
      plan.product = product;
      plan.exchange = exchange;
      plan.padded_k = K;
      plan.padded_batch = n_pad;
      plan.outs_per_block = project ? outs_for(plan.blocks) : plan.units_per_block;
      plan.padded_proj_k = proj_k;
      plan.smem_bytes = pass_shared_bytes(pass, product, exchange, plan.units_per_block, K, n_pad, element_size,
                                          project ? plan.outs_per_block : 0, proj_k);
      // Each product's lanes per tile from its tile count (forward: the W_hh product over the block's units and
      // the projection over its V columns; backward: the dh product over its dh columns and the projection over
      // its units). The FMA row products tile the batch as the plan pads it.
      const int row_tiles = round_up(N, kRowsPerTile) / kRowsPerTile;
      const bool backward = pass == Pass::Backward;
      plan.k_split = lanes_per_tile((backward ? plan.outs_per_block : plan.units_per_block) * row_tiles);
      if (project) {
        plan.proj_k_split = lanes_per_tile((backward ? plan.units_per_block : plan.outs_per_block) *
                                           (backward ? row_tiles : n_pad / kRowsPerTile));
      }
      return plan;
    }
  }
  set_reason(why_not, "no grid of co-resident blocks covers hidden size " + std::to_string(H));
  return std::nullopt;
}

// The variants named by the environment variable `name` ("auto" or unset: all of `variants`); anything but
// "auto" or a name in `names` is an error. For comparing the variants on a GPU, or testing one.
template <typename Variant>
std::vector<Variant> restricted(std::vector<Variant> variants, const char* name,
                                std::initializer_list<std::pair<const char*, Variant>> names) {
  const char* forced = std::getenv(name);
  if (forced == nullptr || forced[0] == '\0' || std::strcmp(forced, "auto") == 0) return variants;
  for (const auto& [text, variant] : names) {
    if (std::strcmp(forced, text) == 0) {
      std::vector<Variant> kept;
      for (const Variant v : variants) {
        if (v == variant) kept.push_back(v);
      }
      return kept;
    }
  }
  std::string known;
  for (const auto& entry : names) known += std::string(entry.first) + ", ";
  TORCH_CHECK(false, "fused_lstm: ", name, " must be ", known, "or auto, got '", forced, "'");
}

// The variants of both passes on a device, as (product, exchange) pairs:
//   - products: Fma always; Mma (tensor cores) on sm_80 and newer, for fp16 and bf16, and for float32 when TF32
//     is allowed for RNNs (as cuDNN's products would);
//   - exchanges: Grid always; Cluster on sm_90 and newer, with the Fma product (the cluster serves the small
//     batches FMAs suit).
// FUSED_LSTM_PERSISTENT_PRODUCT=fma|mma keeps one product and FUSED_LSTM_PERSISTENT_EXCHANGE=grid|cluster one
// exchange in both passes; a value that is not a variant's name is an error in both passes.
std::vector<std::pair<Product, Exchange>> candidate_variants(at::ScalarType dtype, int compute_major) {
  std::vector<Product> products{Product::Fma};
  if (compute_major >= 8 && (dtype != at::kFloat || cuda::rnn_allows_tf32())) products.push_back(Product::Mma);
  std::vector<Exchange> exchanges{Exchange::Grid};
  if (compute_major >= 9) exchanges.push_back(Exchange::Cluster);
  products = restricted(products, "FUSED_LSTM_PERSISTENT_PRODUCT", {{"fma", Product::Fma}, {"mma", Product::Mma}});
  exchanges = restricted(exchanges, "FUSED_LSTM_PERSISTENT_EXCHANGE",
                         {{"grid", Exchange::Grid}, {"cluster", Exchange::Cluster}});
  std::vector<std::pair<Product, Exchange>> variants;
  for (const Product product : products) {
    for (const Exchange exchange : exchanges) {
      if (exchange == Exchange::Grid || product == Product::Fma) variants.emplace_back(product, exchange);
    }
  }
  return variants;
}

double predicted_step_us(Pass pass, const Plan& plan, int64_t batch, int64_t hidden, int64_t proj, int element_size);

// The launch plan of `pass` (proj: the projection's size Hout, 0 without one): among the variants with a plan, the
// one the cost model predicts fastest.
std::optional<Plan> make_plan(Pass pass, at::ScalarType dtype, int64_t batch, int64_t hidden, int64_t proj,
                              c10::DeviceIndex device, std::string* why_not) {
  const gpu::DeviceGuard guard(device);
  const std::vector<std::pair<Product, Exchange>> variants =
      candidate_variants(dtype, gpu::device_limits(device).compute_major);
  if (variants.empty()) {
    set_reason(why_not, "FUSED_LSTM_PERSISTENT_PRODUCT / FUSED_LSTM_PERSISTENT_EXCHANGE leave no variant for this "
                        "dtype and device (tensor cores: sm_80+, float32 only with "
                        "torch.backends.cudnn.allow_tf32; clusters: FMAs on sm_90+)");
    return std::nullopt;
  }
  std::optional<Plan> best;
  double best_us = 0.0;
  for (const auto& [product, exchange] : variants) {
    std::optional<Plan> plan =
        make_plan_for(pass, product, exchange, dtype, batch, hidden, proj, device, best ? nullptr : why_not);
    if (!plan) continue;
    const double us = predicted_step_us(pass, *plan, batch, hidden, proj, static_cast<int>(c10::elementSize(dtype)));
    if (!best || us < best_us) {
      best = plan;
      best_us = us;
    }
  }
  return best;
}

// Sequence length of each batch row: lengths[b] = number of steps with more than b active rows (step_rows
// is non-increasing, so row b is active exactly at steps t < lengths[b]). O(T + N).
std::vector<int> row_lengths(const std::vector<int64_t>& step_rows, int batch) {
  std::vector<int> steps_with_rows(batch + 1, 0);  // [r]: steps with exactly r active rows
  for (const int64_t rows : step_rows) ++steps_with_rows[std::min<int64_t>(std::max<int64_t>(rows, 0), batch)];
  std::vector<int> lengths(batch, 0);
  int running = 0;
  for (int b = batch - 1; b >= 0; --b) {
    running += steps_with_rows[b + 1];
    lengths[b] = running;
  }
  return lengths;
}

// The cooperative launch of `kernel` with `params` by `plan`, ordered after the previous one in `order`.
// A cluster plan is one small cluster, not a grid that fills the device: clusters of the two directions may
// run side by side, so only cooperative launches wait for each other.
template <typename Kernel, typename Params>
void launch_cooperative(Pass pass, Kernel kernel, const Params& params, const Plan& plan, CooperativeOrder& order) {
  const bool cluster = plan.exchange == Exchange::Cluster;
  gpu::LaunchShape shape;
  shape.grid = dim3(plan.blocks);
  shape.block = dim3(kThreads);
  shape.shared_bytes = plan.smem_bytes;
  shape.cooperative = !cluster;
  if (cluster) shape.cluster = dim3(plan.blocks);
  if (!cluster) order.wait_for_previous();
  gpu::launch(kernel_name(pass), kernel, kBounds, shape, params);
  if (!cluster) order.record_launch();
  launch_count.fetch_add(1, std::memory_order_relaxed);
}

// The sequence lengths as the kernels take them (zero past N).
void fill_lengths(const std::vector<int64_t>& step_rows, int batch, int (&lengths)[kMaxBatch]) {
  const std::vector<int> rows = row_lengths(step_rows, batch);
  std::fill(std::begin(lengths), std::end(lengths), 0);
  std::copy(rows.begin(), rows.end(), lengths);
}

template <typename scalar_t>
void launch_forward(const RecurrenceForwardArgs& a, const Plan& plan, bool save_workspace, CooperativeOrder& order) {
  const bool project = a.w_hr.defined();
  const int64_t N = a.h_state.size(0), H = a.c_state.size(1), P = plan.padded_k;
  const int64_t HO = a.h_state.size(1);  // Hout (H without a projection)
  const int64_t T = static_cast<int64_t>(a.step_rows->size());

  // The h exchange buffer [2, N, P]: half 0 starts as h0, padding columns stay zero (the kernel's dot
  // products run over all P columns). With a projection on the grid exchange also h' before W_hr [N, Hr], zeros
  // (the projection product reads whole row tiles, so every value it may read must be finite; a cluster keeps h'
  // in shared memory). Allocated once per call, before the launch.
  const Tensor h_exchange = at::zeros({2, N, P}, a.h_state.options());
  h_exchange[0].narrow(1, 0, HO).copy_(a.h_state);
  const bool raw_in_global = project && plan.exchange == Exchange::Grid;
  const Tensor h_raw = raw_in_global ? at::zeros({N, plan.padded_proj_k}, a.h_state.options()) : Tensor();

  ForwardParams<scalar_t> p;
  p.gates = a.gates.data_ptr<scalar_t>();
  p.w_hh = a.w_hh.data_ptr<scalar_t>();
  p.w_stride_row = a.w_hh.stride(0);
  p.w_stride_col = a.w_hh.stride(1);
  p.c_state = a.c_state.data_ptr<scalar_t>();
  p.output = a.output.data_ptr<scalar_t>();
  p.output_stride = a.output.stride(0);
  p.c_prev_saved = save_workspace ? a.c_prev_saved.data_ptr<scalar_t>() : nullptr;
  p.h_prev_saved = save_workspace ? a.h_prev_saved.data_ptr<scalar_t>() : nullptr;
  p.h_exchange = h_exchange.data_ptr<scalar_t>();
  p.w_hr = project ? a.w_hr.data_ptr<scalar_t>() : nullptr;
  p.wr_stride_row = project ? a.w_hr.stride(0) : 0;
  p.wr_stride_col = project ? a.w_hr.stride(1) : 0;
  p.h_raw = raw_in_global ? h_raw.data_ptr<scalar_t>() : nullptr;
  p.total_rows = a.gates.size(0);
  p.hidden = static_cast<int>(H);
  p.out_hidden = static_cast<int>(HO);
  p.padded_hidden = static_cast<int>(P);
  p.padded_raw = plan.padded_proj_k;
  p.outs_per_block = plan.outs_per_block;
  p.proj_k_split = plan.proj_k_split;
  p.batch = static_cast<int>(N);
  p.padded_batch = plan.padded_batch;
  p.units_per_block = plan.units_per_block;
  p.k_split = plan.k_split;
  p.steps = static_cast<int>(T);
  p.reverse = a.reverse;
  fill_lengths(*a.step_rows, static_cast<int>(N), p.lengths);
  launch_cooperative(save_workspace ? Pass::ForwardTraining : Pass::Forward,
                     forward_kernel<scalar_t>(save_workspace, plan.product, plan.exchange, project), p, plan, order);

  // h_n: every row's last h (finished rows were carried forward) is in half T % 2.
  a.h_state.copy_(h_exchange[T % 2].narrow(1, 0, HO));
}

// The forward plan for `a`, after checking everything about `a` the plan does not cover.
std::optional<Plan> plan_for(const RecurrenceForwardArgs& a, std::string* why_not) {
  if (!gpu::on_device(a.gates)) {
    set_reason(why_not, "tensors not on a CUDA device");
    return std::nullopt;
  }
  const bool project = a.w_hr.defined();
  const int64_t N = a.h_state.size(0), H = a.c_state.size(1), R = a.gates.size(0);
  const int64_t HO = project ? a.w_hr.size(0) : H;  // Hout: the columns of h and the output
  const int64_t T = a.step_rows == nullptr ? 0 : static_cast<int64_t>(a.step_rows->size());
  if (T < 1 || T > INT_MAX || (*a.step_rows)[0] != N) {
    set_reason(why_not, "unexpected steps / batch sizes");
    return std::nullopt;
  }
  // The layouts the driver produces; anything else goes to the standard path.
  const bool layouts_ok = a.gates.dim() == 2 && a.gates.size(1) == 4 * H && a.gates.is_contiguous() &&
                          a.w_hh.dim() == 2 && a.w_hh.size(0) == 4 * H && a.w_hh.size(1) == HO &&
                          (!project || (a.w_hr.dim() == 2 && a.w_hr.size(1) == H)) &&
                          a.h_state.dim() == 2 && a.h_state.size(1) == HO && a.h_state.is_contiguous() &&
                          a.c_state.dim() == 2 && a.c_state.size(0) == N && a.c_state.is_contiguous() &&
                          a.output.dim() == 2 && a.output.size(0) == R && a.output.size(1) == HO &&
                          (a.output.stride(1) == 1 || HO == 1) &&
                          (!a.c_prev_saved.defined() || (a.c_prev_saved.is_contiguous() &&
                                                         a.c_prev_saved.numel() == R * H)) &&
                          (!a.h_prev_saved.defined() || (a.h_prev_saved.is_contiguous() &&
                                                         a.h_prev_saved.numel() == R * HO)) &&
                          a.c_prev_saved.defined() == a.h_prev_saved.defined();
  if (!layouts_ok) {
    set_reason(why_not, "unexpected tensor layouts");
    return std::nullopt;
  }
  const at::ScalarType dtype = a.gates.scalar_type();
  for (const Tensor* t : {&a.w_hh, &a.h_state, &a.c_state, &a.output}) {
    if (t->scalar_type() != dtype || t->device() != a.gates.device()) {
      set_reason(why_not, "tensors of mixed dtypes or devices");
      return std::nullopt;
    }
  }
  if (project && (a.w_hr.scalar_type() != dtype || a.w_hr.device() != a.gates.device())) {
    set_reason(why_not, "tensors of mixed dtypes or devices");
    return std::nullopt;
  }
  return make_plan(a.c_prev_saved.defined() ? Pass::ForwardTraining : Pass::Forward, dtype, N, H, project ? HO : 0,
                   a.gates.device().index(), why_not);
}

template <typename scalar_t>
void launch_backward(const RecurrenceBackwardArgs& a, const Plan& plan, CooperativeOrder& order) {
  const bool project = a.w_hr.defined();
  const int64_t N = a.dh_state.size(0), H = a.dc_state.size(1), HO = a.dh_state.size(1);
  BackwardParams<scalar_t> p;
  p.gates = a.gates.data_ptr<scalar_t>();
  p.c_prev = a.c_prev.data_ptr<scalar_t>();
  p.d_output = a.d_output.data_ptr<scalar_t>();
  p.d_output_stride = a.d_output.stride(0);
  p.w_hh = a.w_hh.data_ptr<scalar_t>();
  p.w_stride_row = a.w_hh.stride(0);
  p.w_stride_col = a.w_hh.stride(1);
  p.dh_state = a.dh_state.data_ptr<scalar_t>();
  p.dc_state = a.dc_state.data_ptr<scalar_t>();
  p.d_gates = a.d_gates.data_ptr<scalar_t>();
  p.w_hr = project ? a.w_hr.data_ptr<scalar_t>() : nullptr;
  p.wr_stride_row = project ? a.w_hr.stride(0) : 0;
  p.wr_stride_col = project ? a.w_hr.stride(1) : 0;
  p.dh_total = project ? a.dh_total.data_ptr<scalar_t>() : nullptr;
  p.h_next = project ? a.h_next.data_ptr<scalar_t>() : nullptr;
  p.total_rows = a.gates.size(0);
  p.hidden = static_cast<int>(H);
  p.out_hidden = static_cast<int>(HO);
  p.padded_gates = plan.padded_k;
  p.padded_out = plan.padded_proj_k;
  p.batch = static_cast<int>(N);
  p.padded_batch = plan.padded_batch;
  p.units_per_block = plan.units_per_block;
  p.outs_per_block = plan.outs_per_block;
  p.k_split = plan.k_split;
  p.proj_k_split = plan.proj_k_split;
  p.steps = static_cast<int>(a.step_rows->size());
  p.reverse = a.reverse;
  p.need_h0_grad = a.need_h0_grad;
  fill_lengths(*a.step_rows, static_cast<int>(N), p.lengths);
  launch_cooperative(Pass::Backward, backward_kernel<scalar_t>(plan.product, plan.exchange, project), p, plan, order);
}

// The backward plan for `a`, after checking everything about `a` the plan does not cover.
std::optional<Plan> plan_for(const RecurrenceBackwardArgs& a, std::string* why_not) {
  if (!gpu::on_device(a.gates)) {
    set_reason(why_not, "tensors not on a CUDA device");
    return std::nullopt;
  }
  const bool project = a.w_hr.defined();
  const int64_t N = a.dh_state.size(0), H = a.dc_state.size(1), R = a.gates.size(0);
  const int64_t HO = project ? a.w_hr.size(0) : H;  // Hout: the columns of dh and grad_output
  const int64_t T = a.step_rows == nullptr ? 0 : static_cast<int64_t>(a.step_rows->size());
  if (T < 1 || T > INT_MAX || (*a.step_rows)[0] != N) {
    set_reason(why_not, "unexpected steps / batch sizes");
    return std::nullopt;
  }
  // The layouts the driver produces.
  const bool layouts_ok = a.gates.dim() == 2 && a.gates.size(1) == 4 * H && a.gates.is_contiguous() &&
                          a.c_prev.dim() == 2 && a.c_prev.size(0) == R && a.c_prev.size(1) == H &&
                          a.c_prev.is_contiguous() && a.d_output.dim() == 2 && a.d_output.size(0) == R &&
                          a.d_output.size(1) == HO && (a.d_output.stride(1) == 1 || HO == 1) &&
                          a.w_hh.dim() == 2 && a.w_hh.size(0) == 4 * H && a.w_hh.size(1) == HO &&
                          a.dh_state.dim() == 2 && a.dh_state.size(1) == HO && a.dh_state.is_contiguous() &&
                          a.dc_state.dim() == 2 && a.dc_state.size(0) == N && a.dc_state.is_contiguous() &&
                          a.d_gates.dim() == 2 && a.d_gates.size(0) == R && a.d_gates.size(1) == 4 * H &&
                          a.d_gates.is_contiguous() &&
                          (!project || (a.w_hr.dim() == 2 && a.w_hr.size(1) == H && a.dh_total.defined() &&
                                        a.dh_total.dim() == 2 && a.dh_total.size(0) == R &&
                                        a.dh_total.size(1) == HO && a.dh_total.is_contiguous() &&
                                        a.h_next.defined() && a.h_next.dim() == 2 && a.h_next.size(0) == R &&
                                        a.h_next.size(1) == H && a.h_next.is_contiguous()));
  if (!layouts_ok) {
    set_reason(why_not, "unexpected tensor layouts");
    return std::nullopt;
  }
  const at::ScalarType dtype = a.gates.scalar_type();
  for (const Tensor* t : {&a.c_prev, &a.d_output, &a.w_hh, &a.dh_state, &a.dc_state, &a.d_gates}) {
    if (t->scalar_type() != dtype || t->device() != a.gates.device()) {
      set_reason(why_not, "tensors of mixed dtypes or devices");
      return std::nullopt;
    }
  }
  for (const Tensor* t : {&a.w_hr, &a.dh_total, &a.h_next}) {
    if (project && (t->scalar_type() != dtype || t->device() != a.gates.device())) {
      set_reason(why_not, "tensors of mixed dtypes or devices");
      return std::nullopt;
    }
  }
  return make_plan(Pass::Backward, dtype, N, H, project ? HO : 0, a.gates.device().index(), why_not);
}

// Predicted microseconds of one step of `plan` (cost_model.h); proj: Hout, or 0 without a projection.
double predicted_step_us(Pass pass, const Plan& plan, int64_t batch, int64_t hidden, int64_t proj, int element_size) {
  // Fma stages whole 4-row tiles of h (or the backward's d_gates); Mma reads its 16-row padding from shared
  // memory but stages only the real rows.
  const double n4 = static_cast<double>(round_up(static_cast<int>(batch), kRowsPerTile));
  const double staged = n4 * plan.padded_k * element_size;
  const bool backward = pass == Pass::Backward;
  // The recurrent product's reduction: forward Hout (W_hh's columns), backward 4H over the block's V dh columns
  // (persistent_step_us counts 4 x units x k, so k = H there).
  const int64_t k = backward || proj == 0 ? hidden : proj;
  const int64_t units = backward ? plan.outs_per_block : plan.units_per_block;
  double step;
  if (plan.exchange == Exchange::Cluster) {
    step = persistent_cost::persistent_cluster_step_us(units, k, batch);
  } else if (plan.product == Product::Mma) {
    const int64_t rows = backward ? backward_weight_rows(plan.outs_per_block, Product::Mma) : 4 * units;
    step = persistent_cost::persistent_mma_step_us(rows, plan.padded_k, plan.padded_batch, staged, element_size == 4);
  } else {
    step = persistent_cost::persistent_step_us(units, k, batch, staged);
  }
  if (proj > 0) {
    // Forward: V columns x H; backward: U units x Hout; staging h' [N, H] or dh_total [N, Hout].
    const double fmas = static_cast<double>(backward ? plan.units_per_block : plan.outs_per_block) *
                        static_cast<double>(backward ? proj : hidden) * static_cast<double>(batch);
    // A cluster exchanges h' (backward: dh_total) through distributed shared memory (nothing staged) and meets at
    // cluster.sync.
    const bool cluster = plan.exchange == Exchange::Cluster;
    step += persistent_cost::persistent_projection_us(fmas, cluster ? 0.0 : n4 * plan.padded_proj_k * element_size,
                                                      cluster);
  }
  return step;
}

// Predicted microseconds of a whole direction of `steps` steps: {persistent, standard} (cost_model.h).
std::pair<double, double> predicted_us(Pass pass, const Plan& plan, int64_t batch, int64_t hidden, int64_t proj,
                                       int64_t steps, int element_size) {
  const double step = predicted_step_us(pass, plan, batch, hidden, proj, element_size);
  return {persistent_cost::persistent_total_us(step, steps, hidden, element_size, proj),
          static_cast<double>(steps) * persistent_cost::standard_step_us(hidden, batch, element_size, proj)};
}

// The Auto decision, shared by both passes: a plan exists and the cost model predicts the persistent kernel
// faster. A PREDICTION until the model is fitted to a GPU run (see cost_model.h).
template <typename Args>
bool preferred(Pass pass, const Args& a, int64_t batch, int64_t hidden) {
  const std::optional<Plan> plan = plan_for(a, nullptr);
  if (!plan) return false;
  const int64_t steps = static_cast<int64_t>(a.step_rows->size());
  const int64_t proj = a.w_hr.defined() ? a.w_hr.size(0) : 0;
  const auto [persistent, standard] =
      predicted_us(pass, *plan, batch, hidden, proj, steps, static_cast<int>(a.gates.element_size()));
  return persistent < standard;
}

// Runs `pass` by its mode: returns whether it ran; throws the reason when it must run and cannot.
template <typename Args, typename Run>
bool try_pass(Pass pass, const Args& a, bool required, int64_t batch, int64_t hidden, Run run) {
  switch (required ? PersistentMode::Always : persistent_mode()) {
    case PersistentMode::Never:
      return false;
    case PersistentMode::Always:
      break;
    case PersistentMode::Auto:
      if (!preferred(pass, a, batch, hidden)) return false;
      break;
  }
  run();  // throws with the reason when unsupported
  return true;
}

}  // namespace

PersistentMode persistent_mode() {
  const char* value = std::getenv("FUSED_LSTM_PERSISTENT");
  // Unset means Never until a GPU run has verified the kernel and measured where it wins.
  if (value == nullptr || std::strcmp(value, "") == 0 || std::strcmp(value, "0") == 0) {
    return PersistentMode::Never;
  }
  if (std::strcmp(value, "auto") == 0) return PersistentMode::Auto;
  if (std::strcmp(value, "1") == 0) return PersistentMode::Always;
  TORCH_CHECK(false, "fused_lstm: FUSED_LSTM_PERSISTENT must be 0, 1 or auto, got '", value, "'");
}

bool persistent_supported(const RecurrenceForwardArgs& a, std::string* why_not) {
  return plan_for(a, why_not).has_value();
}

bool persistent_preferred(const RecurrenceForwardArgs& a) {
  return preferred(a.c_prev_saved.defined() ? Pass::ForwardTraining : Pass::Forward, a, a.h_state.size(0),
                   a.c_state.size(1));
}

void persistent_recurrence_forward(const RecurrenceForwardArgs& a, CooperativeOrder& order) {
  std::string why_not;
  const std::optional<Plan> plan = plan_for(a, &why_not);
  TORCH_CHECK(plan.has_value(), "fused_lstm: the persistent CUDA kernel cannot run this layer: ", why_not,
              " (set FUSED_LSTM_PERSISTENT=auto or 0 to use the standard path)");
  const gpu::DeviceGuard guard(a.gates.device());
  const bool save_workspace = a.c_prev_saved.defined();
  FUSED_LSTM_DISPATCH_PERSISTENT_TYPES(a.gates.scalar_type(), "fused_lstm_persistent_forward", [&] {
    launch_forward<scalar_t>(a, *plan, save_workspace, order);
  });
}

bool persistent_try_forward(const RecurrenceForwardArgs& a, CooperativeOrder& order) {
  // recurrence='persistent' asks for it whatever the environment says.
  return try_pass(a.c_prev_saved.defined() ? Pass::ForwardTraining : Pass::Forward, a, a.required,
                  a.h_state.size(0), a.c_state.size(1), [&] { persistent_recurrence_forward(a, order); });
}

bool persistent_supported(const RecurrenceBackwardArgs& a, std::string* why_not) {
  return plan_for(a, why_not).has_value();
}

void persistent_recurrence_backward(const RecurrenceBackwardArgs& a, CooperativeOrder& order) {
  std::string why_not;
  const std::optional<Plan> plan = plan_for(a, &why_not);
  TORCH_CHECK(plan.has_value(), "fused_lstm: the persistent CUDA backward kernel cannot run this layer: ", why_not,
              " (set FUSED_LSTM_PERSISTENT=auto or 0 to use the standard path)");
  const gpu::DeviceGuard guard(a.gates.device());
  FUSED_LSTM_DISPATCH_PERSISTENT_TYPES(a.gates.scalar_type(), "fused_lstm_persistent_backward", [&] {
    launch_backward<scalar_t>(a, *plan, order);
  });
}

bool persistent_try_backward(const RecurrenceBackwardArgs& a, bool required, CooperativeOrder& order) {
  return try_pass(Pass::Backward, a, required, a.dh_state.size(0), a.dc_state.size(1),
                  [&] { persistent_recurrence_backward(a, order); });
}

int64_t persistent_max_hidden(at::ScalarType dtype, int64_t batch, c10::DeviceIndex device, bool backward) {
  // Support is monotone in H (more units need more shared memory per block or more blocks), so bisect on
  // "a plan exists", from H = 1 up to the first power of two without one.
  const auto fits = [&](int64_t hidden) {
    return make_plan(backward ? Pass::Backward : Pass::ForwardTraining, dtype, batch, hidden, 0, device, nullptr)
        .has_value();
  };
  if (!fits(1)) return 0;
  int64_t good = 1, bad = 2;
  while (fits(bad)) {
    good = bad;
    bad *= 2;
  }
  while (bad - good > 1) {
    const int64_t mid = good + (bad - good) / 2;
    (fits(mid) ? good : bad) = mid;
  }
  return good;
}

int64_t persistent_launches() { return launch_count.load(std::memory_order_relaxed); }

// Introspection ops for tests and benchmarks (no autograd, no fake kernel: eager calls only).
TORCH_LIBRARY_FRAGMENT(FUSED_LSTM_GPU_OPS, m) {
  m.def("persistent_max_hidden(Tensor sample, int batch, bool backward=False) -> int",
        [](const at::Tensor& sample, int64_t batch, bool backward) {
          TORCH_CHECK(gpu::on_device(sample), "fused_lstm.persistent_max_hidden: sample must be a CUDA tensor");
          return persistent_max_hidden(sample.scalar_type(), batch, sample.device().index(), backward);
        });
  m.def("persistent_launches() -> int", []() { return persistent_launches(); });
  // The launch plan of the forward (training workspace kept) or backward kernel for `batch` rows of `hidden`
  // units (projected to proj_size columns, 0: none): [units_per_block, blocks, k_split, shared_bytes,
  // tensor_cores (0 Fma, 1 Mma), cluster (0, 1), outs_per_block (V, projection columns per block; U without a
  // projection), proj_k_split (0 without a projection)]; raises the reason when there is none.
  m.def("persistent_plan(Tensor sample, int batch, int hidden, bool backward=False, int proj_size=0) -> int[]",
        [](const at::Tensor& sample, int64_t batch, int64_t hidden, bool backward, int64_t proj_size) {
          TORCH_CHECK(gpu::on_device(sample), "fused_lstm.persistent_plan: sample must be a CUDA tensor");
          std::string why_not;
          const std::optional<Plan> plan = make_plan(backward ? Pass::Backward : Pass::ForwardTraining,
                                                     sample.scalar_type(), batch, hidden, proj_size,
                                                     sample.device().index(), &why_not);
          TORCH_CHECK(plan.has_value(), "fused_lstm: no persistent plan: ", why_not);
          return std::vector<int64_t>{plan->units_per_block, plan->blocks, plan->k_split,
                                      static_cast<int64_t>(plan->smem_bytes), plan->product == Product::Mma,
                                      plan->exchange == Exchange::Cluster, plan->outs_per_block, plan->proj_k_split};
        });
  // What the cost model (cost_model.h) predicts for a whole direction of `steps` steps, in microseconds:
  // [persistent, standard]; FUSED_LSTM_PERSISTENT=auto takes the persistent kernel when the first is smaller.
  m.def("persistent_predicted_us(Tensor sample, int batch, int hidden, int steps, bool backward=False, "
        "int proj_size=0) -> float[]",
        [](const at::Tensor& sample, int64_t batch, int64_t hidden, int64_t steps, bool backward, int64_t proj_size) {
          TORCH_CHECK(gpu::on_device(sample), "fused_lstm.persistent_predicted_us: sample must be a CUDA tensor");
          const Pass pass = backward ? Pass::Backward : Pass::ForwardTraining;
          std::string why_not;
          const std::optional<Plan> plan = make_plan(pass, sample.scalar_type(), batch, hidden, proj_size,
                                                     sample.device().index(), &why_not);
          TORCH_CHECK(plan.has_value(), "fused_lstm: no persistent plan: ", why_not);
          const auto [persistent, standard] = predicted_us(pass, *plan, batch, hidden, proj_size, steps,
                                                           static_cast<int>(sample.element_size()));
          return std::vector<double>{persistent, standard};
        });
}

}  // namespace fused_lstm
