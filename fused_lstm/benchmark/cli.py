"""Command line: ``python -m fused_lstm.benchmark --help``.

Exit status: 0 when every shape was timed, 1 when a shape was refused by the
correctness gate (unless ``--allow-mismatch``) or raised, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, TypeVar

import torch

from .candidates import candidate_name, resolve_candidate
from .env import collect_environment
from .gate import Tolerance
from .harness import BenchmarkConfig, Job, Result, plan_jobs, run_benchmark
from .report import format_summary, format_table, write_outputs
from .results_page import RUNS, write_results_page
from .shapes import CPU_DTYPES, DTYPES, MODES, PRESETS, Case, parse_names, parse_shape, select_cases
from .timing import TimingConfig

T = TypeVar("T")

#: The checkout's benchmarks/ folder: RESULTS.md and the kept runs under results/.
BENCHMARKS_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def _arg_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """Wrap a parser so its ``ValueError`` message reaches the user verbatim."""
    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise ValueError(f"must be > 0, got {text}")
        return value
    return _arg_type(parse)


def _non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < 0:
            raise ValueError(f"must be >= 0, got {text}")
        return value
    return _arg_type(parse)


#: What each mode times, for --help.
MODE_HELP = {
    "infer": "eval, forward under no_grad",
    "train": "forward + backward for the input and all weights",
    "train_weights": "forward + backward for the weights only, the input being data",
    "fwd": "forward with autograd recording",
    "bwd": "backward only; its forward runs untimed before each repeat",
}

#: The --shape format.
SHAPE_FIELDS = "T,N,I,H[,layers[,bidir[,packed[,proj_size]]]]"


def _preset_help() -> str:
    return "; ".join(f"{p.name}: {p.description} ({len(p.cases)} shapes)" for p in PRESETS.values())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by the tests)."""
    d = TimingConfig()
    p = argparse.ArgumentParser(
        prog="python -m fused_lstm.benchmark",
        description="Time fused_lstm.LSTM against torch.nn.LSTM (cuDNN on CUDA, oneDNN/ATen on CPU) "
                    "with identical weights. Every shape must first pass a correctness gate "
                    "(outputs, h_n, c_n and, when training, input/weight gradients); shapes that "
                    "disagree are reported as mismatches and not timed.",
        epilog="Exit status: 0 all timed, 1 mismatch or error (see --allow-mismatch), 2 bad arguments.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    what = p.add_argument_group("what to run")
    what.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                      help="shape set: " + _preset_help())
    what.add_argument("--shape", action="append", type=_arg_type(parse_shape), metavar=SHAPE_FIELDS,
                      help="custom shape (repeatable) replacing the preset's shapes: T sequence length, "
                           "N batch, I input size, H hidden size, then optional layers (default 1), "
                           "bidir 0/1, packed 0/1 (lengths spread 1..T), proj_size (default 0); modes and "
                           "dtypes still default to the preset's")
    what.add_argument("--modes", type=_arg_type(lambda s: parse_names(s, MODES, "mode")),
                      help="comma list of " + ", ".join(f"{m} ({MODE_HELP[m]})" for m in MODES)
                           + "; default: the preset's")
    what.add_argument("--dtypes", type=_arg_type(lambda s: parse_names(s, tuple(DTYPES), "dtype")),
                      help="comma list of fp32, bf16, fp16 (modules and inputs in that dtype), autocast-bf16, "
                           "autocast-fp16 (float32 modules and inputs under torch.autocast in that dtype); fp16 "
                           "needs CUDA; default: the preset's, less fp16 on CPU")
    what.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="where to run; auto = cuda if available, else cpu")
    what.add_argument("--candidate", default="fused",
                      help="implementation under test: 'fused' (fused_lstm.LSTM), 'torch' "
                           "(torch.nn.LSTM against itself, to check the harness) or 'package.module:Class'")
    what.add_argument("--filter", metavar="REGEX",
                      help="only shapes whose 'group T=.. N=.. I=.. H=.. topology' matches REGEX, "
                           "e.g. 'deepbench-infer' or 'H=1024'")
    what.add_argument("--max-shapes", type=_positive(int), metavar="K",
                      help="only the first K shapes (after --filter)")
    what.add_argument("--list", action="store_true", help="print the planned runs and exit")

    how = p.add_argument_group("measurement")
    how.add_argument("--warmup", type=_non_negative(int), default=d.warmup,
                     help="untimed calls per implementation before timing")
    how.add_argument("--min-repeats", type=_positive(int), default=d.min_repeats,
                     help="fewest timed calls per implementation")
    how.add_argument("--max-repeats", type=_positive(int), default=d.max_repeats,
                     help="most timed calls per implementation")
    how.add_argument("--min-time", type=_non_negative(float), default=d.min_time_s, metavar="SECONDS",
                     help="keep repeating until each implementation has this much measured time")
    how.add_argument("--max-time", type=_positive(float), default=d.max_time_s, metavar="SECONDS",
                     help="stop once an implementation has this much measured time "
                          "(and at least 3 calls), even below --min-repeats")
    how.add_argument("--inputs", type=_positive(int), default=d.n_inputs, metavar="K",
                     help="pre-drawn input sets rotated through, so caches favour neither side")
    how.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    how.add_argument("--threads", type=_positive(int),
                     help="torch.set_num_threads for CPU runs (default: torch's choice)")

    gate = p.add_argument_group("correctness gate")
    gate.add_argument("--rtol", type=_non_negative(float),
                      help="override the relative tolerance (default per dtype: fp32 1e-4, fp32 with "
                           "cuDNN TF32 5e-3, fp16 1e-2, bf16 4e-2), scaled by max|torch tensor|")
    gate.add_argument("--atol", type=_non_negative(float),
                      help="override the absolute tolerance (the other one defaults to the same value)")
    gate.add_argument("--allow-mismatch", action="store_true",
                      help="exit 0 even if some shapes were refused by the gate")

    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("benchmark-results"), metavar="DIR",
                     help="directory for results.json, results.csv, results.md and speedup.png")
    out.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    out.add_argument("--results-md", nargs="?", const=BENCHMARKS_DIR, type=Path, metavar="DIR",
                     help="run nothing: regenerate DIR/RESULTS.md from every results.json under DIR/results/ "
                          "(re-rendering each run's results.md and speedup.png from its JSON) and exit; DIR "
                          f"defaults to this checkout's {BENCHMARKS_DIR.name}/")
    return p


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; raises ``ValueError`` if cuda is missing."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return torch.device(name)


