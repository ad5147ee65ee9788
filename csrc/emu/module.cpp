// fused_lstm._emu: the CUDA backend compiled for the CPU (see README.md beside this file). Registers the
// op schemas under torch.ops.fused_lstm_emu (the kernels register themselves, from cuda_sources.cpp and
// persistent_sources.cpp) and exposes the emulator's controls to Python.
#include <torch/extension.h>
#include <torch/library.h>

#include "../lstm_layer.h"
#include "../op_schemas.h"
#include "blas.h"
#include "device.h"

namespace fused_lstm {
namespace emu {
at::Tensor run_selftest(const std::string& name);  // selftest.cpp
}  // namespace emu

TORCH_LIBRARY(fused_lstm_emu, m) { define_ops(m); }

}  // namespace fused_lstm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace emu = fused_lstm::emu;
  m.doc() = "fused_lstm's CUDA kernels run on the CPU by an emulator; ops under torch.ops.fused_lstm_emu";
  m.def("last_path", &fused_lstm::last_forward_path, "The path the last emulated forward op call took");
  m.def("device_profiles", [] {
    std::vector<std::string> names;
    for (const emu::DeviceProfile& p : emu::device_profiles()) names.push_back(p.name);
    return names;
  }, "Names of the GPU profiles the emulator knows (the first is the default)");
  m.def("device_profile", [] { return emu::device_profile().name; }, "The profile launches are checked against now");
  m.def("set_device_profile", &emu::set_device_profile, "Selects a GPU profile by name");
  m.def("device_limits", [] {
    const emu::DeviceProfile& p = emu::device_profile();
    pybind11::dict d;
    d["name"] = p.name;
    d["compute_capability"] = pybind11::make_tuple(p.major, p.minor);
    d["multiprocessors"] = p.multiprocessors;
    d["max_threads_per_sm"] = p.max_threads_per_sm;
    d["shared_bytes_per_sm"] = p.shared_bytes_per_sm;
    d["shared_bytes_per_block_optin"] = p.shared_bytes_per_block_optin;
    return d;
  }, "The current profile's limits");
  m.def("counters", [] {
    const emu::Counters& c = emu::counters();
    pybind11::dict d;
    d["launches"] = c.launches;
    d["cooperative_launches"] = c.cooperative_launches;
    d["blocks"] = c.blocks;
    d["threads"] = c.threads;
    d["switches"] = c.switches;
    d["gemm_calls"] = emu::blas_calls();
    return d;
  }, "Kernel launches, blocks, threads, fiber switches and emulated cuBLAS GEMMs since the process started");
  m.def("run_selftest", &emu::run_selftest, pybind11::arg("name"),
        "Runs one of the emulator's own test kernels (selftest.cpp) and returns its output");
}
