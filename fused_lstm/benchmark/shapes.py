"""What to benchmark: LSTM shapes, precisions, modes and the named presets.

A :class:`Shape` is one ``torch.nn.LSTM`` configuration plus its input size, or, with ``cell``, the
same single-layer recurrence written as a Python loop over ``LSTMCell`` steps (how decoders use a cell);
a :class:`Case` is a shape with an optional restriction to some modes or
precisions (e.g. DeepBench inference shapes are only timed in ``infer``);
a :class:`Preset` is a named list of cases with default modes and precisions.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

#: Timed modes, in the order they are run and reported.
MODES: Tuple[str, ...] = ("infer", "train", "train_weights", "fwd", "bwd")

#: Modes that need autograd (their correctness gate also checks gradients).
GRAD_MODES: Tuple[str, ...] = ("train", "train_weights", "fwd", "bwd")

#: Modes whose input is data: no gradient is taken for it (the first layer of most training).
DATA_INPUT_MODES: Tuple[str, ...] = ("train_weights",)

#: Precision names accepted on the command line, and the dtype of the modules' weights and inputs in each.
DTYPES: Dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "autocast-bf16": torch.float32,
    "autocast-fp16": torch.float32,
}

#: The precisions that run float32 modules and inputs under ``torch.autocast`` (mixed-precision training and
#: inference), and the autocast dtype: both modules compute and return it, and float32 gradients reach the weights.
AUTOCAST_DTYPES: Dict[str, torch.dtype] = {
    "autocast-bf16": torch.bfloat16,
    "autocast-fp16": torch.float16,
}


def compute_dtype(name: str) -> torch.dtype:
    """The dtype precision ``name`` computes in: the autocast dtype, else the modules' own."""
    return AUTOCAST_DTYPES.get(name, DTYPES[name])


def compute_precision(name: str) -> str:
    """The plain precision (a module dtype's name) that ``name`` computes in: ``bf16`` for ``autocast-bf16``."""
    dtype = compute_dtype(name)
    plain = next((p for p, d in DTYPES.items() if d == dtype and p not in AUTOCAST_DTYPES), None)
    if plain is None:
        raise KeyError(name)
    return plain


#: Precisions allowed on CPU (fp16 has no fast CPU path in torch.nn.LSTM to race).
CPU_DTYPES: Tuple[str, ...] = ("fp32", "bf16", "autocast-bf16")

