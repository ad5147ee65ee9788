"""Which cuDNN RNN algorithm ``torch.nn.LSTM`` would pick (mirrors ``get_algo`` in
PyTorch's ``aten/src/ATen/native/cudnn/RNN.cpp``), so results can be read against
the baseline's actual kernel: ``persist`` (CUDNN_RNN_ALGO_PERSIST_STATIC),
``persist-small-h`` (CUDNN_RNN_ALGO_PERSIST_STATIC_SMALL_H) or ``standard``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .shapes import Shape


@dataclasses.dataclass(frozen=True)
class CudaProps:
    """The device properties the heuristic looks at."""

    major: int
    minor: int
    sm_count: int

    @classmethod
    def of(cls, device: torch.device) -> "CudaProps":
        """Read the properties of a CUDA ``device``."""
        p = torch.cuda.get_device_properties(device)
        return cls(p.major, p.minor, p.multi_processor_count)


def _persist_small_h(shape: Shape, forward: bool, props: CudaProps) -> bool:
    if props.major < 6:
        return False
    return shape.H <= (192 if forward else 128)


def _persist_common(shape: Shape) -> bool:
    return (shape.layers == 1 and not shape.bidirectional and shape.H <= 1024
            and shape.H % 128 == 0 and shape.I % 128 == 0)


def _persist_device(shape: Shape, props: CudaProps) -> bool:
    n = shape.N
    if props.major == 7:
        if props.minor == 5:
            return False
        return (((n % 16 == 0 and n not in (80, 112)) or n == 8)
                and ((shape.T >= 40 and n <= 128) or (shape.T >= 20 and n <= 96)
                     or (shape.T >= 10 and n <= 32)))
    if props.major >= 8 and props.sm_count >= 98 and props.minor != 6:
        return n % 8 == 0 and n <= 128
    return False


def cudnn_algo(shape: Shape, dtype: torch.dtype, forward: bool, props: CudaProps) -> str:
    """Algorithm cuDNN is asked to use for the forward (or backward) pass of ``shape``."""
    if shape.proj_size or shape.packed:
        return "standard"
    if dtype != torch.float64 and _persist_small_h(shape, forward, props):
        return "persist-small-h"
    if dtype == torch.float16 and _persist_common(shape) and _persist_device(shape, props):
        return "persist"
    return "standard"


def baseline_algo(shape: Shape, dtype: torch.dtype, mode: str, device: torch.device,
                  props: Optional[CudaProps] = None) -> str:
    """Label of the kernel family the torch baseline runs for ``mode``.

    ``cpu`` on CPU (oneDNN / native ATen), ``linear+cell`` for an LSTMCell loop, ``native`` when
    cuDNN is disabled, else the cuDNN algorithm; ``train`` shows ``forward/backward`` when the two differ.
    """
    if device.type != "cuda":
        return "cpu"
    if shape.cell:  # torch.nn.LSTMCell: two cuBLAS products and a fused pointwise kernel per step
        return "linear+cell"
    if not torch.backends.cudnn.is_available() or not torch.backends.cudnn.enabled:
        return "native"
    props = props or CudaProps.of(device)
    fwd = cudnn_algo(shape, dtype, True, props)
    bwd = cudnn_algo(shape, dtype, False, props)
    if mode in ("infer", "fwd"):
        return fwd
    if mode == "bwd":
        return bwd
    return fwd if fwd == bwd else f"{fwd}/{bwd}"
