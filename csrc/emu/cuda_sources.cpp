// The CUDA backend's sources, compiled as host C++ for the emulator (FUSED_LSTM_CUDA_EMULATION is set for
// this module by setup.py): the same files nvcc builds, registered under torch.ops.fused_lstm_emu for CPU
// tensors (see gpu_runtime.h).
#include "../cuda/lstm_cuda.cu"
