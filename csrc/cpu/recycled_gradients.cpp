// See recycled_gradients.h.
#include "recycled_gradients.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/graph_task.h>

#include <algorithm>
#include <memory>
#include <mutex>

#include <pthread.h>
#include <utility>
#include <vector>

#include "cpu_limits.h"

namespace fused_lstm {
namespace {

// A block from torch's CPU allocator (so its alignment and memory reporting are torch's), and its size.
struct Block {
  c10::DataPtr storage;
  size_t bytes;
};

// The blocks kept for reuse and the backward passes they are kept for; one mutex guards both (backward passes
// on several threads share them).
struct Recycler {
  std::mutex mutex;
  std::vector<Block*> kept;
  std::vector<int> active_passes;  // autograd graph task ids

  // A kept block of exactly `bytes`, or nullptr.
  Block* take(size_t bytes) {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto it = std::find_if(kept.begin(), kept.end(), [&](const Block* b) { return b->bytes == bytes; });
    if (it == kept.end()) return nullptr;
    Block* block = *it;
    kept.erase(it);
    return block;
  }
  void give_back(Block* block) {
    {
      const std::lock_guard<std::mutex> lock(mutex);
      if (!active_passes.empty() && static_cast<int64_t>(kept.size()) < cpu_limits::kMaxKeptGradientBlocks) {
        kept.push_back(block);
        return;
      }
    }
    delete block;
  }
  // Registers the pass; returns false if it was registered already.
  bool begin_pass(int pass) {
    const std::lock_guard<std::mutex> lock(mutex);
    if (std::find(active_passes.begin(), active_passes.end(), pass) != active_passes.end()) return false;
    active_passes.push_back(pass);
    return true;
  }
  void end_pass(int pass) {
    std::vector<Block*> freed;
    {
      const std::lock_guard<std::mutex> lock(mutex);
      active_passes.erase(std::remove(active_passes.begin(), active_passes.end(), pass), active_passes.end());
      if (active_passes.empty()) freed.swap(kept);
    }
    for (Block* block : freed) delete block;
  }
};

// Never destroyed: tensors may be freed during interpreter exit. A forked child starts a fresh one: the parent's
// mutex may have been held by another thread at the fork, and the child runs none of the parent's passes.
Recycler*& recycler_instance() {
  static Recycler* instance = [] {
    pthread_atfork(nullptr, nullptr, [] { recycler_instance() = new Recycler(); });
    return new Recycler();
  }();
  return instance;
}
Recycler& recycler() { return *recycler_instance(); }

void give_back(void* block) { recycler().give_back(static_cast<Block*>(block)); }

class RecyclingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    Block* block = recycler().take(bytes);
    if (block == nullptr) block = new Block{c10::GetCPUAllocator()->allocate(bytes), bytes};
    return {block->storage.get(), block, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }
};

// Ends its pass when the pass runs its final callbacks, or, if the pass fails before them, when the engine
// destroys the pass and with it the callback that holds this.
class PassEnd {
 public:
  explicit PassEnd(int pass) : pass_(pass) {}
  PassEnd(const PassEnd&) = delete;
  PassEnd& operator=(const PassEnd&) = delete;
  ~PassEnd() { run(); }
  void run() {
    if (std::exchange(pending_, false)) recycler().end_pass(pass_);
  }

 private:
  int pass_;
  bool pending_ = true;
};

}  // namespace

at::Tensor empty_recycled_gradient(const at::Tensor& w) {
  const int pass = torch::autograd::get_current_graph_task_id();
  if (pass < 0 || w.numel() == 0) return at::empty_like(w, at::MemoryFormat::Contiguous);
  if (recycler().begin_pass(pass)) {
    auto end = std::make_shared<PassEnd>(pass);
    torch::autograd::Engine::get_default_engine().queue_callback([end] { end->run(); });
  }
  static auto* allocator = new RecyclingAllocator();  // never destroyed, like the storages that point to it
  return at::detail::empty_generic(w.sizes(), allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   w.scalar_type(), c10::MemoryFormat::Contiguous);
}

int64_t kept_gradient_blocks() {
  const std::lock_guard<std::mutex> lock(recycler().mutex);
  return static_cast<int64_t>(recycler().kept.size());
}

}  // namespace fused_lstm
