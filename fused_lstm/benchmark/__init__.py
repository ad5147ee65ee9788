"""Benchmark suite: ``fused_lstm.LSTM`` against ``torch.nn.LSTM`` (cuDNN on CUDA).

Run ``python -m fused_lstm.benchmark --help``. Programmatic use::

    from fused_lstm.benchmark import PRESETS, BenchmarkConfig, plan_jobs, run_benchmark
    jobs = plan_jobs(PRESETS["quick"].cases, ("infer",), ("fp32",), torch.device("cpu"))
    results = run_benchmark(jobs, torch.nn.LSTM, BenchmarkConfig(torch.device("cpu")))

Nothing here imports the compiled extension: the candidate (default
``fused_lstm.LSTM``) is resolved only when a run starts, so any LSTM-like
factory can be benchmarked or used to test the harness.

Modules: ``shapes`` (shapes, presets), ``flops`` (FLOP counts), ``algo`` (cuDNN
algorithm torch picks), ``candidates`` (implementation under test), ``inputs``
(weights and inputs), ``workloads`` (what each mode runs), ``gate`` (correctness
gate), ``timing`` (interleaved timing), ``harness`` (the loop), ``env``
(environment), ``report`` (table/JSON/CSV/markdown/PNG), ``results_page`` (benchmarks/RESULTS.md from
the kept runs), ``cli``.
"""

from .candidates import resolve_candidate
from .gate import GateResult, Tolerance, check_pair
from .harness import BenchmarkConfig, Job, Result, plan_jobs, run_benchmark
from .shapes import MODES, PRESETS, Case, Preset, Shape, parse_shape
from .timing import Stats, TimingConfig

__all__ = [
    "BenchmarkConfig", "Case", "GateResult", "Job", "MODES", "PRESETS", "Preset", "Result",
    "Shape", "Stats", "Tolerance", "TimingConfig", "check_pair", "parse_shape", "plan_jobs",
    "resolve_candidate", "run_benchmark",
]
