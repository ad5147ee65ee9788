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
from .harness import Result
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
    return r.status if r.status == "ok" else f"{r.status.upper()}: {r.message}"


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


def geomean_speedups(results: Sequence[Result]) -> Dict[str, Dict[str, float]]:
    """Geometric-mean speedup and count per ``"mode dtype"`` over timed rows."""
    groups: Dict[str, List[float]] = defaultdict(list)
    for r in results:
        if r.speedup:
            groups[f"{r.mode} {r.dtype}"].append(r.speedup)
    return {k: {"geomean_speedup": math.exp(sum(map(math.log, v)) / len(v)), "count": len(v)}
            for k, v in groups.items()}


def summarize(results: Sequence[Result]) -> Dict[str, Any]:
    """Counts by status plus geometric-mean speedups."""
    counts: Dict[str, int] = defaultdict(int)
    for r in results:
        counts[r.status] += 1
    return {"status_counts": dict(counts), "speedup": geomean_speedups(results)}


def format_summary(results: Sequence[Result]) -> str:
    """A few closing lines for the terminal."""
    summary = summarize(results)
    lines = ["status: " + ", ".join(f"{k}={v}" for k, v in sorted(summary["status_counts"].items()))]
    lines += [f"geomean speedup {k}: {v['geomean_speedup']:.2f}x over {v['count']} shapes"
              for k, v in summary["speedup"].items()]
    return "\n".join(lines)


def write_json(path: Path, results: Sequence[Result], environment: Mapping[str, Any],
               settings: Mapping[str, Any]) -> None:
    """``results.json``: environment, settings, FLOP rule, summary and every row."""
    doc = {
        "environment": dict(environment),
        "settings": dict(settings),
        "flop_formula": FLOP_FORMULA,
        "summary": summarize(results),
        "results": [r.as_dict() for r in results],
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


def write_markdown(path: Path, results: Sequence[Result], environment: Mapping[str, Any]) -> None:
    """``results.md``: environment header, results table, FLOP rule and summary."""
    env_lines = [f"| {k} | {'' if v is None else v} |" for k, v in _flatten(environment)]
    text = "\n".join([
        "# fused_lstm vs torch.nn.LSTM", "",
        "## Environment", "", "| key | value |", "|---|---|", *env_lines, "",
        "## Results", "",
        "Times are medians in ms (± interquartile range); speedup = torch / fused.", "",
        format_markdown_table(results), "",
        f"FLOPs: {FLOP_FORMULA}.", "",
        "## Summary", "", *[f"- {line}" for line in format_summary(results).splitlines()], "",
    ])
    path.write_text(text)


def _line_label(r: Result, vary_t: bool) -> str:
    """Legend label of the line a row belongs to: hidden size, plus what else varies."""
    parts = [f"H={r.H}"]
    if vary_t:
        parts.append(f"T={r.T}")
    if r.I != r.H:
        parts.append(f"I={r.I}")
    if r.shape.topology() != "L1 uni":
        parts.append(r.shape.topology())
    return " ".join(parts)


def _series(rows: Sequence[Result], vary_t: bool) -> Dict[str, List[Tuple[int, float]]]:
    """Lines of one panel: label -> (batch, speedup) points sorted by batch."""
    lines: Dict[str, Dict[int, float]] = defaultdict(dict)
    for r in sorted(rows, key=lambda r: (r.H, r.T, r.I, r.shape.topology())):
        lines[_line_label(r, vary_t)].setdefault(r.N, r.speedup or 0.0)
    return {label: sorted(points.items()) for label, points in lines.items()}


def _panel_order(key: Tuple[str, str]) -> Tuple[int, int]:
    mode, dtype = key
    return MODES.index(mode), list(DTYPES).index(dtype)


def plot_speedup(path: Path, results: Sequence[Result]) -> None:
    """``speedup.png``: speedup vs batch, one panel per (mode, dtype), one line per H.

    A line keeps its colour in every panel; one legend below the panels.
    """
    from matplotlib.figure import Figure  # Agg via Figure.savefig; no pyplot state
    from matplotlib.lines import Line2D

    timed = [r for r in results if r.speedup]
    vary_t = len({r.T for r in timed}) > 1
    panels: Dict[Tuple[str, str], List[Result]] = defaultdict(list)
    for r in timed:
        panels[(r.mode, r.dtype)].append(r)
    labels = list(_series(timed, vary_t))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    cols = max(1, min(len(panels), 3))
    rows = max(1, math.ceil(len(panels) / cols))
    fig = Figure(figsize=(5.2 * cols, 3.6 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, sorted(panels, key=_panel_order)):
        _draw_panel(ax, " ".join(key), _series(panels[key], vary_t), colors)
    if not panels:
        _draw_panel(axes[0], "no timed results", {}, colors)
    for ax in axes[max(1, len(panels)):]:
        ax.set_visible(False)
    if labels:
        handles = [Line2D([], [], color=colors[label], marker="o") for label in labels]
        _figure_legend(fig, handles, labels)
    fig.suptitle("fused_lstm speedup over torch.nn.LSTM (torch ms / fused ms; > 1 = fused faster)")
    fig.savefig(path, dpi=110)


def _figure_legend(fig: Any, handles: Sequence[Any], labels: Sequence[str]) -> None:
    """One legend under all panels ("outside" placement needs matplotlib >= 3.7)."""
    try:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), fontsize="small")
    except (ValueError, TypeError):
        fig.legend(handles, labels, loc="lower center", fontsize="small")


def _draw_panel(ax: Any, title: str, series: Mapping[str, List[Tuple[int, float]]],
                colors: Mapping[str, str]) -> None:
    batches = sorted({n for points in series.values() for n, _ in points})
    speedups = [s for points in series.values() for _, s in points]
    for label, points in series.items():
        ax.plot([n for n, _ in points], [s for _, s in points], marker="o", color=colors[label])
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    # Keep at least 0.8x..1.25x visible so noise around parity does not look like a trend.
    ax.set_ylim(min([0.8, *speedups]) / 1.05, max([1.25, *speedups]) * 1.05)
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    if batches:
        ax.set_xticks(batches, [str(n) for n in batches])
    ax.set_title(title)
    ax.set_xlabel("batch size N")
    ax.set_ylabel("speedup")
    ax.grid(True, alpha=0.3)


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
