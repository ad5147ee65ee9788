"""Builds fused_lstm._C: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

Also builds fused_lstm._emu, the same CUDA sources compiled as host C++ for the CUDA emulator
(csrc/emu/README.md), which runs the CUDA kernels on the CPU for the tests; it needs the CUDA toolkit's
headers (cuda_fp16.h), not a GPU.

Environment:
  FUSED_LSTM_CUDA=0|1     force the CUDA sources off or on (default: on when torch.version.cuda is set
                          and a CUDA toolkit is found)
  FUSED_LSTM_EMULATOR=0|1 force the emulated CUDA build off or on (default: on when the toolkit's headers
                          are found)
  CUDA_HOME               the CUDA toolkit; found from /usr/local/cuda or nvcc on PATH when unset
  TORCH_CUDA_ARCH_LIST    GPU architectures to compile for (default: the GPU visible at build time plus PTX;
                          without one, "8.0;8.6;8.9;9.0+PTX": A100, RTX 30xx / A10, RTX 40xx / L4, H100 / H200,
                          and PTX for newer cards)
  MAX_JOBS                parallel compile jobs (default: from cores and available memory)
  FUSED_LSTM_PTXAS_REPORT a folder to keep ptxas's per-kernel register / spill report in (CI sets it;
                          tests/test_resources.py checks the budgets)
Install with `pip install --no-build-isolation .` so the build uses the torch already installed.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# sm_90 PTX cannot run on sm_8x cards, so each architecture people use has its own cubin.
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"


def _is_toolkit(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def find_cuda_home() -> str | None:
    """The CUDA toolkit root. torch guesses it from `nvcc` on PATH, which is wrong when that nvcc is a
    wrapper script outside the toolkit, so look in the usual places first."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script names the real nvcc: look for ".../bin/nvcc" in its text
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            candidates += [m.group(1) for m in re.finditer(r"(/[^\s'\"]+)/bin/nvcc", head)]
        except OSError:
            pass
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((os.path.realpath(c) for c in candidates if _is_toolkit(c)), None)


def _wheel_dirs(subdir: str) -> list[str]:
    """<site-packages>/nvidia/*/<subdir> folders: where the CUDA pip wheels that torch depends on keep the
    cuBLAS/cuSPARSE headers and libraries when the toolkit itself has none."""
    import site

    roots = list(dict.fromkeys(site.getsitepackages() + [site.getusersitepackages()] + sys.path))
    return sorted({d for r in roots if r for d in glob.glob(os.path.join(r, "nvidia", "*", subdir))})


def cuda_library_flags(cuda_home: str) -> tuple[list[str], list[str]]:
    """(include_dirs, link_args) for the cuBLAS we call directly and the headers ATen's CUDA headers need."""
    include_dirs: list[str] = []
    for header in ("cublas_v2.h", "cusparse.h"):
        if not os.path.isfile(os.path.join(cuda_home, "include", header)):
            found = [d for d in _wheel_dirs("include") if os.path.isfile(os.path.join(d, header))]
            if not found:
                sys.exit(f"fused_lstm: {header} is neither in {cuda_home}/include nor in an nvidia wheel")
            include_dirs += [d for d in found[:1] if d not in include_dirs]
    for lib_dir in ("lib64", "lib"):
        if os.path.isfile(os.path.join(cuda_home, lib_dir, "libcublas.so")):
            return include_dirs, ["-L" + os.path.join(cuda_home, lib_dir), "-lcublas"]
    for lib_dir in _wheel_dirs("lib"):
        versioned = sorted(glob.glob(os.path.join(lib_dir, "libcublas.so.*")))
        if versioned:  # wheels ship only libcublas.so.N: link that file by name
            return include_dirs, ["-L" + lib_dir, "-l:" + os.path.basename(versioned[0])]
    sys.exit(f"fused_lstm: libcublas was found neither in {cuda_home} nor in an nvidia wheel")


