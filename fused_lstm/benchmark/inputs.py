"""Building the two modules with identical weights, and drawing their inputs."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple, Union

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from .candidates import CandidateFactory, cell_factory, last_path
from .shapes import Shape

LstmInput = Union[torch.Tensor, PackedSequence]


@dataclasses.dataclass
class InputSet:
    """One pre-drawn call: input, initial state and the upstream gradients.

    ``leaf`` is the tensor the input gradient is taken against: ``x`` itself, or the
    ``data`` of the packed sequence (packing is done once, outside any timing).
    """

    x: LstmInput
    leaf: torch.Tensor
    hx: Tuple[torch.Tensor, torch.Tensor]
    grad_outputs: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class CellLoop(torch.nn.Module):
    """A single-layer LSTM written as a Python loop over ``LSTMCell`` steps, called and answering like a
    ``torch.nn.LSTM`` (input ``[T, N, I]``, ``hx`` ``([1, N, H], [1, N, H])``; output ``[T, N, H]``,
    ``(h_n, c_n)``), so that the gate, the workloads and the timing treat it like any candidate."""

    def __init__(self, cell: torch.nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: torch.Tensor, hx: Tuple[torch.Tensor, torch.Tensor]):
        h, c = hx[0][0], hx[1][0]
        outputs = []
        for step in x.unbind(0):
            h, c = self.cell(step, (h, c))
            outputs.append(h)
        return torch.stack(outputs), (h.unsqueeze(0), c.unsqueeze(0))

    def last_path(self) -> Optional[str]:
        """The path the cell's own package reports (see :func:`.candidates.last_path`)."""
        return last_path(self.cell)


class UnderAutocast(torch.nn.Module):
    """Runs ``inner`` (float32 weights, float32 input) under ``torch.autocast`` of its device in ``dtype``, as a
    mixed-precision model does; called and answering like ``inner``. Gradients are taken outside the autocast
    region, as torch recommends."""

    def __init__(self, inner: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x: LstmInput, hx: Tuple[torch.Tensor, torch.Tensor]):
        data = x.data if isinstance(x, PackedSequence) else x
        with torch.autocast(data.device.type, dtype=self.dtype):
            return self.inner(x, hx)

    def last_path(self) -> Optional[str]:
        """The path the inner module's package reports (see :func:`.candidates.last_path`)."""
        return last_path(self.inner)


def as_data(inp: InputSet) -> InputSet:
    """The same call with the input as data: detached, so that no gradient is taken for it."""
    leaf = inp.leaf.detach()
    x: LstmInput = inp.x._replace(data=leaf) if isinstance(inp.x, PackedSequence) else leaf
    return InputSet(x, leaf, inp.hx, inp.grad_outputs)


def build_pair(shape: Shape, dtype: torch.dtype, device: torch.device, factory: CandidateFactory, seed: int = 0,
               autocast: Optional[torch.dtype] = None) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """``(torch.nn.LSTM, candidate)`` on ``device``/``dtype`` with the same weights; for a cell shape,
    ``(CellLoop(torch.nn.LSTMCell), CellLoop(the candidate's LSTMCell))``; with ``autocast``, each wrapped in
    :class:`UnderAutocast` of that dtype.

    The baseline is initialised from ``seed``; the candidate receives its
    ``state_dict`` (strict, so differing parameter names fail loudly).
    """
    def make(lstm: CandidateFactory) -> torch.nn.Module:
        if shape.cell:
            return CellLoop(cell_factory(lstm)(shape.I, shape.H))
        return lstm(**shape.lstm_kwargs())

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reference = make(torch.nn.LSTM)
    reference = reference.to(device=device, dtype=dtype)
    candidate = make(factory).to(device=device, dtype=dtype)
    candidate.load_state_dict(reference.state_dict())
    if autocast is not None:
        return UnderAutocast(reference, autocast), UnderAutocast(candidate, autocast)
    return reference, candidate


def draw_inputs(shape: Shape, dtype: torch.dtype, device: torch.device,
                count: int, seed: int = 0) -> List[InputSet]:
    """``count`` independent input sets (drawn on CPU from ``seed``, then moved)."""
    generator = torch.Generator().manual_seed(seed)
    return [_draw_one(shape, dtype, device, generator) for _ in range(count)]


def _randn(generator: torch.Generator, *size: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*size, generator=generator) * scale


def _draw_one(shape: Shape, dtype: torch.dtype, device: torch.device,
              generator: torch.Generator) -> InputSet:
    def put(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    states = shape.layers * shape.directions
    x = put(_randn(generator, shape.T, shape.N, shape.I))
    h0 = put(_randn(generator, states, shape.N, shape.h_out, scale=0.5))
    c0 = put(_randn(generator, states, shape.N, shape.H, scale=0.5))
    features = shape.directions * shape.h_out
    if shape.packed:
        lengths = torch.tensor(shape.lengths(), dtype=torch.int64)
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        leaf = packed.data.detach().requires_grad_()
        x_in: LstmInput = PackedSequence(leaf, packed.batch_sizes, packed.sorted_indices,
                                         packed.unsorted_indices)
        out_size: Tuple[int, ...] = (leaf.shape[0], features)
    else:
        leaf = x.requires_grad_()
        x_in = leaf
        out_size = (shape.T, shape.N, features)
    grads = (put(_randn(generator, *out_size)), put(_randn(generator, *h0.shape)),
             put(_randn(generator, *c0.shape)))
    return InputSet(x_in, leaf, (h0, c0), grads)
