// The CUDA emulator's scheduler: launches, barriers, warp collectives, device profiles and occupancy
// (see runtime.h and device.h for what each promises).
#include "runtime.h"

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "device.h"
#include "fiber.h"

namespace fused_lstm {
namespace emu {
namespace {

struct Thread;
struct Block;

// Threads waiting for one barrier to be released. A barrier releases when `expected` threads have arrived;
// the last to arrive goes on without yielding and makes the others runnable.
struct Barrier {
  const char* what = "";
  Site site{nullptr, 0};
  std::vector<Thread*> waiting;
};

// The barrier of a warp's collectives, with what its current participants agreed on.
struct WarpBarrier : Barrier {
  unsigned mask = 0;
  WarpOp op = WarpOp::Sync;
  int width = 0;
};

enum class State { Runnable, Waiting, Done };

struct Thread {
  FiberContext fiber;
  uint3 index;
  unsigned linear = 0;  // in its block
  Block* block = nullptr;
  State state = State::Runnable;
  Barrier* waiting_on = nullptr;
  unsigned waiting_expected = 0;
  // A warp collective's mailbox: the value and operand this lane brought, and its result.
  uint64_t value = 0;
  int operand = 0;
  uint64_t result = 0;
};

struct Block {
  uint3 index;
  Thread* threads = nullptr;
  unsigned thread_count = 0;
  unsigned exited = 0;
  unsigned char* shared = nullptr;
  unsigned cluster = 0;       // index of its cluster in the launch's cluster table
  unsigned cluster_rank = 0;  // its rank in that cluster
  Barrier sync;
  std::vector<WarpBarrier> warps;
};

struct Launch {
  const LaunchConfig* config = nullptr;
  const std::function<void()>* body = nullptr;
  FiberContext scheduler;
  Thread* current = nullptr;
  std::exception_ptr error;
  // The blocks running now (one block, one cluster, or the whole grid of a cooperative launch).
  std::vector<Block>* blocks = nullptr;
  Barrier grid;
  unsigned grid_threads = 0, grid_exited = 0;
  std::vector<Barrier> clusters;
  std::vector<std::vector<Block*>> cluster_blocks;  // [cluster][rank]
  size_t shared_bytes = 0;
};

thread_local Launch* active = nullptr;

Launch& current_launch() {
  TORCH_CHECK(active != nullptr && active->current != nullptr,
              "fused_lstm emulator: a CUDA builtin was used outside a kernel launch");
  return *active;
}
Thread& current_thread() { return *current_launch().current; }

std::string describe(const uint3& v) {
  std::ostringstream s;
  s << "(" << v.x << "," << v.y << "," << v.z << ")";
  return s.str();
}

std::string where(const Thread& t) {
  return "kernel '" + std::string(active->config->kernel_name) + "', block " + describe(t.block->index) +
         ", thread " + describe(t.index);
}

std::string site_text(Site s) { return std::string(s.file ? s.file : "?") + ":" + std::to_string(s.line); }

bool same_site(Site a, Site b) {
  return a.line == b.line && (a.file == b.file || (a.file && b.file && std::strcmp(a.file, b.file) == 0));
}

[[noreturn]] void fail(const std::string& message) { TORCH_CHECK(false, "fused_lstm emulator: ", message); }

void yield(Thread& me) {
  ++counters().switches;
  switch_fiber(&me.fiber, &active->scheduler);
}

// Arrives at `b`, which releases with `expected` threads; waits unless this thread completes it.
void arrive(Barrier& b, unsigned expected, const char* what, Site site) {
  Thread& me = current_thread();
  if (b.waiting.empty()) {
    b.what = what;
    b.site = site;
  } else if (!same_site(b.site, site)) {
    fail("divergent " + std::string(what) + " in " + where(me) + ": it waits at " + site_text(site) + " while " +
         std::to_string(b.waiting.size()) + " thread(s), first " + describe(b.waiting.front()->index) +
         " of block " + describe(b.waiting.front()->block->index) + ", wait at " + site_text(b.site));
  }
  if (b.waiting.size() + 1 == expected) {
    for (Thread* t : b.waiting) {
      t->state = State::Runnable;
      t->waiting_on = nullptr;
    }
    b.waiting.clear();
    return;
  }
  me.state = State::Waiting;
  me.waiting_on = &b;
  me.waiting_expected = expected;
  b.waiting.push_back(&me);
  yield(me);
}

std::unique_ptr<StackPool>& stack_pool() {
  thread_local std::unique_ptr<StackPool> pool;
  if (!pool) {
    const char* kb = std::getenv("FUSED_LSTM_EMU_STACK_KB");
    const size_t bytes = (kb != nullptr && std::atoi(kb) >= 16 ? std::atoi(kb) : 64) * size_t{1024};
    pool = std::make_unique<StackPool>(bytes);
  }
  return pool;
}

void thread_entry(void* arg) {
  Thread& me = *static_cast<Thread*>(arg);
  Launch& launch = *active;
  try {
    (*launch.body)();
    // Exiting while others wait for this thread at a barrier means that barrier can never be released.
    Block& block = *me.block;
    if (!block.sync.waiting.empty()) {
      fail("thread exits in " + where(me) + " while " + std::to_string(block.sync.waiting.size()) +
           " thread(s) of its block wait at " + std::string(block.sync.what) + " (" + site_text(block.sync.site) +
           "): a __syncthreads that not every thread reaches");
    }
    const WarpBarrier& warp = block.warps[me.linear / 32];
    if (!warp.waiting.empty() && ((warp.mask >> (me.linear % 32)) & 1u)) {
      fail("lane " + std::to_string(me.linear % 32) + " exits in " + where(me) + " while lanes of its warp wait for " +
           "it in a warp collective at " + site_text(warp.site));
    }
    if (!launch.grid.waiting.empty()) {
      fail("thread exits in " + where(me) + " while other threads wait at grid.sync() (" +
           site_text(launch.grid.site) + ")");
    }
  } catch (...) {
    if (!launch.error) launch.error = std::current_exception();
  }
  me.state = State::Done;
  ++me.block->exited;
  ++launch.grid_exited;
  yield(me);
  std::abort();  // a finished fiber is never resumed
}

unsigned seed_from_environment(bool* seeded) {
  const char* seed = std::getenv("FUSED_LSTM_EMU_SEED");
  *seeded = seed != nullptr && seed[0] != '\0';
  return *seeded ? static_cast<unsigned>(std::strtoul(seed, nullptr, 10)) : 0u;
}

// The order in which n things run: 0..n-1, or a permutation drawn from the seed and the launch number.
std::vector<unsigned> run_order(size_t n, std::mt19937* random) {
  std::vector<unsigned> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = static_cast<unsigned>(i);
  if (random != nullptr) std::shuffle(order.begin(), order.end(), *random);
  return order;
}

[[noreturn]] void report_deadlock(const std::vector<Block>& blocks) {
  std::ostringstream s;
  s << "kernel '" << active->config->kernel_name << "' can never finish: no thread can go on.";
  int shown = 0;
  for (const Block& block : blocks) {
    for (unsigned i = 0; i < block.thread_count && shown < 4; ++i) {
      const Thread& t = block.threads[i];
      if (t.state != State::Waiting) continue;
      s << " Block " << describe(block.index) << " thread " << describe(t.index) << " waits at "
        << t.waiting_on->what << " (" << site_text(t.waiting_on->site) << ") with "
        << t.waiting_on->waiting.size() << " of " << t.waiting_expected << " threads arrived";
      if (block.exited > 0) s << " and " << block.exited << " thread(s) of its block exited";
      s << ".";
      ++shown;
    }
  }
  fail(s.str());
}

// Runs the fibers of `blocks` until all are done: each block as far as it goes (in the given order), then the
// next, round after round, so a block that skips a barrier it needs races ahead of the others.
void run_blocks(Launch& launch, std::vector<Block>& blocks, const std::vector<unsigned>& order) {
  for (;;) {
    bool progressed = false, all_done = true;
    for (const unsigned b : order) {
      Block& block = blocks[b];
      for (bool again = true; again;) {
        again = false;
        for (unsigned i = 0; i < block.thread_count; ++i) {
          Thread& t = block.threads[i];
          if (t.state != State::Runnable) continue;
          launch.current = &t;
          ++counters().switches;
          switch_fiber(&launch.scheduler, &t.fiber);
          launch.current = nullptr;
          if (launch.error) std::rethrow_exception(launch.error);
          again = progressed = true;
        }
      }
      all_done = all_done && block.exited == block.thread_count;
    }
    if (all_done) return;
    if (!progressed) report_deadlock(blocks);
  }
}

unsigned volume(const dim3& d) { return d.x * d.y * d.z; }

uint3 unflatten(unsigned i, const dim3& d) {
  return uint3{i % d.x, (i / d.x) % d.y, i / (d.x * d.y)};
}

void validate(const LaunchConfig& c) {
  const DeviceProfile& p = device_profile();
  const std::string name = c.kernel_name;
  const dim3 &b = c.block, &g = c.grid, &cl = c.cluster;
  TORCH_CHECK(b.x > 0 && b.y > 0 && b.z > 0 && g.x > 0 && g.y > 0 && g.z > 0, "fused_lstm emulator: launch of '",
              name, "' with an empty grid or block (invalid configuration argument)");
  TORCH_CHECK(b.x <= 1024 && b.y <= 1024 && b.z <= 64 && volume(b) <= 1024, "fused_lstm emulator: launch of '", name,
              "' with ", volume(b), " threads per block (at most 1024; x, y <= 1024, z <= 64)");
  TORCH_CHECK(g.x <= 2147483647u && g.y <= 65535 && g.z <= 65535, "fused_lstm emulator: launch of '", name,
              "': grid dimensions beyond CUDA's limits");
  TORCH_CHECK(c.bounds.max_threads <= 0 || static_cast<int>(volume(b)) <= c.bounds.max_threads,
              "fused_lstm emulator: launch of '", name, "' with ", volume(b),
              " threads per block exceeds its __launch_bounds__ (", c.bounds.max_threads, ")");
  const size_t allowed = max_dynamic_shared(c.kernel);
  TORCH_CHECK(c.dynamic_shared_bytes <= allowed, "fused_lstm emulator: launch of '", name, "' asks for ",
              c.dynamic_shared_bytes, " bytes of dynamic shared memory; the kernel allows ", allowed,
              " (cudaFuncAttributeMaxDynamicSharedMemorySize; the default is 48 KiB)");
  const int per_sm = max_active_blocks_per_sm(c.bounds, static_cast<int>(volume(b)), c.dynamic_shared_bytes);
  TORCH_CHECK(per_sm > 0, "fused_lstm emulator: launch of '", name, "' needs more resources than one SM of ", p.name,
              " has (too many resources requested for launch)");
  if (c.cooperative) {
    const int64_t resident = static_cast<int64_t>(per_sm) * p.multiprocessors;
    TORCH_CHECK(static_cast<int64_t>(volume(g)) <= resident, "fused_lstm emulator: cooperative launch of '", name,
                "' with ", volume(g), " blocks; ", p.name, " holds at most ", resident, " of them at once (", per_sm,
                " per SM x ", p.multiprocessors, " SMs): cudaErrorCooperativeLaunchTooLarge");
  }
  if (volume(cl) > 1) {
    TORCH_CHECK(p.max_cluster_blocks > 0, "fused_lstm emulator: launch of '", name, "' with thread-block clusters on ",
                p.name, " (compute capability ", p.major, ".", p.minor, "): clusters need sm_90 or newer");
    const int allowed_cluster = cluster_limit(c.kernel);
    TORCH_CHECK(static_cast<int>(volume(cl)) <= allowed_cluster, "fused_lstm emulator: launch of '", name,
                "' with clusters of ", volume(cl), " blocks (at most ", allowed_cluster,
                allowed_cluster < p.max_nonportable_cluster_blocks
                    ? " without cudaFuncAttributeNonPortableClusterSizeAllowed)" : ")");
    TORCH_CHECK(g.x % cl.x == 0 && g.y % cl.y == 0 && g.z % cl.z == 0, "fused_lstm emulator: launch of '", name,
                "': the grid is not a whole number of clusters");
  }
}

}  // namespace

// --- Builtins.
const uint3& thread_index() { return current_thread().index; }
const uint3& block_index() { return current_thread().block->index; }
const dim3& block_dim() { return current_launch().config->block; }
const dim3& grid_dim() { return current_launch().config->grid; }
void* dynamic_shared_memory() { return current_thread().block->shared; }

void sync_block(Site site) {
  Thread& me = current_thread();
  Block& block = *me.block;
  if (block.exited > 0) {
    fail(std::string("__syncthreads in ") + where(me) + " (" + site_text(site) + ") after " +
         std::to_string(block.exited) + " thread(s) of its block exited: it can never be released");
  }
  arrive(block.sync, block.thread_count, "__syncthreads", site);
}

void sync_grid(Site site) {
  Launch& launch = current_launch();
  Thread& me = current_thread();
  if (!launch.config->cooperative) {
    fail("grid.sync() in " + where(me) + " (" + site_text(site) +
         "): the kernel was not launched cooperatively (cudaLaunchCooperativeKernel)");
  }
  if (launch.grid_exited > 0) {
    fail("grid.sync() in " + where(me) + " (" + site_text(site) + ") after " + std::to_string(launch.grid_exited) +
         " thread(s) of the grid exited: it can never be released");
  }
  arrive(launch.grid, launch.grid_threads, "grid.sync()", site);
}

void sync_cluster(Site site) {
  Launch& launch = current_launch();
  Thread& me = current_thread();
  const std::vector<Block*>& members = launch.cluster_blocks[me.block->cluster];
  unsigned threads = 0;
  for (const Block* b : members) {
    threads += b->thread_count;
    if (b->exited > 0) {
      fail("cluster.sync() in " + where(me) + " (" + site_text(site) + ") after threads of block " +
           describe(b->index) + " of its cluster exited: it can never be released");
    }
  }
  arrive(launch.clusters[me.block->cluster], threads, "cluster.sync()", site);
}

unsigned cluster_block_rank() { return current_thread().block->cluster_rank; }
unsigned cluster_num_blocks() { return volume(current_launch().config->cluster); }
dim3 cluster_dim() { return current_launch().config->cluster; }

void* map_shared_rank(const void* address, unsigned rank) {
  Launch& launch = current_launch();
  Thread& me = current_thread();
  const std::vector<Block*>& members = launch.cluster_blocks[me.block->cluster];
  TORCH_CHECK(rank < members.size(), "fused_lstm emulator: map_shared_rank(", rank, ") in ", where(me),
              ": the cluster has ", members.size(), " blocks");
  const auto* p = static_cast<const unsigned char*>(address);
  const unsigned char* own = me.block->shared;
  TORCH_CHECK(p >= own && p <= own + launch.shared_bytes, "fused_lstm emulator: map_shared_rank in ", where(me),
              " on an address outside the block's shared memory");
  return members[rank]->shared + (p - own);
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int operand, int width, Site site) {
  Thread& me = current_thread();
  Block& block = *me.block;
  const unsigned lane = me.linear % 32, warp = me.linear / 32;
  const unsigned warp_threads = std::min(32u, block.thread_count - warp * 32);
  // Messages are built only on failure: this runs for every lane of every shuffle.
  const auto here = [&] { return where(me) + " (" + site_text(site) + ")"; };
  if (((mask >> lane) & 1u) == 0) fail("a warp collective in " + here() + " with a mask that leaves out its own lane");
  if (warp_threads < 32 && (mask >> warp_threads) != 0) {
    fail("a warp collective in " + here() + " names lanes past the " + std::to_string(warp_threads) +
         " threads its warp has");
  }
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fail("a shuffle in " + here() + " with width " + std::to_string(width) + " (a power of two up to 32)");
  }
  for (unsigned l = 0; l < warp_threads; ++l) {
    if (((mask >> l) & 1u) && block.threads[warp * 32 + l].state == State::Done) {
      fail("a warp collective in " + here() + " waits for lane " + std::to_string(l) + ", which has exited");
    }
  }
  WarpBarrier& barrier = block.warps[warp];
  if (barrier.waiting.empty()) {
    barrier.mask = mask;
    barrier.op = op;
    barrier.width = width;
  } else if (barrier.mask != mask || barrier.op != op || barrier.width != width) {
    std::ostringstream s;
    s << "lanes of a warp disagree in " << here() << ": mask 0x" << std::hex << mask << " against 0x" << barrier.mask
      << std::dec << (barrier.op != op ? ", and a different operation" : "")
      << (barrier.width != width ? ", and a different width" : "");
    fail(s.str());
  }
  me.value = value;
  me.operand = operand;
  const unsigned participants = static_cast<unsigned>(__builtin_popcount(mask));
  if (barrier.waiting.size() + 1 == participants) {
    // The last lane computes every participant's result before anyone goes on.
    Thread* lanes = block.threads + warp * 32;
    unsigned votes = 0;
    for (unsigned l = 0; l < warp_threads; ++l) {
      if (((mask >> l) & 1u) && lanes[l].value != 0) votes |= 1u << l;
    }
    for (unsigned l = 0; l < warp_threads; ++l) {
      if (((mask >> l) & 1u) == 0) continue;
      Thread& t = lanes[l];
      const unsigned segment = l & ~static_cast<unsigned>(width - 1), position = l - segment;
      unsigned source = l;
      switch (op) {
        case WarpOp::ShuffleIndex:
          source = segment + (static_cast<unsigned>(t.operand) & static_cast<unsigned>(width - 1));
          break;
        case WarpOp::ShuffleXor:
          source = l ^ static_cast<unsigned>(t.operand);
          if ((source & ~static_cast<unsigned>(width - 1)) > segment || source >= 32) source = l;
          break;
        case WarpOp::ShuffleDown:
          source = position + t.operand < static_cast<unsigned>(width) ? l + t.operand : l;
          break;
        case WarpOp::ShuffleUp:
          source = position >= static_cast<unsigned>(t.operand) ? l - t.operand : l;
          break;
        case WarpOp::Ballot:
          t.result = votes;
          continue;
        case WarpOp::Sync:
          t.result = 0;
          continue;
      }
      if (((mask >> source) & 1u) == 0 || source >= warp_threads) {
        fail("a shuffle in " + where(t) + " (" + site_text(site) + ") reads lane " + std::to_string(source) +
             ", which is not in the mask (undefined on a GPU)");
      }
      t.result = lanes[source].value;
    }
  }
  arrive(barrier, participants, "a warp collective", site);
  return me.result;
}

void launch(const LaunchConfig& config, const std::function<void()>& body) {
  TORCH_CHECK(active == nullptr, "fused_lstm emulator: a kernel launch from inside a kernel ('", config.kernel_name,
              "'): dynamic parallelism is not emulated");
  validate(config);
  Counters& count = counters();
  ++count.launches;
  if (config.cooperative) ++count.cooperative_launches;

  bool seeded = false;
  const unsigned seed = seed_from_environment(&seeded);
  std::mt19937 random(seed ^ static_cast<unsigned>(count.launches * 2654435761u));
  std::mt19937* shuffle = seeded ? &random : nullptr;

  const unsigned grid_blocks = volume(config.grid), threads_per_block = volume(config.block);
  const unsigned cluster_blocks = volume(config.cluster);
  // Blocks that must be resident together run as one group: the whole grid of a cooperative launch, a
  // cluster, or else a single block.
  const unsigned group_blocks = config.cooperative ? grid_blocks : cluster_blocks;
  const size_t shared_stride = (config.dynamic_shared_bytes + 127) / 128 * 128;

  Launch launch;
  launch.config = &config;
  launch.body = &body;
  launch.shared_bytes = config.dynamic_shared_bytes;
  active = &launch;
  struct Deactivate {
    ~Deactivate() { active = nullptr; }
  } deactivate;

  // Block linear index -> cluster and rank: clusters tile the grid in cluster-shaped boxes.
  const dim3 &cl = config.cluster, &g = config.grid;
  const auto cluster_of = [&](const uint3& b, unsigned* rank) {
    *rank = (b.x % cl.x) + cl.x * ((b.y % cl.y) + cl.y * (b.z % cl.z));
    return (b.x / cl.x) + (g.x / cl.x) * ((b.y / cl.y) + (g.y / cl.y) * (b.z / cl.z));
  };
  // Group k holds the blocks whose (cooperative: any) cluster index is in its range: order the grid's blocks
  // by cluster so that each group is a contiguous run of whole clusters.
  std::vector<unsigned> by_cluster(grid_blocks);
  for (unsigned i = 0; i < grid_blocks; ++i) by_cluster[i] = i;
  std::stable_sort(by_cluster.begin(), by_cluster.end(), [&](unsigned a, unsigned b) {
    unsigned ra, rb;
    const unsigned ca = cluster_of(unflatten(a, g), &ra), cb = cluster_of(unflatten(b, g), &rb);
    return ca != cb ? ca < cb : ra < rb;
  });

  const std::vector<unsigned> groups = run_order(grid_blocks / group_blocks, shuffle);
  std::unique_ptr<StackPool>& pool = stack_pool();
  for (const unsigned group : groups) {
    std::vector<Block> blocks(group_blocks);
    std::vector<Thread> threads(static_cast<size_t>(group_blocks) * threads_per_block);
    std::unique_ptr<unsigned char[]> shared(new unsigned char[shared_stride * group_blocks + 128]);
    unsigned char* shared_base = reinterpret_cast<unsigned char*>(
        (reinterpret_cast<uintptr_t>(shared.get()) + 127) / 128 * 128);
    std::memset(shared_base, 0xFF, shared_stride * group_blocks);
    launch.blocks = &blocks;
    launch.grid = Barrier();
    launch.grid_threads = group_blocks * threads_per_block;
    launch.grid_exited = 0;
    const unsigned group_clusters = group_blocks / cluster_blocks;
    launch.clusters.assign(group_clusters, Barrier());
    launch.cluster_blocks.assign(group_clusters, std::vector<Block*>(cluster_blocks, nullptr));
    unsigned first_cluster = 0;
    for (unsigned i = 0; i < group_blocks; ++i) {
      Block& block = blocks[i];
      block.index = unflatten(by_cluster[group * group_blocks + i], g);
      const unsigned cluster = cluster_of(block.index, &block.cluster_rank);
      if (i == 0) first_cluster = cluster;
      block.cluster = cluster - first_cluster;
      launch.cluster_blocks[block.cluster][block.cluster_rank] = &block;
      block.threads = threads.data() + static_cast<size_t>(i) * threads_per_block;
      block.thread_count = threads_per_block;
      block.shared = shared_base + shared_stride * i;
      block.warps.resize((threads_per_block + 31) / 32);
      for (unsigned t = 0; t < threads_per_block; ++t) {
        Thread& thread = block.threads[t];
        thread.index = unflatten(t, config.block);
        thread.linear = t;
        thread.block = &block;
        make_fiber(&thread.fiber, pool->stack(static_cast<size_t>(i) * threads_per_block + t), pool->stack_bytes(),
                   &thread_entry, &thread);
      }
    }
    count.blocks += group_blocks;
    count.threads += static_cast<int64_t>(group_blocks) * threads_per_block;
    run_blocks(launch, blocks, run_order(group_blocks, shuffle));
  }
}

// --- Device profiles and occupancy.
const std::vector<DeviceProfile>& device_profiles() {
  // name, capability, SMs, threads/SM, blocks/SM, registers/SM, shared/SM, shared/block opt-in, reserved,
  // cluster blocks (portable, non-portable). Published limits (CUDA C++ Programming Guide, compute capability tables; SM counts of
  // each card).
  static const std::vector<DeviceProfile> profiles = {
      {"h100", 9, 0, 132, 2048, 32, 65536, 233472, 232448, 1024, 8, 16},
      {"h200", 9, 0, 132, 2048, 32, 65536, 233472, 232448, 1024, 8, 16},
      {"a100", 8, 0, 108, 2048, 32, 65536, 167936, 166912, 1024, 0, 0},
      {"rtx3090", 8, 6, 82, 1536, 16, 65536, 102400, 101376, 1024, 0, 0},
      {"l4", 8, 9, 58, 1536, 24, 65536, 102400, 101376, 1024, 0, 0},
  };
  return profiles;
}

namespace {
const DeviceProfile*& selected_profile() {
  static const DeviceProfile* profile = &device_profiles().front();
  return profile;
}
std::vector<std::pair<const void*, size_t>>& shared_attributes() {
  static std::vector<std::pair<const void*, size_t>> attributes;
  return attributes;
}
}  // namespace

const DeviceProfile& device_profile() { return *selected_profile(); }

void set_device_profile(const std::string& name) {
  std::string known;
  for (const DeviceProfile& p : device_profiles()) {
    if (p.name == name) {
      selected_profile() = &p;
      return;
    }
    known += (known.empty() ? "" : ", ") + p.name;
  }
  TORCH_CHECK(false, "fused_lstm emulator: unknown device profile '", name, "' (known: ", known, ")");
}

void set_max_dynamic_shared(const void* kernel, const char* kernel_name, size_t bytes) {
  const DeviceProfile& p = device_profile();
  TORCH_CHECK(bytes <= p.shared_bytes_per_block_optin, "fused_lstm emulator: cudaFuncSetAttribute(", kernel_name,
              ", MaxDynamicSharedMemorySize, ", bytes, ") exceeds ", p.name, "'s ", p.shared_bytes_per_block_optin,
              " bytes per block");
  for (auto& entry : shared_attributes()) {
    if (entry.first == kernel) {
      entry.second = bytes;
      return;
    }
  }
  shared_attributes().emplace_back(kernel, bytes);
}

size_t max_dynamic_shared(const void* kernel) {
  size_t bytes = kDefaultDynamicSharedBytes;
  for (const auto& entry : shared_attributes()) {
    if (entry.first == kernel) bytes = entry.second;
  }
  // A profile switch may lower the opt-in limit below an attribute set under another profile.
  return std::min(bytes, device_profile().shared_bytes_per_block_optin);
}

namespace {
std::vector<const void*>& nonportable_cluster_kernels() {
  static std::vector<const void*> kernels;
  return kernels;
}
}  // namespace

void allow_nonportable_clusters(const void* kernel) {
  for (const void* k : nonportable_cluster_kernels()) {
    if (k == kernel) return;
  }
  nonportable_cluster_kernels().push_back(kernel);
}

int cluster_limit(const void* kernel) {
  const DeviceProfile& p = device_profile();
  for (const void* k : nonportable_cluster_kernels()) {
    if (k == kernel) return p.max_nonportable_cluster_blocks;
  }
  return p.max_cluster_blocks;
}

int max_potential_cluster_size(const void* kernel, LaunchBounds bounds, int threads_per_block,
                               size_t dynamic_shared_bytes) {
  if (max_active_blocks_per_sm(bounds, threads_per_block, dynamic_shared_bytes) < 1) return 0;
  return cluster_limit(kernel);
}

int max_active_blocks_per_sm(LaunchBounds bounds, int threads_per_block, size_t dynamic_shared_bytes) {
  const DeviceProfile& p = device_profile();
  if (threads_per_block <= 0) return 0;
  const int warps = (threads_per_block + 31) / 32;
  const int by_warps = p.max_threads_per_sm / 32 / warps;
  // The registers the compiler may use under the launch bounds (255 at most per thread), allocated per warp
  // in units of 256.
  const int bound_threads = bounds.max_threads > 0 ? (bounds.max_threads + 31) / 32 * 32 : 1024;
  const int registers = std::min(255, p.registers_per_sm / (bound_threads * std::max(1, bounds.min_blocks_per_sm)));
  const int per_warp = (registers * 32 + 255) / 256 * 256;
  const int by_registers = p.registers_per_sm / per_warp / warps;
  const size_t per_block = dynamic_shared_bytes + p.shared_bytes_reserved_per_block;
  const int by_shared = static_cast<int>(p.shared_bytes_per_sm / per_block);
  return std::max(0, std::min({by_warps, by_registers, by_shared, p.max_blocks_per_sm}));
}

Counters& counters() {
  static Counters c;
  return c;
}

}  // namespace emu
}  // namespace fused_lstm
