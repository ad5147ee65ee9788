"""The environment a result was measured in (stored with every result file)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

#: Environment variables that change numerics or threading.
# Settings that change timings: TF32 and threading, and on the CPU the heap (glibc's mmap/trim thresholds,
# a preloaded allocator, torch's huge-page switch), which decides how many page faults each side pays; and
# the instruction sets each side may use (fused_lstm's kernel set, ATen's, oneDNN's and MKL's caps), which
# emulate an older CPU on a newer one.
_ENV_VARS = ("NVIDIA_TF32_OVERRIDE", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "CUBLAS_WORKSPACE_CONFIG",
             "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "CUDA_LAUNCH_BLOCKING",
             "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "LD_PRELOAD",
             "THP_MEM_ALLOC_ENABLE", "FUSED_LSTM_CPU_KERNELS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
             "MKL_ENABLE_INSTRUCTIONS")

_REPO = Path(__file__).resolve().parents[2]


def _run(cmd: List[str], cwd: Optional[Path] = None) -> Optional[str]:
    """stdout of ``cmd`` stripped, or None if it is missing or fails."""
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def git_commit() -> Optional[str]:
    """Commit of the checkout this package runs from, ``+dirty`` if modified."""
    commit = _run(["git", "rev-parse", "HEAD"], _REPO)
    if commit and _run(["git", "status", "--porcelain", "--untracked-files=no"], _REPO):
        commit += "+dirty"
    return commit


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo, else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tf32_settings() -> Dict[str, Any]:
    """TF32 switches (legacy ``allow_tf32`` flags and, where present, ``fp32_precision``)."""
    settings: Dict[str, Any] = {
        "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "torch.get_float32_matmul_precision()": torch.get_float32_matmul_precision(),
    }
    for name, obj in (("torch.backends.cuda.matmul", torch.backends.cuda.matmul),
                      ("torch.backends.cudnn.rnn", getattr(torch.backends.cudnn, "rnn", None))):
        precision = getattr(obj, "fp32_precision", None)
        if precision is not None:
            settings[f"{name}.fp32_precision"] = precision
    return settings


def cuda_info(device: torch.device) -> Dict[str, Any]:
    """Name, capability, SM count, memory and driver of a CUDA ``device``."""
    props = torch.cuda.get_device_properties(device)
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                   f"--id={device.index or 0}"])
    return {
        "device_name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": driver,
    }


def build_info() -> Any:
    """``fused_lstm.build_info()`` when the package is loaded and provides it."""
    package = sys.modules.get("fused_lstm")
    fn = getattr(package, "build_info", None)
    if not callable(fn):
        return None
    try:
        return fn()
    except Exception as exc:  # report, never fail the run
        return f"error: {exc}"


def collect_environment(device: torch.device, candidate: str) -> Dict[str, Any]:
    """Everything needed to interpret (and reproduce) a result file."""
    env: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "candidate": candidate,
        "device": str(device),
        "device_name": cpu_model(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_enabled": torch.backends.cudnn.enabled,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "tf32": tf32_settings(),
        "env_vars": {k: os.environ[k] for k in _ENV_VARS if k in os.environ},
        "fused_lstm_build_info": build_info(),
    }
    if device.type == "cuda":
        env.update(cuda_info(device))
    return env