_TRUE = {"1", "true", "yes", "y", "on", "bidir", "bidirectional", "packed"}
_FALSE = {"0", "false", "no", "n", "off", "uni", "unidirectional", "padded", ""}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One LSTM problem: sequence length, batch, input size, hidden size, topology.

    Sequences are time-major (``batch_first=False``) like ``torch.nn.LSTM``'s default. ``cell``: run the
    ``T`` steps as ``T`` calls of ``torch.nn.LSTMCell`` (against the candidate's ``LSTMCell``) from a
    Python loop; one layer, one direction, dense, no projection.
    """

    T: int
    N: int
    I: int
    H: int
    layers: int = 1
    bidirectional: bool = False
    packed: bool = False
    proj_size: int = 0
    cell: bool = False

    def __post_init__(self) -> None:
        for name in ("T", "N", "I", "H", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.proj_size < self.H:
            raise ValueError(f"proj_size must be in [0, H={self.H}), got {self.proj_size}")
        if self.cell and (self.layers != 1 or self.bidirectional or self.packed or self.proj_size):
            raise ValueError("a cell shape is one layer, one direction, dense and without proj_size")

    @property
    def directions(self) -> int:
        """Number of directions (1 or 2)."""
        return 2 if self.bidirectional else 1

    @property
    def h_out(self) -> int:
        """Size of h (``proj_size`` when projecting, else ``H``)."""
        return self.proj_size or self.H

    def lengths(self) -> List[int]:
        """Per-sequence lengths: all ``T`` unless packed, else spread uniformly over 1..T.

        The packed lengths are deterministic and deliberately unsorted, so that the
        ``enforce_sorted=False`` path (sorting and unsorting) is exercised.
        """
        if not self.packed or self.N == 1:
            return [self.T] * self.N
        lengths = [round(1 + (self.T - 1) * i / (self.N - 1)) for i in range(self.N)]
        random.Random(self.N * 1009 + self.T).shuffle(lengths)
        return lengths

    def tokens(self) -> int:
        """Number of (time step, sequence) pairs actually processed."""
        return sum(self.lengths())

    def topology(self) -> str:
        """Short topology tag, e.g. ``L2 bi packed``, or ``cell``."""
        if self.cell:
            return "cell"
        parts = [f"L{self.layers}", "bi" if self.bidirectional else "uni"]
        if self.packed:
            parts.append("packed")
        if self.proj_size:
            parts.append(f"P{self.proj_size}")
        return " ".join(parts)

    def label(self) -> str:
        """Human-readable label, e.g. ``T=100 N=64 I=512 H=512 L1 uni``."""
        return f"T={self.T} N={self.N} I={self.I} H={self.H} {self.topology()}"

    def lstm_kwargs(self) -> Dict[str, object]:
        """Constructor arguments shared by ``torch.nn.LSTM`` and the candidate."""
        return {
            "input_size": self.I,
            "hidden_size": self.H,
            "num_layers": self.layers,
            "bias": True,
            "batch_first": False,
            "dropout": 0.0,
            "bidirectional": self.bidirectional,
            "proj_size": self.proj_size,
        }


@dataclasses.dataclass(frozen=True)
class Case:
    """A shape in a preset, optionally restricted to some modes / precisions."""

    shape: Shape
    group: str = "custom"
    modes: Optional[Tuple[str, ...]] = None
    dtypes: Optional[Tuple[str, ...]] = None

    def describe(self) -> str:
        """Text matched by ``--filter``: group name plus shape label."""
        return f"{self.group} {self.shape.label()}"


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named benchmark plan."""

    name: str
    description: str
    cases: Tuple[Case, ...]
    modes: Tuple[str, ...]
    dtypes: Tuple[str, ...]


def parse_shape(text: str) -> Shape:
    """Parse ``T,N,I,H[,layers[,bidir[,packed[,proj_size]]]]`` (booleans as 0/1)."""
    fields = [f.strip() for f in text.split(",")]
    if not 4 <= len(fields) <= 8:
        raise ValueError(
            f"shape {text!r}: expected T,N,I,H[,layers[,bidir[,packed[,proj_size]]]], "
            f"got {len(fields)} fields"
        )
    try:
        T, N, I, H = (int(f) for f in fields[:4])
        layers = int(fields[4]) if len(fields) > 4 else 1
        proj = int(fields[7]) if len(fields) > 7 else 0
    except ValueError:
        raise ValueError(f"shape {text!r}: T, N, I, H, layers and proj_size must be integers") from None
    bidir = _parse_bool(fields[5], "bidir", text) if len(fields) > 5 else False
    packed = _parse_bool(fields[6], "packed", text) if len(fields) > 6 else False
    try:
        return Shape(T, N, I, H, layers, bidir, packed, proj)
    except ValueError as exc:
        raise ValueError(f"shape {text!r}: {exc}") from None


def _parse_bool(field: str, name: str, text: str) -> bool:
    value = field.lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"shape {text!r}: {name} must be 0 or 1, got {field!r}")


