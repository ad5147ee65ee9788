// The persistent CUDA kernels and their host code, compiled as host C++ for the emulator (see
// cuda_sources.cpp).
#include "../cuda/persistent/persistent.cu"
