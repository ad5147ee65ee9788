"""Presenting results: terminal table, results.json/.csv/.md and speedup.png."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .flops import FLOP_FORMULA
from .harness import NOISY_SPREAD, Result
from .shapes import DTYPES, MODES

#: Output file names inside ``--out``.
FILES = {"json": "results.json", "csv": "results.csv", "md": "results.md", "png": "speedup.png"}


def _ms(median: Optional[float], q1: Optional[float], q3: Optional[float]) -> str:
    if median is None or q1 is None or q3 is None:
        return "-"
    return f"{median:.3f} ±{q3 - q1:.3f}"


def _num(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _status(r: Result) -> str:
    if r.status == "ok":
        ok = f"ok ({r.message})" if r.message else "ok"
        return f"{ok}, noisy: rerun" if r.noisy else ok
    return f"{r.status.upper()}: {r.message}"


#: (header, cell) for the terminal and markdown tables.
COLUMNS: Tuple[Tuple[str, Callable[[Result], str]], ...] = (
    ("shape", lambda r: f"T={r.T} N={r.N} I={r.I} H={r.H}"),
    ("topology", lambda r: r.shape.topology()),
    ("dtype", lambda r: r.dtype),
    ("mode", lambda r: r.mode),
    ("torch ms ±IQR", lambda r: _ms(r.torch_ms, r.torch_q1_ms, r.torch_q3_ms)),
    ("fused ms ±IQR", lambda r: _ms(r.fused_ms, r.fused_q1_ms, r.fused_q3_ms)),
    ("speedup", lambda r: _num(r.speedup, ".2f") + ("x" if r.speedup is not None else "")),
    ("GFLOP", lambda r: f"{r.gflop:.3g}"),
    ("fused TFLOP/s", lambda r: _num(r.fused_tflops, ".3f")),
    ("torch algo", lambda r: r.torch_algo),
    ("fused path", lambda r: r.fused_path),
    ("status", _status),
)


def table_rows(results: Sequence[Result]) -> Tuple[List[str], List[List[str]]]:
    """Header and cell strings of the results table."""
    return [h for h, _ in COLUMNS], [[cell(r) for _, cell in COLUMNS] for r in results]


def format_table(results: Sequence[Result]) -> str:
    """Fixed-width text table for the terminal, followed by the FLOP rule."""
    header, rows = table_rows(results)
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *map(line, rows), "", f"FLOPs: {FLOP_FORMULA}"])


def format_markdown_table(results: Sequence[Result]) -> str:
    """GitHub-flavoured markdown table of the results."""
    header, rows = table_rows(results)

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def geomean_speedups(results: Sequence[Result]) -> Dict[str, Dict[str, Any]]:
    """Per ``"mode dtype"`` over timed rows: geometric-mean speedup, count, and the worst row."""
    groups: Dict[str, List[Result]] = defaultdict(list)
    for r in results:
        if r.speedup:
            groups[f"{r.mode} {r.dtype}"].append(r)
    summary = {}
    for key, rows in groups.items():
        worst = min(rows, key=lambda r: r.speedup or 0.0)
        summary[key] = {"geomean_speedup": math.exp(sum(math.log(r.speedup or 1.0) for r in rows) / len(rows)),
                        "count": len(rows), "worst_speedup": worst.speedup, "worst_shape": worst.shape.label()}
    return summary


def summarize(results: Sequence[Result]) -> Dict[str, Any]:
    """Counts by status, noisy rows, and per-mode speedups (geomean, worst)."""
    counts: Dict[str, int] = defaultdict(int)
    for r in results:
        counts[r.status] += 1
    return {"status_counts": dict(counts), "noisy": sum(r.noisy for r in results),
            "speedup": geomean_speedups(results)}


def format_summary(results: Sequence[Result]) -> str:
    """A few closing lines for the terminal."""
    summary = summarize(results)
    lines = ["status: " + ", ".join(f"{k}={v}" for k, v in sorted(summary["status_counts"].items()))]
    lines += [f"geomean speedup {k}: {v['geomean_speedup']:.2f}x over {v['count']} shapes "
              f"(worst {v['worst_speedup']:.2f}x at {v['worst_shape']})"
              for k, v in summary["speedup"].items()]
    if summary["noisy"]:
        lines.append(f"noisy: {summary['noisy']} rows have a spread (IQR) above {NOISY_SPREAD:.0%} of their "
                     "median: rerun them, on a quieter machine or with --threads 1")
    return "\n".join(lines)


def write_json(path: Path, results: Sequence[Result], environment: Mapping[str, Any],
               settings: Mapping[str, Any]) -> None:
    """``results.json``: environment, settings, FLOP rule, summary and every row."""
    doc = {
        "environment": dict(environment),
        "settings": dict(settings),
        "flop_formula": FLOP_FORMULA,
        "summary": summarize(results),
        "results": [{**r.as_dict(), "noisy": r.noisy} for r in results],
    }
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")


def write_csv(path: Path, results: Sequence[Result]) -> None:
    """``results.csv``: one row per result, every field."""
    fields = [f.name for f in dataclasses.fields(Result)]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(r.as_dict() for r in results)


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> List[Tuple[str, Any]]:
    items: List[Tuple[str, Any]] = []
    for key, value in mapping.items():
        if isinstance(value, Mapping) and value:
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


#: Environment entries that describe CUDA only (versions, TF32 switches, CUDA's environment variables).
_CUDA_ONLY = ("cuda", "cudnn", "cudnn_enabled", "tf32.", "fused_lstm_build_info.cuda",
              "env_vars.CUDA_", "env_vars.NVIDIA_", "env_vars.CUBLAS_", "env_vars.TORCH_ALLOW_TF32")


def environment_rows(environment: Mapping[str, Any]) -> List[Tuple[str, str]]:
    """(key, value) rows of the environment that apply to the run's device: no CUDA rows on a CPU run."""
    cpu = str(environment.get("device", "")).startswith("cpu")
    rows = []
    for key, value in _flatten(environment):
        if cpu and (key == "device_name" or any(key == c or key.startswith(c) for c in _CUDA_ONLY)):
            continue  # device_name repeats cpu_model on a CPU
        if key == "env_vars" and not value:
            value = "none set"
        rows.append((key, "" if value is None else str(value)))
    return rows