def _validate(args: argparse.Namespace, device: torch.device) -> Optional[str]:
    """A message for argument combinations argparse cannot check alone, else None."""
    if device.type == "cpu" and args.dtypes:
        bad = [d for d in args.dtypes if d not in CPU_DTYPES]
        if bad:
            return (f"--dtypes {','.join(bad)}: fp16 is only benchmarked on CUDA (CPU supports "
                    f"{', '.join(CPU_DTYPES)})")
    if args.max_repeats < args.min_repeats:
        return "--max-repeats must be >= --min-repeats"
    if args.max_time < args.min_time:
        return "--max-time must be >= --min-time"
    return None


def _cases(args: argparse.Namespace) -> List[Case]:
    cases = [Case(s) for s in args.shape] if args.shape else list(PRESETS[args.preset].cases)
    return select_cases(cases, args.filter, args.max_shapes)


def plan_from_args(args: argparse.Namespace, device: torch.device) -> List[Job]:
    """The jobs the arguments ask for."""
    preset = PRESETS[args.preset]
    return plan_jobs(_cases(args), preset.modes, preset.dtypes, device, args.modes, args.dtypes)


def _config(args: argparse.Namespace, device: torch.device) -> BenchmarkConfig:
    timing = TimingConfig(args.warmup, args.min_repeats, args.max_repeats, args.min_time,
                          args.max_time, args.inputs)
    tolerance = None
    if args.rtol is not None or args.atol is not None:
        rtol = args.atol if args.rtol is None else args.rtol
        tolerance = Tolerance(rtol, rtol if args.atol is None else args.atol)
    return BenchmarkConfig(device, timing, args.seed, tolerance)


def _settings(args: argparse.Namespace, jobs: Sequence[Job], seconds: float) -> Dict[str, Any]:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["shape"] = [s.label() for s in args.shape or []]
    settings["jobs"] = len(jobs)
    settings["wall_seconds"] = round(seconds, 2)
    return settings


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def exit_code(results: Sequence[Result], allow_mismatch: bool) -> int:
    """1 if anything raised, or mismatched without ``allow_mismatch``; else 0."""
    if any(r.status == "error" for r in results):
        return 1
    if not allow_mismatch and any(r.status == "mismatch" for r in results):
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.results_md is not None:
        if not (args.results_md / RUNS).is_dir():
            parser.error(f"--results-md: no {RUNS}/ folder in {args.results_md}")
        page, runs = write_results_page(args.results_md)
        print(f"wrote {page} from {len(runs)} runs")
        return 0
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    problem = _validate(args, device)
    if problem:
        parser.error(problem)
    jobs = plan_from_args(args, device)
    if not jobs:
        parser.error("no shapes selected (check --filter / --max-shapes / --modes)")
    if args.list:
        print("\n".join(f"{j.group:16} {j.shape.label():40} {j.dtype} {','.join(j.modes)}" for j in jobs))
        return 0
    try:
        factory = resolve_candidate(args.candidate)
    except ImportError as exc:
        parser.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    environment = collect_environment(device, candidate_name(factory))
    results: List[Result] = []
    interrupted = False
    # A time limit (timeout sends SIGTERM) or Ctrl-C still leaves the rows measured so far on disk.
    previous_handler = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        run_benchmark(jobs, factory, _config(args, device), None if args.quiet else _stderr, results)
    except KeyboardInterrupt:
        interrupted = True
        _stderr(f"interrupted after {len(results)} of {sum(len(j.modes) for j in jobs)} rows: writing those")
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    seconds = time.perf_counter() - start

    print(format_table(results))
    print(format_summary(results))
    settings = _settings(args, jobs, seconds)
    settings["interrupted"] = interrupted
    paths = write_outputs(args.out, results, environment, settings)
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {seconds:.1f} s")
    return 130 if interrupted else exit_code(results, args.allow_mismatch)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
