// Storage for the weight gradients of per-step backward calls (an LSTMCell loop, or an LSTM called one step at
// a time), recycled within one backward pass.
//
// Each such step returns fresh gradients the size of W_ih and W_hh; autograd adds them into its running sums
// and frees them. With glibc's malloc, two multi-megabyte blocks freed together leave a free top of the heap
// above the trim threshold (twice the adaptive mmap threshold, i.e. twice one block), so free() returns the
// pages to the OS and the next step faults them in again, zeroed by the kernel: at H=512 float32 that was 2 ms
// of a 2.7 ms backward step (Intel Xeon VM). torch.nn.LSTMCell's linear layers hold one such block at a time and
// stay under the threshold. So on the CPU the cell backward takes its weight gradients from here:
//   - a freed block is kept, while a backward pass that allocated from here runs, for the next allocation of
//     exactly its size (at most cpu_limits::kMaxKeptGradientBlocks blocks, so a pass holds at most one step's
//     gradients more);
//   - when the last such pass ends (an autograd engine final callback), every kept block is freed;
//   - outside a backward pass (the op called directly) this is a plain allocation.
// The tensors are ordinary CPU tensors (resizable, shareable); only their storage's allocator is this one.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fused_lstm {

// An uninitialised contiguous tensor with w's shape and options, for w's gradient.
at::Tensor empty_recycled_gradient(const at::Tensor& w);

// How many freed blocks are kept now (for tests).
int64_t kept_gradient_blocks();

}  // namespace fused_lstm