def device_line(environment: Mapping[str, Any]) -> str:
    """The measured device in words, e.g. ``CPU: AMD EPYC, 2 cores, 2 torch threads (AVX512)``."""
    env = environment
    if str(env.get("device", "")).startswith("cuda"):
        return (f"GPU: {env.get('device_name')} (compute capability {env.get('compute_capability')}, "
                f"{env.get('sm_count')} SMs), CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}")
    return (f"CPU: {env.get('cpu_model')}, {env.get('cpu_count')} cores, {env.get('torch_threads')} torch "
            f"threads ({env.get('torch_cpu_capability')})")


def write_markdown(path: Path, results: Sequence[Result], environment: Mapping[str, Any]) -> None:
    """``results.md``: summary, results table and FLOP rule, then the environment that applies."""
    commit = str(environment.get("git_commit") or "unknown")[:12]
    text = "\n".join([
        "# fused_lstm vs torch.nn.LSTM", "",
        f"{device_line(environment)}; torch {environment.get('torch')}; commit {commit}; "
        f"{environment.get('date')}.", "",
        "## Summary", "", *[f"- {line}" for line in format_summary(results).splitlines()], "",
        "## Results", "",
        "Times are medians in ms (± interquartile range); speedup = torch / fused. A row whose spread exceeds "
        f"{NOISY_SPREAD:.0%} of its median on either side says `noisy: rerun`.", "",
        format_markdown_table(results), "",
        f"FLOPs: {FLOP_FORMULA}.", "",
        "## Environment", "", "| key | value |", "|---|---|",
        *[f"| {k} | {v.replace('|', chr(92) + '|')} |" for k, v in environment_rows(environment)], "",
    ])
    path.write_text(text)


def _panel_order(key: Tuple[str, str]) -> Tuple[int, int]:
    mode, dtype = key
    return MODES.index(mode), list(DTYPES).index(dtype)


#: Tick values offered on the log-scaled speedup axis.
_SPEEDUP_TICKS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0, 20.0,
                  50.0, 100.0)


