"""The closing summary of ``benchmarks/device_check.sh``: stage results, GPU test counts, per-shape speedups.

Reads the folder the check writes its raw outputs to and prints a short, fixed-width text (a few KB), meant to
be the last thing the check prints:

    python3 benchmarks/device_summary.py RAW_DIR

RAW_DIR may hold (each part is left out when its file is missing):

    env.txt                       "key: value" lines (gpu, driver, torch, ...); the gpu/device/torch lines are shown
    stages.tsv                    one line per stage: name, status, seconds, limit, all tab-separated
    tests.xml / tests.log         pytest's junit XML of the GPU tests; without it, the PASSED/FAILED/... words
                                  of its ``pytest -v`` log (a stage stopped by its limit writes no XML)
    sanitizer.xml / sanitizer.log the same for the compute-sanitizer tests
    bench/results.json            the benchmark's results (``python3 -m fused_lstm.benchmark --out``); without it,
    bench.log                     the benchmark's progress lines ("[i/n] T=.. N=.. I=.. H=.. L1 uni fp32 infer: ...")
    persistent/results.json       the same for the persistent-kernel benchmark
    persistent.log

Standard library only, so it runs wherever the check does.
"""

from __future__ import annotations

import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

#: The benchmark's modes, in its own order (fused_lstm/benchmark/shapes.py); others are appended as found.
MODES = ("infer", "train", "train_weights", "fwd", "bwd")
DTYPES = ("fp32", "bf16", "fp16")
#: At most this many failing tests, skip reasons and benchmark problems are listed by name.
MAX_LISTED = 12
MAX_MESSAGE = 150


def _short(text: str, limit: int = MAX_MESSAGE) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- tests ------------------------------------------------------------------------------------------------

class TestCounts:
    """Outcome counts of one pytest run, with the failing tests and the skip reasons."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.counts: Counter = Counter()
        self.failures: List[Tuple[str, str]] = []  # (test id, first line of its message)
        self.skip_reasons: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def line(self) -> str:
        c = self.counts
        unfinished = f", {c['unfinished']} unfinished" if c["unfinished"] else ""
        return (f"{c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped"
                f"{unfinished} of {self.total} ({self.source})")


def junit_counts(path: Path) -> TestCounts:
    """Counts from a junit XML file as pytest writes it (``--junitxml``), testcase by testcase."""
    result = TestCounts(path.name)
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        name = "::".join(filter(None, [case.get("classname", ""), case.get("name", "")]))
        failure, error, skipped = case.find("failure"), case.find("error"), case.find("skipped")
        if failure is not None or error is not None:
            bad = failure if failure is not None else error
            outcome = "failed" if failure is not None else "error"
            message = bad.get("message") or ""
            if not message and (bad.text or "").strip():
                message = bad.text.strip().splitlines()[-1]
            result.failures.append((name, _short(message)))
        elif skipped is not None:
            outcome = "skipped"
            result.skip_reasons[_short(skipped.get("message", ""), 100)] += 1
        else:
            outcome = "passed"
        result.counts[outcome] += 1
    return result


_LOG_OUTCOME = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_LOG_SHORT = re.compile(r"^(FAILED|ERROR) (\S+::\S+)(?: - (.*))?$")
_LOG_RUNNING = re.compile(r"^(\S+::\S+)\s*$")


def log_counts(path: Path) -> TestCounts:
    """Counts from a ``pytest -v`` log, for a run stopped before it wrote its XML: the outcome word after each
    test id, the messages of pytest's short summary (``-rfE``) if it got that far, and the test that was
    running when the run stopped (-v prints a test's id before its outcome)."""
    result = TestCounts(path.name + ", no XML: the run did not finish")
    words = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "error",
             "SKIPPED": "skipped", "XFAIL": "skipped"}
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    messages = {}
    for line in lines:
        short = _LOG_SHORT.match(line)
        if short:
            messages[short.group(2)] = _short(short.group(3) or "")
    for line in lines:
        match = _LOG_OUTCOME.match(line)
        if match:
            outcome = words[match.group(2)]
            result.counts[outcome] += 1
            if outcome in ("failed", "error"):
                result.failures.append((match.group(1), messages.get(match.group(1), "")))
    if lines and _LOG_RUNNING.match(lines[-1]):
        result.counts["unfinished"] += 1
        result.failures.append((lines[-1], "was running when the run stopped"))
    return result


