"""Timing: interleaved repeats of several workloads, with robust statistics.

* CUDA: a ``torch.cuda.Event`` pair around each call (device time, including any
  idle gaps caused by host-side launch overhead); the device is synchronised
  before the start event so untimed ``prepare`` work never leaks in.
* CPU: ``time.perf_counter`` around each call.

The implementations are interleaved round by round (A,B then B,A, ...), each round
using the next of a few pre-drawn input sets, until every implementation has at
least ``min_repeats`` samples *and* ``min_time_s`` of measured time, or a cap is hit.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, List, Sequence

import torch

from .inputs import InputSet
from .workloads import Workload

#: Fewest samples kept even when ``max_time_s`` is exceeded.
MIN_SAMPLES = 3


@dataclasses.dataclass(frozen=True)
class TimingConfig:
    """Repeat and time budget of one measurement (per implementation)."""

    warmup: int = 3
    min_repeats: int = 10
    max_repeats: int = 1000
    min_time_s: float = 0.2
    max_time_s: float = 5.0
    n_inputs: int = 3

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.min_repeats < 1 or self.n_inputs < 1:
            raise ValueError("warmup must be >= 0, min_repeats and n_inputs >= 1")
        if self.max_repeats < self.min_repeats:
            raise ValueError("max_repeats must be >= min_repeats")
        if self.min_time_s < 0 or self.max_time_s < self.min_time_s:
            raise ValueError("need 0 <= min_time_s <= max_time_s")


@dataclasses.dataclass(frozen=True)
class Stats:
    """Summary of one implementation's samples, in milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> "Stats":
        """Statistics of ``samples_ms`` (at least one sample)."""
        ordered = sorted(samples_ms)
        if len(ordered) > 1:
            q1, median, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        else:
            q1 = median = q3 = ordered[0]
        return cls(median, q1, q3, ordered[0], ordered[-1], len(ordered))

    @property
    def iqr_ms(self) -> float:
        """Interquartile range."""
        return self.q3_ms - self.q1_ms


def make_clock(device: torch.device) -> Callable[[Callable[[Any], Any], Any], float]:
    """A function ``clock(run, state) -> milliseconds`` for ``device``."""
    if device.type == "cuda":
        return _cuda_clock(device)
    return _cpu_clock


def _cpu_clock(run: Callable[[Any], Any], state: Any) -> float:
    start = time.perf_counter()
    run(state)
    return (time.perf_counter() - start) * 1e3


def _cuda_clock(device: torch.device) -> Callable[[Callable[[Any], Any], Any], float]:
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)

    def clock(run: Callable[[Any], Any], state: Any) -> float:
        torch.cuda.synchronize(device)
        start.record()
        run(state)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    return clock


def _done(samples: List[float], config: TimingConfig) -> bool:
    n, spent_s = len(samples), sum(samples) * 1e-3
    if n >= config.max_repeats:
        return True
    if n >= config.min_repeats and spent_s >= config.min_time_s:
        return True
    return n >= MIN_SAMPLES and spent_s >= config.max_time_s


def measure_interleaved(workloads: Sequence[Workload], inputs: Sequence[InputSet],
                        device: torch.device, config: TimingConfig) -> List[Stats]:
    """Time ``workloads`` interleaved on rotating ``inputs``; one :class:`Stats` each."""
    clock = make_clock(device)
    for w in workloads:
        for i in range(config.warmup):
            w.run(w.prepare(inputs[i % len(inputs)]))
    samples: List[List[float]] = [[] for _ in workloads]
    rounds = 0
    while not all(_done(s, config) for s in samples):
        order = range(len(workloads)) if rounds % 2 == 0 else reversed(range(len(workloads)))
        inp = inputs[rounds % len(inputs)]
        for k in order:
            state = workloads[k].prepare(inp)
            samples[k].append(clock(workloads[k].run, state))
            del state
        rounds += 1
    return [Stats.of(s) for s in samples]