def parse_names(text: str, allowed: Sequence[str], what: str) -> Tuple[str, ...]:
    """Parse a comma-separated list of names, each from ``allowed`` (order kept, no repeats)."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"empty {what} list")
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return tuple(dict.fromkeys(names))


def select_cases(cases: Iterable[Case], pattern: Optional[str], limit: Optional[int]) -> List[Case]:
    """Keep cases whose :meth:`Case.describe` matches regex ``pattern``; then the first ``limit``."""
    selected = list(cases)
    if pattern:
        regex = re.compile(pattern, re.IGNORECASE)
        selected = [c for c in selected if regex.search(c.describe())]
    return selected[:limit] if limit is not None else selected


def _grid(group: str, T: int, batches: Iterable[int], hiddens: Iterable[int], cell: bool = False,
          **kw: object) -> List[Case]:
    """Cases for every (N, H) pair at sequence length ``T`` with ``I = H``."""
    return [Case(Shape(T, n, h, h, cell=cell), group, **kw)  # type: ignore[arg-type]
            for h in hiddens for n in batches]


CLASSIC = Shape(100, 64, 512, 512)
_ALL_DTYPES = tuple(d for d in DTYPES if d not in AUTOCAST_DTYPES)  # the modules' own precisions
_TRAIN_MODES = ("train", "fwd", "bwd")


def _quick() -> Preset:
    cases = (
        Case(Shape(20, 4, 32, 64), "tiny"),
        Case(Shape(50, 16, 128, 128), "small"),
        Case(Shape(50, 8, 256, 256), "small"),
        Case(Shape(30, 8, 64, 128, layers=2, bidirectional=True), "multilayer"),
        Case(Shape(40, 8, 64, 128, packed=True), "packed"),
        Case(Shape(20, 8, 128, 128, cell=True), "cell"),
    )
    return Preset("quick", "six small shapes (one an LSTMCell loop), infer+train; the README/CI smoke run, "
                  "8 s on a 2-core AMD EPYC",
                  cases, ("infer", "train"), ("fp32",))


def _cpu() -> Preset:
    cases = tuple(_grid("sweep", 50, (1, 8, 64), (128, 256, 512, 1024))) + (
        Case(Shape(50, 16, 256, 256, layers=2, bidirectional=True), "multilayer"),
        Case(Shape(50, 16, 256, 256, packed=True), "packed"),
    ) + tuple(_grid("cell", 50, (1, 8, 64), (128, 512), cell=True)) + tuple(
        _grid("sweep-bf16", 50, (1, 8, 64), (128, 256, 512, 1024), modes=("infer", "train"),
              dtypes=("bf16", "autocast-bf16"))) + tuple(
        _grid("cell-bf16", 50, (1, 8, 64), (128, 512), cell=True, modes=("infer", "train"),
              dtypes=("autocast-bf16",)))
    return Preset("cpu", "T=50 batch 1..64 x hidden 128..1024, plus 2-layer bidir, packed, and LSTMCell "
                  "loops (batch 1..64 x hidden 128, 512), fp32; the batch x hidden sweep again in bf16 and "
                  "under bf16 autocast, and the LSTMCell loops under bf16 autocast (infer, train)",
                  cases, ("infer", "train", "train_weights"), ("fp32",))


def _gpu() -> Preset:
    cases = (
        (Case(CLASSIC, "classic", dtypes=_ALL_DTYPES),)
        + tuple(_grid("sweep", 100, (1, 8, 64), (256, 512, 1024)))
        + (
            Case(Shape(100, 64, 512, 512, layers=2, bidirectional=True), "multilayer"),
            Case(Shape(100, 64, 512, 512, packed=True), "packed"),
        )
        + tuple(_grid("cell", 100, (1, 64), (512,), cell=True))
    )
    return Preset("gpu", "classic T=100 N=64 I=H=512, batch sweep N{1,8,64} x H{256,512,1024}, "
                  "2-layer bidir, packed, LSTMCell loops; all modes, fp32/bf16/fp16 (not yet run on a GPU)",
                  cases, MODES, _ALL_DTYPES)


def _full() -> Preset:
    deepbench_train = (
        _grid("deepbench-train", 25, (16, 32, 64, 128), (512, 1024, 2048, 4096), modes=_TRAIN_MODES)
        + _grid("deepbench-train", 50, (8, 16, 32), (1536,), modes=_TRAIN_MODES)
        + _grid("deepbench-train", 150, (16, 32, 64), (256,), modes=_TRAIN_MODES)
    )
    deepbench_infer = (
        _grid("deepbench-infer", 25, (1, 2, 4), (512, 1024, 2048), modes=("infer",))
        + _grid("deepbench-infer", 50, (1, 2, 4), (1536,), modes=("infer",))
        + _grid("deepbench-infer", 150, (1, 2, 4), (256,), modes=("infer",))
    )
    topologies = [
        Case(Shape(100, 64, 512, 512, layers=2), "multilayer"),
        Case(Shape(100, 64, 512, 512, bidirectional=True), "multilayer"),
        Case(Shape(100, 64, 512, 512, layers=2, bidirectional=True), "multilayer"),
        Case(Shape(100, 64, 512, 512, packed=True), "packed"),
    ]
    cases = (
        [Case(CLASSIC, "classic")]
        + _grid("sweep", 100, (1, 2, 4, 8, 16, 32, 64, 128), (128, 256, 512, 768, 1024))
        + deepbench_train
        + deepbench_infer
        + topologies
    )
    return Preset("full", "classic, batch sweep N 1..128 x H 128..1024, DeepBench train/inference "
                  "shapes, 2-layer/bidirectional and packed cases; all modes and precisions",
                  tuple(cases), MODES, _ALL_DTYPES)


#: Presets by name.
PRESETS: Dict[str, Preset] = {p.name: p for p in (_quick(), _cpu(), _gpu(), _full())}