def test_counts(raw: Path, name: str) -> Optional[TestCounts]:
    xml, log = raw / f"{name}.xml", raw / f"{name}.log"
    if xml.is_file():
        try:
            return junit_counts(xml)
        except ET.ParseError:
            pass
    if log.is_file():
        return log_counts(log)
    return None


def format_tests(title: str, counts: TestCounts) -> List[str]:
    lines = [f"-- {title}: {counts.line()}"]
    for name, message in counts.failures[:MAX_LISTED]:
        lines.append(f"   FAILED {name}" + (f": {message}" if message else ""))
    if len(counts.failures) > MAX_LISTED:
        lines.append(f"   ... and {len(counts.failures) - MAX_LISTED} more")
    for reason, n in counts.skip_reasons.most_common(3):
        lines.append(f"   skipped x{n}: {reason}")
    return lines


# ---- benchmark ----------------------------------------------------------------------------------------------

def shape_label(row: Dict) -> str:
    """The benchmark's own label: ``T=100 N=64 I=512 H=512 L1 uni``, ``... L2 bi packed``, ``... cell``."""
    label = "T=%d N=%d I=%d H=%d" % (row["T"], row["N"], row["I"], row["H"])
    if row.get("cell"):
        return label + " cell"
    parts = [label, "L%d" % row.get("layers", 1), "bi" if row.get("bidirectional") else "uni"]
    if row.get("packed"):
        parts.append("packed")
    if row.get("proj_size"):
        parts.append("P%d" % row["proj_size"])
    return " ".join(parts)


def _cell(row: Dict) -> str:
    if row.get("status") == "ok" and row.get("speedup"):
        return "%.2fx" % row["speedup"]
    return {"mismatch": "MISMATCH", "error": "ERROR"}.get(row.get("status", ""), row.get("status") or "-")


def rows_from_json(path: Path) -> Tuple[List[Dict], Optional[Dict], bool]:
    """(rows, the file's geomean summary, whether the run was interrupted)."""
    data = json.loads(path.read_text())
    interrupted = bool(data.get("settings", {}).get("interrupted"))
    return data.get("results", []), data.get("summary", {}).get("speedup"), interrupted


_PROGRESS = re.compile(r"^\[\d+/\d+\] T=(\d+) N=(\d+) I=(\d+) H=(\d+) (.*?) (\w+) (\w+): (.*)$")


