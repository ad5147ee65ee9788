"""``benchmarks/RESULTS.md``: one page generated from the runs kept under ``benchmarks/results/``.

``python -m fused_lstm.benchmark --results-md`` finds every ``results.json`` there, re-renders each run's
``results.md`` and ``speedup.png`` from it (so they follow the current report format), and writes one section
per hardware class: where and how the run was made, the geometric-mean and worst speedup per mode, the plot,
and one table with every shape and mode side by side.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Sequence, Tuple

from .harness import NOISY_SPREAD, Result
from .report import FILES, device_line, plot_speedup, summarize, write_markdown
from .shapes import MODES

#: The page's name inside the benchmarks directory, and the runs' folder next to it.
PAGE = "RESULTS.md"
RUNS = "results"


class Run(NamedTuple):
    """One kept benchmark run, as its ``results.json`` holds it."""

    path: Path  # the results.json
    environment: Dict[str, Any]
    settings: Dict[str, Any]
    results: List[Result]


def load_run(path: Path) -> Run:
    """Read a ``results.json`` written by :func:`fused_lstm.benchmark.report.write_json`."""
    doc = json.loads(path.read_text())
    return Run(path, doc.get("environment", {}), doc.get("settings", {}),
               [Result.from_dict(row) for row in doc.get("results", [])])


def find_runs(runs_dir: Path) -> List[Run]:
    """Every run under ``runs_dir``, in path order. A results.json below a folder that has its own (a raw copy,
    as benchmarks/device_check.sh keeps one) is part of that run, not another."""
    paths = sorted(runs_dir.rglob(FILES["json"]))
    folders = {p.parent for p in paths}
    return [load_run(p) for p in paths if not folders.intersection(p.parent.parents)]


def _what_ran(settings: Mapping[str, Any]) -> str:
    if settings.get("shape"):
        what = "custom shapes " + ", ".join(f"`{s}`" for s in settings["shape"])
    else:
        what = f"`--preset {settings.get('preset', '?')}`"
    for option in ("modes", "dtypes", "filter", "threads"):
        value = settings.get(option)
        if value:
            what += f" `--{option} {','.join(value) if isinstance(value, list) else value}`"
    return what


def _run_line(run: Run, base: Path) -> str:
    env, folder = run.environment, run.path.parent.relative_to(base).as_posix()
    env_vars = env.get("env_vars") or {}
    variables = ", ".join(f"`{k}={v}`" for k, v in env_vars.items()) if env_vars else "none set"
    build = env.get("fused_lstm_build_info")
    kernels = build.get("cpu_kernels") if isinstance(build, dict) and env.get("device") == "cpu" else None
    parts = [f"{_what_ran(run.settings)}, {str(env.get('date', '?'))[:10]}",
             f"commit `{str(env.get('git_commit') or 'unknown')[:7]}`", f"torch {env.get('torch')}"]
    if kernels:
        parts.append(f"fused_lstm CPU kernels {kernels}")
    parts.append(f"timing-relevant environment variables: {variables}")
    if run.settings.get("interrupted"):
        parts.append("**interrupted: not every planned row was measured**")
    files = [("conditions", "README.md"), ("table", FILES["md"]), ("JSON", FILES["json"]), ("plot", FILES["png"])]
    links = ", ".join(f"[{name}]({folder}/{file})" for name, file in files if (run.path.parent / file).exists())
    name = folder[len(RUNS) + 1:] if folder.startswith(f"{RUNS}/") else folder
    return f"Run `{name}` ({links}): " + "; ".join(parts) + "."


def format_summary_table(results: Sequence[Result]) -> str:
    """Per mode and dtype: shapes, geometric-mean speedup, worst speedup and its shape."""
    noisy: Dict[str, int] = defaultdict(int)
    for r in results:
        noisy[f"{r.mode} {r.dtype}"] += r.noisy
    lines = ["| mode | dtype | shapes | geomean speedup | worst speedup (shape) | noisy rows |",
             "|---|---|---|---|---|---|"]
    for key, v in summarize(results)["speedup"].items():
        mode, dtype = key.split(" ")
        lines.append(f"| {mode} | {dtype} | {v['count']} | {v['geomean_speedup']:.2f}x | "
                     f"{v['worst_speedup']:.2f}x ({v['worst_shape']}) | {noisy[key]} |")
    return "\n".join(lines)


def _cells(r: Result) -> Tuple[str, str, str]:
    if r.status != "ok" or r.speedup is None:
        return "-", "-", r.status.upper()
    speedup = f"{r.speedup:.2f}x" + (" (noisy)" if r.noisy else "")
    return f"{r.torch_ms:.3f}", f"{r.fused_ms:.3f}", speedup


def format_wide_table(results: Sequence[Result]) -> str:
    """One row per shape (and dtype), each mode's torch ms, fused ms and speedup side by side."""
    modes = [m for m in MODES if any(r.mode == m for r in results)]
    dtypes = sorted({r.dtype for r in results})
    rows: Dict[Tuple[Any, ...], Dict[str, Result]] = {}
    for r in results:
        rows.setdefault((r.shape, r.dtype), {})[r.mode] = r
    header = ["T", "N", "I", "H", "topology"] + (["dtype"] if len(dtypes) > 1 else [])
    for m in modes:
        header += [f"{m}: torch ms", "fused ms", "speedup"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (shape, dtype), by_mode in rows.items():
        cells = [str(shape.T), str(shape.N), str(shape.I), str(shape.H), shape.topology()]
        cells += [dtype] if len(dtypes) > 1 else []
        for m in modes:
            cells += list(_cells(by_mode[m])) if m in by_mode else ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_page(runs: Sequence[Run], base: Path) -> str:
    """The whole page; links are relative to ``base`` (the page's folder)."""
    classes: Dict[str, List[Run]] = defaultdict(list)
    for run in runs:
        classes[device_line(run.environment)].append(run)
    out = [
        "# Benchmark results", "",
        "Generated by `python3 -m fused_lstm.benchmark --results-md` from the runs kept under "
        f"`benchmarks/{RUNS}/` (one current run per hardware class; git history holds the older ones). "
        "Do not edit by hand: regenerate.", "",
        "Times are medians of interleaved calls of both libraries in one process, in ms; speedup = torch.nn.LSTM "
        "time / fused_lstm time (> 1: fused_lstm is faster). `train` takes the gradients of the input and all "
        "weights, `train_weights` of the weights only (the input is data). A speedup marked *noisy* had an "
        f"interquartile range above {NOISY_SPREAD:.0%} of the median on one side: rerun before reading it. "
        "How the numbers are taken: [README.md](README.md).", "",
    ]
    if not runs:
        out += ["No runs are kept yet.", ""]
    for device, class_runs in classes.items():
        out += [f"## {device}", ""]
        for run in class_runs:
            folder = run.path.parent.relative_to(base).as_posix()
            out += [_run_line(run, base), "", format_summary_table(run.results), "",
                    f"![speedup per shape]({folder}/{FILES['png']})", "", format_wide_table(run.results), ""]
    return "\n".join(out)


def write_results_page(benchmarks_dir: Path) -> Tuple[Path, List[Run]]:
    """Re-render every kept run's markdown and plot from its JSON, then write ``benchmarks_dir/RESULTS.md``."""
    runs = find_runs(benchmarks_dir / RUNS)
    for run in runs:
        write_markdown(run.path.parent / FILES["md"], run.results, run.environment)
        plot_speedup(run.path.parent / FILES["png"], run.results)
    page = benchmarks_dir / PAGE
    page.write_text(format_page(runs, benchmarks_dir))
    return page, runs
