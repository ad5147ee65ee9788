"""fused_lstm: a drop-in ``torch.nn.LSTM`` / ``torch.nn.LSTMCell`` on fused C++/CUDA custom ops.

    import fused_lstm
    lstm = fused_lstm.LSTM(512, 512, num_layers=2)   # same arguments as torch.nn.LSTM
    model = fused_lstm.convert(model)                  # swap every nn.LSTM / nn.LSTMCell in a model
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Dict

import torch

# Import the extension before ops.py does, so that an unbuilt clone is told how to build it (ops.py's own
# `from . import _C` would fail with "partially initialized module ... circular import").
try:
    importlib.import_module("._C", __name__)
except ModuleNotFoundError as _missing:
    if _missing.name != f"{__name__}._C":
        raise
    raise ImportError(
        "fused_lstm: the C++ extension is not built: run `bash .ci/install` (or `pip install "
        f"--no-build-isolation -e .`) in {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}"
    ) from None

from . import ops
from ._C import _set_cpu_kernels
from ._C import build_info as _build_info
from ._C import last_path as _last_path
from .modules import LSTM, LSTMCell, convert
from .explain import explain  # which CPU path and kernels a call runs, and why (csrc/cpu/cpu_plan.h)

# FUSED_LSTM_CPU_KERNELS=avx2 (or aten, avx512) selects the CPU float32 kernels instead of the best this CPU
# supports: to compare them, or to rule them out. A set the CPU cannot run is an error, not a crash.
if os.environ.get("FUSED_LSTM_CPU_KERNELS"):
    _set_cpu_kernels(os.environ["FUSED_LSTM_CPU_KERNELS"])

__all__ = ["LSTM", "LSTMCell", "convert", "build_info", "explain", "last_path", "ops"]
__version__ = "0.1.0"


def build_info() -> Dict[str, Any]:
    """What the extension was built with: CUDA kernels compiled in or not, CUDA archs and version, the torch
    it was compiled against, the C++ compiler; plus whether CUDA kernels are usable in this process and
    which CPU float32 kernels it runs (``cpu_kernels``: ``"avx512"`` or ``"avx2"``, fused_lstm's own
    register-tiled kernels built for that instruction set; ``"aten"``, ATen's GEMMs and the per-step loop, on
    CPUs with neither) and the best this CPU supports (``cpu_kernels_supported``). The environment variable
    ``FUSED_LSTM_CPU_KERNELS`` selects a supported set other than the best at import."""
    info = dict(_build_info())
    info["version"] = __version__
    info["cuda_available"] = bool(info["cuda"]) and torch.cuda.is_available()
    return info


def last_path() -> str:
    """The kernel path the last layer computed on this thread took: ``"cpu:fused-recurrence"`` (float32),
    ``"cpu:fused-recurrence:amx"`` or ``"cpu:fused-recurrence:avx512_bf16"`` (bfloat16, e.g. under autocast: the
    product kernel), ``"cpu:per-step"``, ``"cuda:standard"`` or ``"cuda:persistent"``; ``""`` before the first
    call."""
    return _last_path()