def plot_speedup(path: Path, results: Sequence[Result]) -> None:
    """``speedup.png``: one panel per (mode, dtype), one labelled point per shape (speedup on a log scale,
    the quartile range as an error bar, noisy rows in orange), a dashed line at parity.

    Panels that time the same shapes share their shape labels side by side; otherwise they stack.
    """
    from matplotlib.figure import Figure  # Agg via Figure.savefig; no pyplot state

    timed = [r for r in results if r.speedup]
    panels: Dict[Tuple[str, str], List[Result]] = defaultdict(list)
    for r in timed:
        panels[(r.mode, r.dtype)].append(r)
    keys = sorted(panels, key=_panel_order)
    labels = [[r.shape.label() for r in panels[k]] for k in keys]
    side_by_side = len(keys) > 1 and all(lab == labels[0] for lab in labels)
    longest = max((len(x) for lab in labels for x in lab), default=10)
    if side_by_side or len(keys) <= 1:
        shapes = len(labels[0]) if labels else 1
        cols = max(1, len(keys))
        fig = Figure(figsize=(0.075 * longest + 3.2 * cols + 0.5, 0.3 * shapes + 1.6), layout="constrained")
        axes = fig.subplots(1, cols, sharey=True, squeeze=False).ravel()
    else:
        heights = [len(lab) + 2 for lab in labels]
        fig = Figure(figsize=(0.075 * longest + 6.0, 0.3 * sum(heights) + 1.2), layout="constrained")
        axes = fig.subplots(len(keys), 1, squeeze=False, gridspec_kw={"height_ratios": heights}).ravel()
    for ax, key in zip(axes, keys):
        _draw_panel(ax, " ".join(key), panels[key], show_labels=ax is axes[0] or not side_by_side)
    if not keys:
        axes[0].text(0.5, 0.5, "no timed results", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    fig.suptitle("fused_lstm speedup over torch.nn.LSTM: torch ms / fused ms (> 1: fused_lstm faster)\n"
                 "bars: interquartile ranges; orange: noisy, rerun", fontsize="medium")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _log_ticks(low: float, high: float) -> List[float]:
    """Ticks from :data:`_SPEEDUP_TICKS` within [low, high], 1.0 always, spaced evenly enough to be read."""
    gap = max(math.log(1.2), math.log(high / low) / 7)
    ticks = [1.0]
    for t in (t for t in _SPEEDUP_TICKS if 1.0 < t <= high):
        if math.log(t / ticks[-1]) >= gap:
            ticks.append(t)
    for t in (t for t in reversed(_SPEEDUP_TICKS) if low <= t < 1.0):
        if math.log(ticks[0] / t) >= gap:
            ticks.insert(0, t)
    return ticks


def _draw_panel(ax: Any, title: str, rows: Sequence[Result], show_labels: bool) -> None:
    y = list(range(len(rows)))
    speedups = [r.speedup or 1.0 for r in rows]
    ranges = [r.speedup_range() or (s, s) for r, s in zip(rows, speedups)]
    colors = ["tab:orange" if r.noisy else "tab:blue" for r in rows]
    for yi, s, (low, high), color in zip(y, speedups, ranges, colors):
        ax.errorbar([s], [yi], xerr=[[s - low], [high - s]], fmt="o", color=color, capsize=2, markersize=4)
        ax.annotate(f"{s:.2f}x", (s, yi), xytext=(0, 4), textcoords="offset points", ha="center",
                    va="bottom", fontsize="x-small", color=color,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.3, "alpha": 0.8})
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    # Keep at least 0.8x..1.25x visible so noise around parity does not look like a trend.
    low = min([0.8, *(r[0] for r in ranges)]) / 1.1
    high = max([1.25, *(r[1] for r in ranges)]) * 1.1
    ax.set_xlim(low, high)
    ticks = _log_ticks(low, high)
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.minorticks_off()
    if show_labels:
        ax.set_yticks(y, [r.shape.label() for r in rows], fontsize="small")
    else:  # shares the first panel's shape labels
        ax.tick_params(labelleft=False)
    ax.set_ylim(len(rows) - 0.5, -0.8)  # first shape on top, room for its value
    ax.set_title(title)
    ax.set_xlabel("speedup (log scale)")
    ax.grid(True, axis="x", alpha=0.3)


def write_outputs(out_dir: Path, results: Sequence[Result], environment: Mapping[str, Any],
                  settings: Mapping[str, Any]) -> Dict[str, Path]:
    """Write all four files into ``out_dir`` (created if needed); return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / name for kind, name in FILES.items()}
    write_json(paths["json"], results, environment, settings)
    write_csv(paths["csv"], results)
    write_markdown(paths["md"], results, environment)
    plot_speedup(paths["png"], results)
    return paths