def rows_from_log(path: Path) -> List[Dict]:
    """Rows from the benchmark's progress lines, for a run that wrote no results.json."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        match = _PROGRESS.match(line.strip())
        if not match:
            continue
        T, N, I, H, topology, dtype, mode, rest = match.groups()
        words = topology.split()
        row = {"T": int(T), "N": int(N), "I": int(I), "H": int(H), "dtype": dtype, "mode": mode,
               "cell": "cell" in words, "bidirectional": "bi" in words, "packed": "packed" in words,
               "layers": next((int(w[1:]) for w in words if re.fullmatch(r"L\d+", w)), 1),
               "proj_size": next((int(w[1:]) for w in words if re.fullmatch(r"P\d+", w)), 0)}
        speed = re.search(r", (\d+(?:\.\d+)?)x", rest)
        if speed and rest.startswith("torch "):
            row.update(status="ok", speedup=float(speed.group(1)))
        else:
            status, _, message = rest.partition(" ")
            row.update(status=status.lower(), message=message)
        rows.append(row)
    return rows


def geomeans(rows: Iterable[Dict]) -> Dict[str, Dict]:
    groups: Dict[str, List[float]] = OrderedDict()
    for row in rows:
        if row.get("status") == "ok" and row.get("speedup"):
            groups.setdefault(f"{row['mode']} {row['dtype']}", []).append(row["speedup"])
    return {key: {"geomean_speedup": math.exp(sum(map(math.log, v)) / len(v)), "count": len(v)}
            for key, v in groups.items()}


def format_speedups(title: str, rows: Sequence[Dict], summary: Optional[Dict] = None,
                    note: str = "") -> List[str]:
    """One line per (shape, dtype) with one column per mode (torch ms / fused ms; > 1: fused is faster), then
    the geometric means per mode and dtype and the rows that were not timed."""
    statuses = Counter(row.get("status", "?") for row in rows)
    head = f"-- {title}: {len(rows)} rows (" + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())) + ")"
    lines = [head + (f" {note}" if note else "")]
    if not rows:
        return lines
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    modes += sorted({r["mode"] for r in rows} - set(modes))
    table: Dict[Tuple[str, str], Dict[str, str]] = OrderedDict()
    for row in rows:
        table.setdefault((shape_label(row), row["dtype"]), {})[row["mode"]] = _cell(row)
    width = max(len(shape) for shape, _ in table)
    cols = [max(len(m), 8) for m in modes]
    lines.append(f"   {'shape':<{width}}  {'dtype':<5} " + " ".join(f"{m:>{w}}" for m, w in zip(modes, cols)))
    for (shape, dtype), cells in table.items():
        lines.append(f"   {shape:<{width}}  {dtype:<5} "
                     + " ".join(f"{cells.get(m, '-'):>{w}}" for m, w in zip(modes, cols)))
    means = summary if summary else geomeans(rows)
    for key, value in means.items():
        lines.append(f"   geomean {key}: {value['geomean_speedup']:.2f}x over {value['count']} shapes")
    problems = [r for r in rows if r.get("status") not in ("ok",)]
    for row in problems[:MAX_LISTED]:
        lines.append(f"   {row.get('status', '?').upper()} {shape_label(row)} {row['dtype']} {row['mode']}: "
                     f"{_short(row.get('message', ''))}")
    if len(problems) > MAX_LISTED:
        lines.append(f"   ... and {len(problems) - MAX_LISTED} more not timed")
    return lines


def benchmark_section(raw: Path, name: str, title: str) -> List[str]:
    results, log = raw / name / "results.json", raw / f"{name}.log"
    if results.is_file():
        try:
            rows, summary, interrupted = rows_from_json(results)
            note = "[stopped by its limit: the rows measured until then]" if interrupted else ""
            return format_speedups(title, rows, summary, note)
        except (ValueError, KeyError):
            pass
    if log.is_file():
        rows = rows_from_log(log)
        if rows:
            return format_speedups(title, rows, None, f"[from {log.name}: no results.json]")
    return []


# ---- whole summary --------------------------------------------------------------------------------------------

def read_stages(path: Path) -> List[List[str]]:
    if not path.is_file():
        return []
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()]


def env_lines(path: Path) -> List[str]:
    if not path.is_file():
        return []
    keep = ("gpu:", "device:", "torch:", "nvcc:", "compute-sanitizer:", "commit:", "date:", "no CUDA device")
    return [line for line in path.read_text().splitlines() if line.startswith(keep)]


def summarize(raw: Path) -> str:
    """The whole summary text for the raw output folder ``raw``."""
    raw = Path(raw)
    lines = ["", "================ fused_lstm device check: summary"]
    lines += env_lines(raw / "env.txt")
    sections = [
        ("tests", "GPU tests"), ("sanitizer", "compute-sanitizer tests"),
    ]
    for name, title in sections:
        counts = test_counts(raw, name)
        if counts is not None:
            lines += format_tests(title, counts)
    lines += benchmark_section(raw, "persistent", "persistent kernel (FUSED_LSTM_PERSISTENT=1), speedup over "
                                                  "torch.nn.LSTM")
    lines += benchmark_section(raw, "bench", "benchmark, gpu preset: speedup over torch.nn.LSTM "
                                             "(torch ms / fused ms; > 1: fused is faster)")
    stages = read_stages(raw / "stages.tsv")
    if stages:
        lines.append(f"-- stages   {'seconds':>7} {'limit':>6}  status")
        for fields in stages:
            name, status, seconds, limit = (fields + ["", "", "", ""])[:4]
            lines.append(f"   {name:<10} {seconds:>7} {limit:>6}  {_short(status, 200)}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print(__doc__.split("\n\n")[0] + "\n\nusage: python3 benchmarks/device_summary.py RAW_DIR", file=sys.stderr)
        return 2
    sys.stdout.write(summarize(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
