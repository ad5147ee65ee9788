// Fiber switch and stacks (see fiber.h).
#include "fiber.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

namespace fused_lstm {
namespace emu {

#if defined(__x86_64__)
// switch_stack(save, load): System V x86-64. Pushes the callee-saved registers and the MXCSR / x87 control
// words on the current stack, stores the stack pointer in *save, loads *load and pops the same frame from it.
// A new fiber's stack is laid out as such a frame whose return address is fiber_trampoline, which calls
// entry(arg) (kept in r12 / r13) on a 16-byte aligned stack; its CFI marks the bottom of the fiber's call
// stack, so an unwinder (a C++ exception, a backtrace) stops there.
extern "C" void fused_lstm_emu_switch_stack(void** save, void* const* load);
extern "C" void fused_lstm_emu_fiber_trampoline();
asm(R"(
  .text
  .globl fused_lstm_emu_switch_stack
  .type fused_lstm_emu_switch_stack, @function
fused_lstm_emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq (%rsi), %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fused_lstm_emu_switch_stack, .-fused_lstm_emu_switch_stack

  .globl fused_lstm_emu_fiber_trampoline
  .type fused_lstm_emu_fiber_trampoline, @function
fused_lstm_emu_fiber_trampoline:
  .cfi_startproc
  .cfi_undefined rip
  movq %r13, %rdi
  callq *%r12
  ud2
  .cfi_endproc
  .size fused_lstm_emu_fiber_trampoline, .-fused_lstm_emu_fiber_trampoline
)");

void make_fiber(FiberContext* fiber, void* stack, size_t stack_bytes, void (*entry)(void*), void* arg) {
  // Top of the stack, 16-byte aligned; the frame below it is what switch_stack pops: control words, r15,
  // r14, r13 (arg), r12 (entry), rbx, rbp, return address. After the ret, rsp = top - 16, aligned as the
  // ABI wants before the trampoline's call.
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + stack_bytes) & ~uintptr_t{15};
  uint64_t* frame = reinterpret_cast<uint64_t*>(top - 80);
  uint32_t mxcsr;
  uint16_t fpu_control;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_control));
  std::memset(frame, 0, 80);
  std::memcpy(reinterpret_cast<char*>(frame), &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(frame) + 4, &fpu_control, 2);
  frame[3] = reinterpret_cast<uint64_t>(arg);    // r13
  frame[4] = reinterpret_cast<uint64_t>(entry);  // r12
  frame[7] = reinterpret_cast<uint64_t>(&fused_lstm_emu_fiber_trampoline);
  fiber->stack_pointer = frame;
}

void switch_fiber(FiberContext* from, FiberContext* to) {
  fused_lstm_emu_switch_stack(&from->stack_pointer, &to->stack_pointer);
}
#else
namespace {
void ucontext_entry(unsigned hi_entry, unsigned lo_entry, unsigned hi_arg, unsigned lo_arg) {
  auto entry = reinterpret_cast<void (*)(void*)>((uintptr_t{hi_entry} << 32) | lo_entry);
  entry(reinterpret_cast<void*>((uintptr_t{hi_arg} << 32) | lo_arg));
  std::abort();  // entry never returns
}
}  // namespace

void make_fiber(FiberContext* fiber, void* stack, size_t stack_bytes, void (*entry)(void*), void* arg) {
  getcontext(&fiber->context);
  fiber->context.uc_stack.ss_sp = stack;
  fiber->context.uc_stack.ss_size = stack_bytes;
  fiber->context.uc_link = nullptr;
  const uintptr_t e = reinterpret_cast<uintptr_t>(entry), a = reinterpret_cast<uintptr_t>(arg);
  makecontext(&fiber->context, reinterpret_cast<void (*)()>(&ucontext_entry), 4, unsigned(e >> 32), unsigned(e),
              unsigned(a >> 32), unsigned(a));
}

void switch_fiber(FiberContext* from, FiberContext* to) { swapcontext(&from->context, &to->context); }
#endif

void* StackPool::stack(size_t i) {
  while (i >= stacks_) {
    // Chunks double, from 256 stacks; MAP_NORESERVE: only the pages a fiber touches are ever committed.
    const size_t count = stacks_ == 0 ? 256 : stacks_;
    void* base = mmap(nullptr, count * stack_bytes_, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) throw std::bad_alloc();
    chunks_.push_back(Chunk{static_cast<char*>(base), count});
    stacks_ += count;
  }
  for (const Chunk& chunk : chunks_) {
    if (i < chunk.stacks) return chunk.base + i * stack_bytes_;
    i -= chunk.stacks;
  }
  return nullptr;  // unreachable
}

}  // namespace emu
}  // namespace fused_lstm
