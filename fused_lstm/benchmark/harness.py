"""The benchmark loop: for each (shape, precision) build both modules, gate, time.

A (shape, precision) pair is a :class:`Job`; each of its modes yields one
:class:`Result` row with status ``ok`` (timed), ``mismatch`` (the gate refused it,
not timed) or ``error`` (an exception, e.g. an unsupported configuration).
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .algo import baseline_algo
from .candidates import CandidateFactory, last_path
from .flops import mode_flops, tflops
from .gate import GateResult, Tolerance, check_pair, tolerance_for
from .inputs import InputSet, build_pair, draw_inputs
from .shapes import AUTOCAST_DTYPES, CPU_DTYPES, DATA_INPUT_MODES, DTYPES, GRAD_MODES, MODES, Case, Shape, compute_dtype
from .timing import Stats, TimingConfig, measure_interleaved
from .workloads import make_workload

#: Receives one progress line at a time (the CLI prints them to stderr).
Progress = Callable[[str], None]

#: A timed row is noisy when either side's interquartile range exceeds this fraction of its median: its
#: speedup may be off by as much, so the report says "noisy: rerun". Over the 81 CPU runs on a shared 2-core
#: AMD EPYC that git history holds, 2.5% of the timed rows were above it.
NOISY_SPREAD = 0.25


@dataclasses.dataclass(frozen=True)
class Job:
    """One shape in one precision, timed in some modes."""

    shape: Shape
    group: str
    dtype: str
    modes: Tuple[str, ...]


@dataclasses.dataclass
class Result:
    """One row of the report. Times are medians in ms; ``None`` when not timed."""

    group: str
    T: int
    N: int
    I: int
    H: int
    layers: int
    bidirectional: bool
    packed: bool
    proj_size: int
    cell: bool
    dtype: str
    mode: str
    status: str
    torch_ms: Optional[float] = None
    torch_q1_ms: Optional[float] = None
    torch_q3_ms: Optional[float] = None
    torch_min_ms: Optional[float] = None
    torch_max_ms: Optional[float] = None
    fused_ms: Optional[float] = None
    fused_q1_ms: Optional[float] = None
    fused_q3_ms: Optional[float] = None
    fused_min_ms: Optional[float] = None
    fused_max_ms: Optional[float] = None
    repeats: Optional[int] = None
    speedup: Optional[float] = None
    gflop: float = 0.0
    fused_tflops: Optional[float] = None
    torch_tflops: Optional[float] = None
    torch_algo: str = ""
    fused_path: str = ""
    gate_tensor: str = ""
    gate_max_abs_err: Optional[float] = None
    gate_limit: Optional[float] = None
    message: str = ""

    @property
    def shape(self) -> Shape:
        """The measured shape."""
        return Shape(self.T, self.N, self.I, self.H, self.layers, self.bidirectional,
                     self.packed, self.proj_size, self.cell)

    @property
    def noisy(self) -> bool:
        """Timed, with a spread (IQR) above :data:`NOISY_SPREAD` of the median on either side."""
        sides = ((self.torch_ms, self.torch_q1_ms, self.torch_q3_ms), (self.fused_ms, self.fused_q1_ms,
                                                                       self.fused_q3_ms))
        return self.status == "ok" and any(
            None not in (median, q1, q3) and q3 - q1 > NOISY_SPREAD * median for median, q1, q3 in sides)

    def speedup_range(self) -> Optional[Tuple[float, float]]:
        """The speedup's spread from the quartiles: (torch q1 / fused q3, torch q3 / fused q1)."""
        quartiles = (self.torch_q1_ms, self.torch_q3_ms, self.fused_q1_ms, self.fused_q3_ms)
        if self.speedup is None or None in quartiles or not self.fused_q1_ms or not self.fused_q3_ms:
            return None
        low, high = self.torch_q1_ms / self.fused_q3_ms, self.torch_q3_ms / self.fused_q1_ms
        return min(low, self.speedup), max(high, self.speedup)

    def as_dict(self) -> Dict[str, object]:
        """Plain dict (field order kept) for JSON/CSV."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, row: Dict[str, object]) -> "Result":
        """A row as :meth:`as_dict` (or an older ``results.json``) wrote it; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})  # type: ignore[arg-type]


@dataclasses.dataclass
class BenchmarkConfig:
    """How to run: where, how long, how strict."""

    device: torch.device
    timing: TimingConfig = dataclasses.field(default_factory=TimingConfig)
    seed: int = 0
    tolerance: Optional[Tolerance] = None


def plan_jobs(cases: Sequence[Case], default_modes: Sequence[str], default_dtypes: Sequence[str],
              device: torch.device, modes: Optional[Sequence[str]] = None,
              dtypes: Optional[Sequence[str]] = None) -> List[Job]:
    """Expand cases into jobs. Explicit ``modes``/``dtypes`` override each case's own.

    On CPU only :data:`CPU_DTYPES` are kept from preset defaults (callers must reject
    an explicitly requested fp16 themselves, with a message).
    """
    jobs = []
    for case in cases:
        case_modes = tuple(m for m in MODES if m in (modes or case.modes or default_modes))
        case_dtypes = tuple(dtypes or case.dtypes or default_dtypes)
        if device.type != "cuda":
            case_dtypes = tuple(d for d in case_dtypes if d in CPU_DTYPES)
        jobs.extend(Job(case.shape, case.group, d, case_modes) for d in case_dtypes if case_modes)
    return jobs