def want_cuda(cuda_home: str | None) -> bool:
    import torch

    forced = os.environ.get("FUSED_LSTM_CUDA")
    if forced is not None and forced.strip() not in ("0", "1"):
        sys.exit(f"FUSED_LSTM_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False
    if forced == "1":
        if torch.version.cuda is None:
            sys.exit("FUSED_LSTM_CUDA=1 but this torch has no CUDA support")
        if cuda_home is None:
            sys.exit("FUSED_LSTM_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
        return True
    return torch.version.cuda is not None and cuda_home is not None


def available_memory_gb() -> float:
    """Memory a build can use: MemAvailable (free plus reclaimable page cache), not MemFree, which a machine
    with a warm page cache reports as a fraction of what it can give."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        return 8.0


def default_max_jobs() -> int:
    """Compiling a CUDA file with the torch headers can take ~3 GB, so cap jobs by memory as well as cores."""
    cores = os.cpu_count() or 1
    return max(1, min(cores, int(available_memory_gb() // 3)))


def default_arch_list() -> str:
    """The visible GPU's architecture plus PTX when one is there at build time, else DEFAULT_ARCH_LIST."""
    import torch

    try:
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            return ";".join(f"{major}.{minor}" for major, minor in caps) + "+PTX"
    except RuntimeError:  # a driver that cannot initialise: build the default list
        pass
    return DEFAULT_ARCH_LIST


def emulator_include_dir(cuda_home: str | None) -> str | None:
    """Where cuda_fp16.h, cuda_bf16.h and vector_types.h are: the toolkit, or an nvidia wheel."""
    candidates = ([os.path.join(cuda_home, "include")] if cuda_home else []) + _wheel_dirs("include")
    return next((d for d in candidates if os.path.isfile(os.path.join(d, "cuda_fp16.h"))
                 and os.path.isfile(os.path.join(d, "vector_types.h"))), None)


def want_emulator(include_dir: str | None) -> bool:
    forced = os.environ.get("FUSED_LSTM_EMULATOR")
    if forced is not None and forced.strip() not in ("0", "1"):
        sys.exit(f"FUSED_LSTM_EMULATOR must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False
    if include_dir is None:
        if forced == "1":
            sys.exit("FUSED_LSTM_EMULATOR=1 but no CUDA headers (cuda_fp16.h) were found: set CUDA_HOME")
        return False
    return True


def kept_build_ext(base):
    """build_ext building in build/temp-<python> of the repository rather than a fresh temporary folder per
    pip call, so that ninja recompiles only what changed: pip's editable installs otherwise rebuild
    everything every time (minutes, for the CUDA sources)."""

    class KeptBuildExtension(base):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(ROOT, "build", "temp-" + sys.implementation.cache_tag)

        def build_extension(self, ext):
            # One folder per extension: _C and _emu compile some sources alike with different flags, and
            # sharing the objects would make every build recompile them for the other.
            shared = self.build_temp
            self.build_temp = os.path.join(shared, ext.name.rsplit(".", 1)[-1])
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = shared

    return KeptBuildExtension


def extensions():
    cuda_home = find_cuda_home()
    if cuda_home is not None:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import time.
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
    except ImportError:
        sys.exit("fused_lstm: building needs PyTorch installed first (pip install torch), then "
                 "`pip install --no-build-isolation .` so the extension is built against that torch")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = want_cuda(cuda_home)
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    defines = [f'-DFUSED_LSTM_TORCH_VERSION="{torch.__version__}"']
    # -fno-trapping-math: nothing here reads floating-point exception flags, and without it GCC may not
    # evaluate a clamp's comparison for every lane (an ordered compare can raise "invalid"), so the pointwise
    # loops vectorise only where AVX-512 masks can predicate them: their AVX2 build ran scalar, 13x slower
    # (benchmarks/NOTES.md item 42). Results are unchanged; the flag only licenses speculation.
    # -Wno-psabi: the kernels' vector types pass between always-inlined functions only (csrc/cpu/simd.h).
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-Wno-psabi"]
    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or default_arch_list()
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        defines += [
            "-DFUSED_LSTM_WITH_CUDA",
            f'-DFUSED_LSTM_CUDA_ARCHS="{arch_list}"',
            f'-DFUSED_LSTM_CUDA_VERSION="{torch.version.cuda}"',
        ]
        sources += sorted(glob.glob("csrc/cuda/**/*.cu", recursive=True))
        report = os.environ.get("FUSED_LSTM_PTXAS_REPORT")
        if report:  # nvcc through a wrapper that keeps ptxas's lines (torch's ninja build honours PYTORCH_NVCC)
            wrapper = os.path.join(ROOT, ".ci", "nvcc_ptxas_report.py")
            os.environ["PYTORCH_NVCC"] = f"{sys.executable} {wrapper} {os.path.join(cuda_home, 'bin', 'nvcc')}"
        include_dirs, cublas_link = cuda_library_flags(cuda_home)
        ext = CUDAExtension(
            "fused_lstm._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={
                "cxx": cxx_flags + defines,
                "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-v"] + defines,
            },
            extra_link_args=["-fopenmp"] + cublas_link,
        )
    else:
        ext = CppExtension("fused_lstm._C", sources, extra_compile_args=cxx_flags + defines,
                           extra_link_args=["-fopenmp"])
    extensions = [ext]
    emu_include = emulator_include_dir(cuda_home)
    with_emulator = want_emulator(emu_include)
    if with_emulator:
        # The CUDA sources as host C++: the kernels type-pun through 16-byte vectors as CUDA code does, which
        # the host compiler may only be trusted with under -fno-strict-aliasing.
        emu_sources = sorted(glob.glob("csrc/emu/*.cpp")) + ["csrc/lstm_layer.cpp", "csrc/cell_step.cpp"]
        extensions.append(CppExtension(
            "fused_lstm._emu", emu_sources, include_dirs=[emu_include],
            extra_compile_args=["-O2", "-fno-strict-aliasing", "-Wno-psabi", "-DFUSED_LSTM_CUDA_EMULATION"] + defines,
        ))
    what = "CPU + CUDA" if with_cuda else "CPU only"
    print(f"fused_lstm: building {what}{' (CUDA_HOME=' + cuda_home + ', TORCH_CUDA_ARCH_LIST=' + arch_list + ')' if with_cuda else ''}"
          f"{' + the CUDA emulator (fused_lstm._emu)' if with_emulator else ''}; MAX_JOBS={os.environ['MAX_JOBS']} "
          f"({available_memory_gb():.0f} GB available)", flush=True)
    return extensions, {"build_ext": kept_build_ext(BuildExtension)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
