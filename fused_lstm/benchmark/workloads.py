"""What one timed call does in each mode.

* ``infer``: ``eval()`` module, forward under ``torch.no_grad()``.
* ``fwd``:   ``train()`` module, forward with autograd recording (graph dropped).
* ``train``: forward + backward (input and all weight gradients).
* ``train_weights``: forward + backward for the weight gradients only, the input being data (detached,
  outside the timed region), as the first layer of most training runs.
* ``bwd``:   backward only. Each repeat first runs a fresh forward *outside* the
  timed region (and synchronises), then times only the ``torch.autograd.grad``
  call, so nothing is subtracted and no graph is reused.

A :class:`Workload` separates the untimed ``prepare`` from the timed ``run``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch.nn.utils.rnn import PackedSequence

from .inputs import InputSet, as_data
from .shapes import DATA_INPUT_MODES

#: (output, h_n, c_n); ``output`` is the ``.data`` of a PackedSequence when packed.
Outputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def forward(model: torch.nn.Module, inp: InputSet) -> Outputs:
    """Run ``model`` on ``inp`` and return its three outputs as plain tensors."""
    out, (h_n, c_n) = model(inp.x, inp.hx)
    if isinstance(out, PackedSequence):
        out = out.data
    return out, h_n, c_n


def backward(outputs: Outputs, inp: InputSet,
             params: Sequence[torch.nn.Parameter]) -> Tuple[torch.Tensor, ...]:
    """Gradients of ``sum(outputs * inp.grad_outputs)`` w.r.t. the input (unless it is data) and ``params``."""
    targets = tuple(params) if not inp.leaf.requires_grad else (inp.leaf, *params)
    return torch.autograd.grad(outputs, targets, inp.grad_outputs)


@dataclasses.dataclass
class Workload:
    """An untimed ``prepare(input) -> state`` and a timed ``run(state)``."""

    prepare: Callable[[InputSet], Any]
    run: Callable[[Any], Any]


def make_workload(model: torch.nn.Module, mode: str) -> Workload:
    """The workload of ``mode`` (one of :data:`~.shapes.MODES`) for ``model``."""
    params = tuple(model.parameters())
    training = mode != "infer"

    def select(inp: InputSet) -> InputSet:
        model.train(training)
        return as_data(inp) if mode in DATA_INPUT_MODES else inp

    def infer(inp: InputSet) -> Outputs:
        with torch.no_grad():
            return forward(model, inp)

    def fwd(inp: InputSet) -> Outputs:
        return forward(model, inp)

    def train(inp: InputSet) -> Tuple[torch.Tensor, ...]:
        return backward(forward(model, inp), inp, params)

    def bwd_prepare(inp: InputSet) -> Tuple[Outputs, InputSet]:
        return forward(model, select(inp)), inp

    def bwd(state: Tuple[Outputs, InputSet]) -> Tuple[torch.Tensor, ...]:
        return backward(state[0], state[1], params)

    runs: Dict[str, Callable[[Any], Any]] = {"infer": infer, "fwd": fwd, "train": train, "train_weights": train}
    if mode == "bwd":
        return Workload(bwd_prepare, bwd)
    run: Optional[Callable[[Any], Any]] = runs.get(mode)
    if run is None:
        raise ValueError(f"unknown mode {mode!r}")
    return Workload(select, run)