def run_benchmark(jobs: Sequence[Job], factory: CandidateFactory, config: BenchmarkConfig,
                  progress: Optional[Progress] = None, results: Optional[List[Result]] = None) -> List[Result]:
    """Gate and time every job; never raises for a single bad shape. Results are appended to ``results``
    (a new list if None) as they come, so a caller that is interrupted still has what was measured."""
    total = sum(len(j.modes) for j in jobs)
    results = [] if results is None else results
    for job in jobs:
        for result in _run_job(job, factory, config):
            results.append(result)
            if progress:
                progress(f"[{len(results)}/{total}] {progress_line(result)}")
    return results


def _base(job: Job, mode: str, device: torch.device) -> Result:
    s = job.shape
    return Result(job.group, s.T, s.N, s.I, s.H, s.layers, s.bidirectional, s.packed, s.proj_size, s.cell,
                  job.dtype, mode, "error", gflop=mode_flops(s, mode) / 1e9,
                  torch_algo=baseline_algo(s, compute_dtype(job.dtype), mode, device))


def _run_job(job: Job, factory: CandidateFactory, config: BenchmarkConfig) -> List[Result]:
    device, dtype, autocast = config.device, DTYPES[job.dtype], AUTOCAST_DTYPES.get(job.dtype)
    rows = {m: _base(job, m, device) for m in job.modes}
    try:
        reference, candidate = build_pair(job.shape, dtype, device, factory, config.seed, autocast=autocast)
        inputs = draw_inputs(job.shape, dtype, device, config.timing.n_inputs, config.seed + 1)
        tol = tolerance_for(job.dtype, device, config.tolerance)
        gates: Dict[Tuple[bool, bool], GateResult] = {}
        for mode in job.modes:
            kind = (mode in GRAD_MODES, mode in DATA_INPUT_MODES)  # (gradients, of the weights only)
            if kind not in gates:
                gates[kind] = check_pair(reference, candidate, inputs[0], kind[0], tol, data_input=kind[1],
                                         autocast=autocast is not None)
            _fill(rows[mode], gates[kind], reference, candidate, inputs, config)
    except Exception as exc:  # keep going: record the failure against the remaining modes
        for row in rows.values():
            if row.status == "error" and not row.message:
                row.message = _one_line(f"{type(exc).__name__}: {exc}")
    finally:
        _release(device)
    return list(rows.values())


def _one_line(text: str, limit: int = 300) -> str:
    """Collapse whitespace (exception texts span lines) and cap the length for tables."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fill(row: Result, gate: GateResult, reference: torch.nn.Module, candidate: torch.nn.Module,
          inputs: Sequence[InputSet], config: BenchmarkConfig) -> None:
    """Record the gate outcome in ``row`` and, if it passed, time the mode."""
    worst = gate.worst
    row.gate_tensor, row.gate_max_abs_err, row.gate_limit = worst.name, worst.max_abs, worst.limit
    if not gate.ok:
        row.status, row.message = "mismatch", gate.summary()
        return
    workloads = [make_workload(reference, row.mode), make_workload(candidate, row.mode)]
    ref_stats, cand_stats = measure_interleaved(workloads, inputs, config.device, config.timing)
    row.fused_path = last_path(candidate) or ""
    _set_times(row, "torch", ref_stats)
    _set_times(row, "fused", cand_stats)
    row.repeats = min(ref_stats.repeats, cand_stats.repeats)
    row.speedup = ref_stats.median_ms / cand_stats.median_ms if cand_stats.median_ms > 0 else None
    flops = mode_flops(row.shape, row.mode)
    row.fused_tflops = tflops(flops, cand_stats.median_ms)
    row.torch_tflops = tflops(flops, ref_stats.median_ms)
    row.status, row.message = "ok", gate.arbitrated


def _set_times(row: Result, prefix: str, stats: Stats) -> None:
    for field, value in (("ms", stats.median_ms), ("q1_ms", stats.q1_ms), ("q3_ms", stats.q3_ms),
                         ("min_ms", stats.min_ms), ("max_ms", stats.max_ms)):
        setattr(row, f"{prefix}_{field}", value)


def _release(device: torch.device) -> None:
    """Free the job's tensors before the next one (matters for large GPU shapes)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def progress_line(r: Result) -> str:
    """One line describing a finished row, e.g. for stderr."""
    head = f"{r.shape.label()} {r.dtype} {r.mode}"
    if r.status == "ok":
        tf = f"  {r.fused_tflops:.2f} TFLOP/s" if r.fused_tflops is not None else ""
        noisy = "  (noisy: rerun)" if r.noisy else ""
        return (f"{head}: torch {r.torch_ms:.3f} ms, fused {r.fused_ms:.3f} ms, "
                f"{r.speedup:.2f}x{tf}{noisy}")
    return f"{head}: {r.status.upper()} {r.message}"
