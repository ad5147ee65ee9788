// User-space fibers for the CUDA emulator: one fiber per emulated CUDA thread, all on the calling OS thread.
//
// A fiber runs until it yields (at a barrier or a warp collective), so the emulator decides the interleaving
// of CUDA threads at exactly the points where CUDA's memory ordering is defined. The switch is a few
// instructions of hand-written assembly on x86-64 (saving the callee-saved registers, the stack pointer and
// the floating-point control words), about 10x cheaper than swapcontext's signal-mask syscall; other
// architectures fall back to ucontext.
#pragma once

#include <cstddef>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace fused_lstm {
namespace emu {

// The saved state of a suspended fiber (or of the scheduler while a fiber runs).
struct FiberContext {
#if defined(__x86_64__)
  void* stack_pointer = nullptr;
#else
  ucontext_t context;
#endif
};

// Prepares `fiber` to start entry(arg) on the stack [stack, stack + stack_bytes) at its first switch.
// entry must never return: it ends by switching away for good.
void make_fiber(FiberContext* fiber, void* stack, size_t stack_bytes, void (*entry)(void*), void* arg);

// Saves the running context into `from` and resumes `to`.
void switch_fiber(FiberContext* from, FiberContext* to);

// Fiber stacks, reused across launches: mmap'ed lazily in chunks and never returned while the process runs
// (a cooperative launch of the whole grid needs one per emulated thread at once).
class StackPool {
 public:
  explicit StackPool(size_t stack_bytes) : stack_bytes_(stack_bytes) {}
  StackPool(const StackPool&) = delete;
  StackPool& operator=(const StackPool&) = delete;
  // The base of stack i (0 <= i); grows the pool as needed.
  void* stack(size_t i);
  size_t stack_bytes() const { return stack_bytes_; }

 private:
  size_t stack_bytes_;
  struct Chunk {
    char* base;
    size_t stacks;
  };
  std::vector<Chunk> chunks_;
  size_t stacks_ = 0;
};

}  // namespace emu
}  // namespace fused_lstm
