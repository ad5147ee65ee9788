"""Tests of the benchmark suite (``fused_lstm.benchmark``): CPU only, no timing assertions.

The harness takes the implementation under test as a factory, so most tests inject
``torch.nn.LSTM`` (a correct candidate) or deliberately wrong subclasses of it; tests
that exercise the real candidate run with ``fused_lstm.LSTM`` when it is built and
fall back to the stand-in otherwise (nothing is skipped).
"""

from __future__ import annotations

import ast
import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("fused_lstm") is None:  # running pytest without the repo on sys.path
    sys.path.insert(0, str(REPO))

from fused_lstm.benchmark import cli, harness, report  # noqa: E402
from fused_lstm.benchmark.algo import CudaProps, baseline_algo, cudnn_algo  # noqa: E402
from fused_lstm.benchmark.candidates import last_path, resolve_candidate  # noqa: E402
from fused_lstm.benchmark.flops import forward_flops, mode_flops  # noqa: E402
from fused_lstm.benchmark.gate import TOLERANCES, Tolerance, check_pair, compare, tolerance_for  # noqa: E402
from fused_lstm.benchmark.harness import BenchmarkConfig, Job, Result, plan_jobs, run_benchmark  # noqa: E402
from fused_lstm.benchmark.inputs import build_pair, draw_inputs  # noqa: E402
from fused_lstm.benchmark.shapes import (  # noqa: E402
    AUTOCAST_DTYPES, DTYPES, MODES, PRESETS, Case, Shape, parse_shape, select_cases,
)
from fused_lstm.benchmark.timing import Stats, TimingConfig, measure_interleaved  # noqa: E402
from fused_lstm.benchmark.workloads import Workload, backward, forward  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

CPU = torch.device("cpu")
FAST = TimingConfig(warmup=1, min_repeats=2, max_repeats=3, min_time_s=0.0, max_time_s=1.0, n_inputs=2)
FAST_ARGS = ["--warmup", "1", "--min-repeats", "2", "--max-repeats", "3", "--min-time", "0",
             "--max-time", "1", "--inputs", "2", "--quiet"]
TINY = Shape(6, 3, 5, 8)
GATE_SHAPES = [TINY, Shape(5, 4, 6, 8, layers=2, bidirectional=True), Shape(7, 5, 4, 8, packed=True),
               Shape(5, 3, 4, 8, proj_size=3)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny shapes gain nothing from threads, and OpenMP spin-waits stall on a busy host."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fused_available() -> bool:
    try:
        resolve_candidate("fused")
    except ImportError:
        return False
    return True


#: Candidates expected to pass the gate: the stand-in always, the real one once built.
GOOD_CANDIDATES = ["torch"] + (["fused"] if _fused_available() else [])
#: The candidate end-to-end runs use: the real one where available.
DEFAULT_CANDIDATE = GOOD_CANDIDATES[-1]


class OffsetLSTM(torch.nn.LSTM):
    """Wrong: adds 1e-2 to the output sequence."""

    def forward(self, input: Any, hx: Any = None) -> Any:  # noqa: A002
        out, state = super().forward(input, hx)
        if isinstance(out, torch.nn.utils.rnn.PackedSequence):
            return out._replace(data=out.data + 1e-2), state
        return out + 1e-2, state


class HalfStateLSTM(torch.nn.LSTM):
    """Wrong: returns h_n scaled by one half."""

    def forward(self, input: Any, hx: Any = None) -> Any:  # noqa: A002
        out, (h, c) = super().forward(input, hx)
        return out, (h * 0.5, c)


class WrongGradLSTM(torch.nn.LSTM):
    """Wrong only in training: exact forward, output gradient scaled by 1.1."""

    def forward(self, input: Any, hx: Any = None) -> Any:  # noqa: A002
        out, state = super().forward(input, hx)
        return out + 0.1 * (out - out.detach()), state


class PathLSTM(torch.nn.LSTM):
    """Correct, and reports which path it took like fused_lstm may."""

    last_path = "test-path"


class BrokenLSTM(torch.nn.LSTM):
    """Raises on every call, like an unsupported configuration."""

    def forward(self, input: Any, hx: Any = None) -> Any:  # noqa: A002
        raise RuntimeError("unsupported\n   configuration")


def _gate(candidate: Any, shape: Shape, grads: bool, dtype: str = "fp32") -> Any:
    reference, cand = build_pair(shape, DTYPES[dtype], CPU, resolve_candidate(candidate))
    inputs = draw_inputs(shape, DTYPES[dtype], CPU, 1)
    return check_pair(reference, cand, inputs[0], grads, tolerance_for(dtype, CPU))


def _run(candidate: Any, shapes: Sequence[Shape], modes: Sequence[str]) -> List[Result]:
    jobs = [Job(s, "test", "fp32", tuple(modes)) for s in shapes]
    return run_benchmark(jobs, resolve_candidate(candidate), BenchmarkConfig(CPU, FAST))


def _main(tmp_path: Path, *args: str) -> int:
    return cli.main([*args, *FAST_ARGS, "--out", str(tmp_path / "out")])


# --- correctness gate -------------------------------------------------------------------------

@pytest.mark.parametrize("candidate", GOOD_CANDIDATES)
@pytest.mark.parametrize("shape", GATE_SHAPES, ids=lambda s: s.label().replace(" ", "_"))
@pytest.mark.parametrize("grads", [False, True], ids=["infer", "train"])
def test_gate_accepts_correct_candidate(candidate: str, shape: Shape, grads: bool) -> None:
    gate = _gate(candidate, shape, grads)
    assert gate.ok, gate.summary()
    names = {c.name for c in gate.checks}
    assert {"output", "h_n", "c_n"} <= names
    assert ("grad_input" in names and "grad_weight_hh_l0" in names) == grads


@pytest.mark.parametrize("shape", GATE_SHAPES[:3], ids=lambda s: s.label().replace(" ", "_"))
@pytest.mark.parametrize("grads", [False, True], ids=["infer", "train"])
def test_gate_refuses_offset_output(shape: Shape, grads: bool) -> None:
    gate = _gate(OffsetLSTM, shape, grads)
    assert not gate.ok
    bad = {c.name for c in gate.checks if not c.ok}
    assert "output" in bad
    assert gate.worst.max_abs == pytest.approx(1e-2, rel=1e-3)


def test_gate_refuses_wrong_h_n() -> None:
    gate = _gate(HalfStateLSTM, TINY, grads=False)
    assert not gate.ok
    assert [c.name for c in gate.checks if not c.ok] == ["h_n"]
    assert "h_n" in gate.summary()


def test_gate_refuses_wrong_gradients_only_when_training() -> None:
    assert _gate(WrongGradLSTM, TINY, grads=False).ok
    gate = _gate(WrongGradLSTM, TINY, grads=True)
    assert not gate.ok
    bad = {c.name for c in gate.checks if not c.ok}
    assert "grad_input" in bad and "grad_weight_ih_l0" in bad
    assert not {"output", "h_n", "c_n"} & bad


class HalfOffLSTM(torch.nn.LSTM):
    """Wrong only in bf16 / fp16, as a half-precision baseline can be: its output is offset by 0.2 there."""

    offset = 0.2

    def forward(self, input: Any, hx: Any = None) -> Any:  # noqa: A002
        out, state = super().forward(input, hx)
        return (out + self.offset if out.dtype in (torch.bfloat16, torch.float16) else out), state


class HalfUnderLSTM(HalfOffLSTM):
    """Wrong the other way in bf16 / fp16."""

    offset = -0.2


def _gate_against(reference: torch.nn.Module, candidate: torch.nn.Module, dtype: str, grads: bool) -> Any:
    candidate.load_state_dict(reference.state_dict())
    reference, candidate = reference.to(DTYPES[dtype]), candidate.to(DTYPES[dtype])
    inputs = draw_inputs(TINY, DTYPES[dtype], CPU, 1)
    return check_pair(reference, candidate, inputs[0], grads, tolerance_for(dtype, CPU))


@pytest.mark.parametrize("grads", [False, True], ids=["infer", "train"])
def test_gate_judges_half_precision_against_float64_when_torch_is_off(grads: bool) -> None:
    shape = TINY
    # torch off in bf16, the candidate exact: passes, and says which tensor was judged against float64.
    gate = _gate_against(HalfOffLSTM(shape.I, shape.H), torch.nn.LSTM(shape.I, shape.H), "bf16", grads)
    assert gate.ok, gate.summary()
    assert gate.arbitrated.startswith("judged vs float64") and "output" in gate.arbitrated
    assert "0.2" in gate.arbitrated
    # Both off: still a mismatch.
    gate = _gate_against(HalfOffLSTM(shape.I, shape.H), HalfUnderLSTM(shape.I, shape.H), "bf16", grads)
    assert not gate.ok and "output" in gate.summary()
    # float32 never arbitrates: the candidate must match torch.
    gate = _gate_against(torch.nn.LSTM(shape.I, shape.H), OffsetLSTM(shape.I, shape.H), "fp32", grads)
    assert not gate.ok and gate.arbitrated == ""


def test_compare_flags_nan_shape_and_dtype() -> None:
    tol = Tolerance(1e-4, 1e-4)
    ref = torch.ones(3)
    assert compare("t", ref + 1e-5, ref, tol).ok
    assert not compare("t", torch.tensor([1.0, float("nan"), 1.0]), ref, tol).ok
    assert "shape" in compare("t", torch.ones(4), ref, tol).note
    assert "dtype" in compare("t", ref.double(), ref, tol).note


def test_tolerances_depend_on_dtype() -> None:
    assert tolerance_for("fp32", CPU) == TOLERANCES["fp32"]
    assert tolerance_for("autocast-bf16", CPU) == TOLERANCES["bf16"]
    assert tolerance_for("autocast-fp16", CPU) == TOLERANCES["fp16"]
    assert TOLERANCES["fp32"].rtol < TOLERANCES["fp16"].rtol < TOLERANCES["bf16"].rtol


# --- harness ----------------------------------------------------------------------------------

def test_mismatch_is_recorded_untimed_and_run_continues() -> None:
    results = _run(OffsetLSTM, [TINY, Shape(4, 2, 3, 8)], ["infer", "train"])
    assert [r.status for r in results] == ["mismatch"] * 4
    assert all(r.torch_ms is None and r.fused_ms is None and r.speedup is None for r in results)
    assert all(r.gate_tensor == "output" and r.gate_max_abs_err > r.gate_limit for r in results)
    assert cli.exit_code(results, allow_mismatch=False) == 1
    assert cli.exit_code(results, allow_mismatch=True) == 0


def test_wrong_gradient_refuses_only_grad_modes() -> None:
    results = _run(WrongGradLSTM, [TINY], MODES)
    assert {r.mode: r.status for r in results} == {
        "infer": "ok", "train": "mismatch", "train_weights": "mismatch", "fwd": "mismatch", "bwd": "mismatch"}


def test_exception_is_recorded_as_error() -> None:
    results = _run(BrokenLSTM, [TINY], ["infer"])
    assert results[0].status == "error" and "unsupported configuration" in results[0].message
    assert cli.exit_code(results, allow_mismatch=True) == 1


@pytest.mark.parametrize("candidate", GOOD_CANDIDATES)
def test_all_modes_are_timed(candidate: str) -> None:
    results = _run(candidate, [TINY, Shape(5, 3, 4, 8, packed=True)], MODES)
    assert len(results) == 2 * len(MODES)
    for r in results:
        assert r.status == "ok", r.message
        assert r.torch_ms > 0 and r.fused_ms > 0 and r.speedup > 0
        assert r.torch_min_ms <= r.torch_ms <= r.torch_max_ms
        assert 2 <= r.repeats <= 3
        assert r.gflop == pytest.approx(mode_flops(r.shape, r.mode) / 1e9)
        assert r.torch_algo == "cpu"


@pytest.mark.parametrize("shape", [TINY, Shape(6, 3, 5, 8, cell=True)], ids=["lstm", "cell"])
def test_autocast_precision_runs_float32_modules_under_autocast(shape: Shape) -> None:
    """autocast-bf16: float32 weights and inputs, both modules under torch.autocast("cpu", bfloat16), so outputs
    are bf16 and gradients float32; the fused candidate passes the gate and the row is timed and named so."""
    reference, candidate = build_pair(shape, DTYPES["autocast-bf16"], CPU, resolve_candidate("fused"),
                                      autocast=AUTOCAST_DTYPES["autocast-bf16"])
    inputs = draw_inputs(shape, DTYPES["autocast-bf16"], CPU, 1)
    assert all(p.dtype == torch.float32 for p in candidate.parameters()) and inputs[0].leaf.dtype == torch.float32
    outputs = forward(candidate, inputs[0])
    assert all(o.dtype == torch.bfloat16 for o in outputs)
    assert all(g.dtype == torch.float32 for g in backward(outputs, inputs[0], tuple(candidate.parameters())))
    assert check_pair(reference, candidate, inputs[0], True, tolerance_for("autocast-bf16", CPU), autocast=True).ok
    rows = run_benchmark([Job(shape, "test", "autocast-bf16", ("infer", "train"))], resolve_candidate("fused"),
                         BenchmarkConfig(CPU, FAST))
    assert [(r.dtype, r.status) for r in rows] == [("autocast-bf16", "ok")] * 2
    assert all(r.fused_path.startswith("cpu:") for r in rows)


def test_fused_path_column_reports_last_path() -> None:
    assert _run(PathLSTM, [TINY], ["infer"])[0].fused_path == "test-path"
    assert last_path(torch.nn.LSTM(2, 3)) is None


def test_plan_jobs_overrides_and_cpu_dtypes() -> None:
    full = PRESETS["full"]
    jobs = plan_jobs(full.cases, full.modes, full.dtypes, CPU)
    assert {j.dtype for j in jobs} == {"fp32", "bf16"}  # fp16 is CUDA only
    assert len(jobs) == 2 * len(full.cases)
    infer_only = [j for j in jobs if j.group == "deepbench-infer"]
    assert infer_only and all(j.modes == ("infer",) for j in infer_only)
    assert all(j.modes == ("train", "fwd", "bwd") for j in jobs if j.group == "deepbench-train")
    gpu = PRESETS["gpu"]
    cuda_jobs = plan_jobs(gpu.cases, gpu.modes, gpu.dtypes, torch.device("cuda"))
    assert len(cuda_jobs) == 3 * len(gpu.cases) and {j.dtype for j in cuda_jobs} == {"fp32", "bf16", "fp16"}
    forced = plan_jobs(full.cases[:2], full.modes, full.dtypes, CPU, modes=("bwd", "infer"))
    assert [j.modes for j in forced] == [("infer", "bwd")] * 4
    cpu = PRESETS["cpu"]
    cpu_jobs = plan_jobs(cpu.cases, cpu.modes, cpu.dtypes, CPU)
    bf16_jobs = [j for j in cpu_jobs if j.dtype == "bf16"]
    assert len(bf16_jobs) == 12 and all(j.group == "sweep-bf16" and j.modes == ("infer", "train") for j in bf16_jobs)
    # Under bf16 autocast: the same sweep, and the LSTMCell loops of the fp32 rows.
    autocast_jobs = [j for j in cpu_jobs if j.dtype == "autocast-bf16"]
    fp32_cells = {j.shape for j in cpu_jobs if j.dtype == "fp32" and j.shape.cell}
    assert {j.shape for j in autocast_jobs} == {j.shape for j in bf16_jobs} | fp32_cells
    assert all(j.modes == ("infer", "train") for j in autocast_jobs)


# --- timing -----------------------------------------------------------------------------------

def test_measure_interleaves_and_rotates_inputs() -> None:
    calls: List[tuple] = []

    def workload(name: str) -> Workload:
        return Workload(prepare=lambda inp: inp, run=lambda inp: calls.append((name, inp)))

    config = TimingConfig(warmup=0, min_repeats=4, max_repeats=4, min_time_s=0.0, n_inputs=3)
    stats = measure_interleaved([workload("A"), workload("B")], ["x0", "x1", "x2"], CPU, config)
    assert [s.repeats for s in stats] == [4, 4]
    assert [name for name, _ in calls] == list("ABBAABBA")
    assert [inp for _, inp in calls[::2]] == ["x0", "x1", "x2", "x0"]


def test_stats_summarize_samples() -> None:
    stats = Stats.of([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (stats.median_ms, stats.min_ms, stats.max_ms, stats.repeats) == (3.0, 1.0, 5.0, 5)
    assert stats.q1_ms == 2.0 and stats.q3_ms == 4.0 and stats.iqr_ms == 2.0
    assert Stats.of([7.0]).iqr_ms == 0.0


# --- shapes, presets, FLOPs, cuDNN algorithm --------------------------------------------------

def test_parse_shape() -> None:
    assert parse_shape("100,64,512,512") == Shape(100, 64, 512, 512)
    assert parse_shape("10, 2, 3, 4, 2, 1, 1") == Shape(10, 2, 3, 4, 2, True, True)
    assert parse_shape("10,2,3,8,1,0,0,4").proj_size == 4


@pytest.mark.parametrize("text,message", [
    ("1,2,3", "expected T,N,I,H"),
    ("1,2,x,4", "must be integers"),
    ("0,2,3,4", "T must be >= 1"),
    ("1,2,3,4,1,maybe", "bidir must be 0 or 1"),
    ("1,2,3,4,1,0,0,4", "proj_size"),
])
def test_parse_shape_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_shape(text)


def test_packed_lengths_spread_and_unsorted() -> None:
    lengths = Shape(100, 64, 8, 8, packed=True).lengths()
    assert min(lengths) == 1 and max(lengths) == 100 and len(lengths) == 64
    assert lengths != sorted(lengths, reverse=True)
    assert Shape(100, 64, 8, 8).tokens() == 6400


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_well_formed(name: str) -> None:
    preset = PRESETS[name]
    assert preset.cases and preset.description
    assert set(preset.modes) <= set(MODES) and set(preset.dtypes) <= set(DTYPES)
    assert "fp32" in preset.dtypes
    for case in preset.cases:
        assert set(case.modes or ()) <= set(MODES) and set(case.dtypes or ()) <= set(DTYPES)
    keys = [(c.group, c.shape) for c in preset.cases]
    assert len(keys) == len(set(keys))


def test_quick_preset_is_small() -> None:
    quick = PRESETS["quick"]
    assert 4 <= len(quick.cases) <= 6
    assert set(quick.modes) == {"infer", "train"}
    assert all(c.shape.T <= 50 and c.shape.H <= 256 and c.shape.I <= 256 for c in quick.cases)
    assert sum(mode_flops(c.shape, "train") for c in quick.cases) < 5e9
    topologies = {c.shape.topology() for c in quick.cases}
    assert {"L1 uni", "L1 uni packed", "cell"} <= topologies and any("bi" in t for t in topologies)


def test_gpu_and_full_presets_contain_the_issue_shapes() -> None:
    gpu, full = PRESETS["gpu"], PRESETS["full"]
    classic = Shape(100, 64, 512, 512)
    assert any(c.shape == classic and set(c.dtypes or gpu.dtypes) == {"fp32", "bf16", "fp16"} for c in gpu.cases)
    assert {(c.shape.N, c.shape.H) for c in gpu.cases if c.group == "sweep"} == {
        (n, h) for n in (1, 8, 64) for h in (256, 512, 1024)}
    assert any(c.shape.packed for c in gpu.cases)
    assert any(c.shape.layers == 2 and c.shape.bidirectional for c in gpu.cases)
    groups = [c.group for c in full.cases]
    assert groups.count("sweep") == 40 and groups.count("deepbench-train") == 22
    assert groups.count("deepbench-infer") == 15 and any(c.shape == classic for c in full.cases)
    assert all(c.shape.N <= 64 and 128 <= c.shape.H <= 1024 for c in PRESETS["cpu"].cases)


def test_select_cases_filter_and_limit() -> None:
    cases = PRESETS["full"].cases
    infer = select_cases(cases, "deepbench-INFER", None)
    assert len(infer) == 15
    assert len(select_cases(cases, r"H=1024\b", 3)) == 3
    assert select_cases(cases, "no-such-shape", None) == []
    assert select_cases([Case(TINY)], None, None) == [Case(TINY)]


def test_flop_counts() -> None:
    classic = Shape(100, 64, 512, 512)
    assert forward_flops(classic) == 16 * 512 * 512 * 64 * 100
    assert mode_flops(classic, "train") == 3 * forward_flops(classic)
    assert mode_flops(classic, "bwd") == 2 * mode_flops(classic, "infer")
    two_bi = Shape(10, 2, 3, 4, layers=2, bidirectional=True)
    assert forward_flops(two_bi) == 2 * 20 * (8 * 16 + 8 * 3 * 4) + 2 * 20 * (8 * 16 + 8 * 8 * 4)
    proj = Shape(10, 2, 3, 8, proj_size=4)
    assert forward_flops(proj) == 20 * (8 * 8 * 4 + 8 * 3 * 8 + 2 * 8 * 4)
    assert forward_flops(Shape(10, 4, 8, 8, packed=True)) == sum(
        Shape(10, 4, 8, 8, packed=True).lengths()) * 16 * 64


H100 = CudaProps(9, 0, 132)


@pytest.mark.parametrize("shape,dtype,forward,props,expected", [
    (Shape(100, 64, 512, 512), torch.float16, True, H100, "persist"),
    (Shape(100, 64, 512, 512), torch.float32, True, H100, "standard"),
    (Shape(100, 64, 512, 512), torch.bfloat16, True, H100, "standard"),
    (Shape(100, 64, 512, 512), torch.float16, True, CudaProps(8, 6, 84), "standard"),
    (Shape(100, 60, 512, 512), torch.float16, True, H100, "standard"),
    (Shape(100, 64, 512, 512, layers=2), torch.float16, True, H100, "standard"),
    (Shape(100, 64, 512, 512, packed=True), torch.float16, True, H100, "standard"),
    (Shape(100, 64, 128, 192), torch.float32, True, H100, "persist-small-h"),
    (Shape(100, 64, 128, 192), torch.float32, False, H100, "standard"),
    (Shape(100, 64, 128, 128, packed=True), torch.float32, True, H100, "standard"),
    (Shape(100, 64, 128, 128), torch.float64, True, H100, "standard"),
])
def test_cudnn_algo_heuristic(shape: Shape, dtype: torch.dtype, forward: bool, props: CudaProps,
                              expected: str) -> None:
    assert cudnn_algo(shape, dtype, forward, props) == expected


def test_baseline_algo_labels() -> None:
    cuda = torch.device("cuda")
    shape = Shape(100, 64, 128, 192)
    if torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled:
        assert baseline_algo(shape, torch.float32, "infer", cuda, H100) == "persist-small-h"
        assert baseline_algo(shape, torch.float32, "bwd", cuda, H100) == "standard"
        assert baseline_algo(shape, torch.float32, "train", cuda, H100) == "persist-small-h/standard"
    assert baseline_algo(shape, torch.float32, "train", CPU) == "cpu"


# --- outputs ----------------------------------------------------------------------------------

def test_tiny_run_writes_all_outputs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = _main(tmp_path, "--shape", "6,3,5,8", "--shape", "5,2,4,8,1,0,1", "--modes", ",".join(MODES),
                 "--device", "cpu", "--candidate", DEFAULT_CANDIDATE)
    out = tmp_path / "out"
    assert code == 0, capsys.readouterr()

    doc = json.loads((out / "results.json").read_text())
    env = doc["environment"]
    for key in ("date", "device", "device_name", "torch", "cuda", "cudnn", "cpu_model", "torch_threads",
                "git_commit", "tf32", "fused_lstm_build_info", "candidate"):
        assert key in env
    assert {"torch.backends.cuda.matmul.allow_tf32", "torch.backends.cudnn.allow_tf32"} <= set(env["tf32"])
    assert "8*H*H_out" in doc["flop_formula"]
    rows = doc["results"]
    assert [(r["T"], r["mode"]) for r in rows] == [(6, m) for m in MODES] + [(5, m) for m in MODES]
    assert rows[-1]["packed"] is True
    for r in rows:
        assert r["status"] == "ok" and r["dtype"] == "fp32" and r["torch_algo"] == "cpu"
        assert r["torch_ms"] > 0 and r["fused_ms"] > 0 and r["speedup"] > 0 and r["gflop"] > 0
    assert doc["summary"]["status_counts"] == {"ok": 2 * len(MODES)}

    with (out / "results.csv").open() as fh:
        csv_rows = list(csv.DictReader(fh))
    assert len(csv_rows) == 2 * len(MODES)
    assert {"T", "N", "I", "H", "dtype", "mode", "torch_ms", "fused_ms", "speedup", "fused_tflops",
            "torch_algo", "fused_path", "status"} <= set(csv_rows[0])

    md = (out / "results.md").read_text()
    assert "## Environment" in md and "| shape | topology | dtype | mode |" in md
    assert md.count("| T=6 N=3 I=5 H=8 |") == len(MODES)

    png = (out / "speedup.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000

    printed = capsys.readouterr().out
    assert "speedup" in printed and "TFLOP/s" in printed and "results.json" in printed


def test_plot_handles_no_timed_results(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    report.plot_speedup(path, _run(OffsetLSTM, [TINY], ["infer"]))
    assert path.read_bytes().startswith(b"\x89PNG")


def test_mismatch_run_exits_non_zero_unless_allowed(tmp_path: Path) -> None:
    candidate = f"{__name__}:OffsetLSTM"
    assert _main(tmp_path, "--shape", "4,2,3,8", "--modes", "infer", "--device", "cpu",
                 "--candidate", candidate) == 1
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert rows[0]["status"] == "mismatch" and rows[0]["torch_ms"] is None
    assert "MISMATCH" in (tmp_path / "out" / "results.md").read_text()
    assert _main(tmp_path, "--shape", "4,2,3,8", "--modes", "infer", "--device", "cpu",
                 "--candidate", candidate, "--allow-mismatch") == 0


# --- command line -----------------------------------------------------------------------------

def test_help_runs_as_module() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "fused_lstm.benchmark", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for option in ("--preset", "--shape", "--modes", "--dtypes", "--device", "--out", "--allow-mismatch"):
        assert option in done.stdout


def test_help_lists_every_mode_and_shape_field_and_promises_no_unmeasured_duration() -> None:
    text = " ".join(cli.build_parser().format_help().split())
    for mode in MODES:
        assert f"{mode} (" in text, mode
    for field in ("T,N,I,H", "layers", "bidir", "packed", "proj_size"):
        assert field in cli.SHAPE_FIELDS and field in text
    assert "--results-md" in text
    assert "H100" not in text and not re.search(r"~ ?\d+ ?min", text)


def test_list_prints_plan(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["--preset", "gpu", "--device", "cpu", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * len(PRESETS["gpu"].cases)  # fp32 and bf16 rows; fp16 is CUDA only
    assert {" fp32 " in line for line in lines} == {True, False} and not any(" fp16 " in line for line in lines)


@pytest.mark.parametrize("args,message", [
    (["--device", "cpu", "--dtypes", "fp32,fp16"], "fp16 is only benchmarked on CUDA"),
    (["--device", "cpu", "--dtypes", "autocast-fp16"], "fp16 is only benchmarked on CUDA"),
    (["--shape", "1,2,3"], "expected T,N,I,H"),
    (["--modes", "infer,sideways"], "unknown mode sideways"),
    (["--dtypes", "fp8"], "unknown dtype fp8"),
    (["--preset", "huge"], "invalid choice"),
    (["--max-shapes", "0"], "must be > 0"),
    (["--min-repeats", "5", "--max-repeats", "2"], "--max-repeats must be >= --min-repeats"),
    (["--filter", "no-such-shape"], "no shapes selected"),
    (["--device", "cpu", "--candidate", "no_such_module_xyz:LSTM"], "cannot load candidate"),
])
def test_cli_rejects_bad_arguments(args: List[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([*args, "--device", "cpu"] if "--device" not in args else args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_cuda_without_gpu(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--device", "cuda"])
    assert exc.value.code == 2 and "CUDA is not available" in capsys.readouterr().err


# --- packaging --------------------------------------------------------------------------------

def _imported_roots(path: Path) -> List[Optional[str]]:
    roots: List[Optional[str]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            roots.append(None if node.level else (node.module or "").split(".")[0])
    return roots


def test_benchmark_package_depends_only_on_torch_matplotlib_stdlib() -> None:
    stdlib = {"__future__", "argparse", "collections", "copy", "csv", "dataclasses", "datetime", "gc", "importlib",
              "json", "math", "os", "pathlib", "platform", "random", "re", "signal", "statistics", "subprocess", "sys",
              "time", "typing"}
    allowed = stdlib | {"torch", "matplotlib", "numpy", None}
    for path in (REPO / "fused_lstm" / "benchmark").glob("*.py"):
        assert set(_imported_roots(path)) <= allowed, path.name
    init_roots = _imported_roots(REPO / "fused_lstm" / "benchmark" / "__init__.py")
    assert "fused_lstm" not in init_roots


def test_interrupted_run_writes_what_it_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A time limit (SIGTERM) or Ctrl-C mid-run still leaves the finished rows on disk, marked as such."""
    real_run_job = harness._run_job
    calls = []

    def run_job_then_stop(*args: Any, **kwargs: Any) -> List[Result]:
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real_run_job(*args, **kwargs)

    monkeypatch.setattr(harness, "_run_job", run_job_then_stop)
    code = _main(tmp_path, "--shape", "6,3,5,8", "--shape", "5,2,4,8", "--modes", "infer", "--device", "cpu",
                 "--candidate", "torch")
    assert code == 130
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["settings"]["interrupted"] is True
    assert len(doc["results"]) == 1 and doc["results"][0]["status"] == "ok"


# --- LSTMCell loops ---------------------------------------------------------------------------

CELL = Shape(5, 3, 4, 8, cell=True)


@pytest.mark.parametrize("candidate", GOOD_CANDIDATES)
@pytest.mark.parametrize("grads", [False, True], ids=["infer", "train"])
def test_cell_shapes_gate_the_candidates_cell(candidate: str, grads: bool) -> None:
    reference, cand = build_pair(CELL, torch.float32, CPU, resolve_candidate(candidate))
    expected_cell = "fused_lstm.modules.LSTMCell" if candidate == "fused" else "torch.nn.modules.rnn.LSTMCell"
    assert f"{type(cand.cell).__module__}.{type(cand.cell).__qualname__}" == expected_cell
    assert type(reference.cell) is torch.nn.LSTMCell
    gate = _gate(candidate, CELL, grads)
    assert gate.ok, gate.summary()
    assert ("grad_cell.weight_hh" in {c.name for c in gate.checks}) == grads


def test_cell_loop_is_the_lstm_it_unrolls() -> None:
    """CellLoop over torch.nn.LSTMCell against torch.nn.LSTM with the same weights: the same numbers."""
    reference, loop = build_pair(CELL, torch.float64, CPU, torch.nn.LSTM)
    lstm = torch.nn.LSTM(CELL.I, CELL.H, dtype=torch.float64)
    lstm.load_state_dict({f"{k}_l0": v for k, v in loop.cell.state_dict().items()})
    inp = draw_inputs(CELL, torch.float64, CPU, 1)[0]
    (out, (h, c)), (out_ref, (h_ref, c_ref)) = loop(inp.x, inp.hx), lstm(inp.x, inp.hx)
    for got, want in ((out, out_ref), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(got, want)


def test_cell_shape_runs_and_is_reported(tmp_path: Path) -> None:
    results = _run(DEFAULT_CANDIDATE, [CELL], ["infer", "train"])
    assert [r.status for r in results] == ["ok", "ok"] and all(r.cell and r.shape == CELL for r in results)
    assert all(r.speedup and r.speedup > 0 for r in results)
    if DEFAULT_CANDIDATE == "fused":
        assert results[0].fused_path == "cpu:per-step"


@pytest.mark.parametrize("kwargs", [dict(layers=2), dict(bidirectional=True), dict(packed=True), dict(proj_size=2)])
def test_cell_shapes_are_single_layer_dense(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="a cell shape is one layer"):
        Shape(5, 3, 4, 8, cell=True, **kwargs)


def test_cell_factory_needs_an_lstmcell() -> None:
    from fused_lstm.benchmark.candidates import cell_factory

    assert cell_factory(torch.nn.LSTM) is torch.nn.LSTMCell
    with pytest.raises(ImportError, match="no LSTMCell"):
        cell_factory(OffsetLSTM)


# --- train_weights: the input as data ---------------------------------------------------------

@pytest.mark.parametrize("candidate", GOOD_CANDIDATES)
@pytest.mark.parametrize("shape", GATE_SHAPES, ids=lambda s: s.label().replace(" ", "_"))
def test_train_weights_gates_weight_gradients_only(candidate: str, shape: Shape) -> None:
    reference, cand = build_pair(shape, torch.float32, CPU, resolve_candidate(candidate))
    inp = draw_inputs(shape, torch.float32, CPU, 1)[0]
    gate = check_pair(reference, cand, inp, True, tolerance_for("fp32", CPU), data_input=True)
    assert gate.ok, gate.summary()
    names = {c.name for c in gate.checks}
    assert "grad_input" not in names and "grad_weight_ih_l0" in names


def test_train_weights_runs_the_input_as_data() -> None:
    from fused_lstm.benchmark.workloads import make_workload

    seen = []

    class Recording(torch.nn.LSTM):
        def forward(self, input: Any, hx: Any = None) -> Any:  # noqa: A002
            data = input.data if isinstance(input, torch.nn.utils.rnn.PackedSequence) else input
            seen.append(data.requires_grad)
            return super().forward(input, hx)

    for shape in (TINY, Shape(7, 5, 4, 8, packed=True)):
        model = Recording(**shape.lstm_kwargs())
        inp = draw_inputs(shape, torch.float32, CPU, 1)[0]
        workload = make_workload(model, "train_weights")
        grads = workload.run(workload.prepare(inp))
        assert len(grads) == len(list(model.parameters()))
        assert inp.leaf.requires_grad  # the drawn input itself is left as it was
    assert seen == [False, False]


def test_train_weights_flops_drop_the_first_layers_input_gradient() -> None:
    shape = Shape(10, 4, 6, 8, layers=2, bidirectional=True)
    assert mode_flops(shape, "train_weights") == 3 * forward_flops(shape) - 8 * 6 * 8 * 40 * 2


# --- reading the results: noisy rows, the environment, the results page ------------------------

def _timed_row(shape: Shape, mode: str, torch_ms: float, fused_ms: float, fused_iqr: float = 0.0,
               dtype: str = "fp32") -> Result:
    """A timed row as the harness records it, with chosen medians and spreads (torch's IQR is 2%)."""
    row = Result("test", shape.T, shape.N, shape.I, shape.H, shape.layers, shape.bidirectional, shape.packed,
                 shape.proj_size, shape.cell, dtype, mode, "ok", gflop=0.1, torch_algo="cpu")
    for side, median, iqr in (("torch", torch_ms, 0.02 * torch_ms), ("fused", fused_ms, fused_iqr)):
        setattr(row, f"{side}_ms", median)
        setattr(row, f"{side}_q1_ms", median - iqr / 2)
        setattr(row, f"{side}_q3_ms", median + iqr / 2)
        setattr(row, f"{side}_min_ms", median - iqr)
        setattr(row, f"{side}_max_ms", median + iqr)
    row.repeats, row.speedup = 10, torch_ms / fused_ms
    return row


def test_rows_whose_spread_is_large_against_their_median_are_flagged(tmp_path: Path) -> None:
    """The issue's busy-machine row (fused 9.510 ms with an IQR of 17.123) must not pass as a plain 0.16x."""
    quiet = _timed_row(TINY, "infer", 1.5, 1.0, fused_iqr=0.1)
    noisy = _timed_row(TINY, "train", 1.5, 9.51, fused_iqr=17.123)
    edge = _timed_row(TINY, "fwd", 1.0, 1.0, fused_iqr=harness.NOISY_SPREAD * 1.0 * 0.99)
    assert not quiet.noisy and noisy.noisy and not edge.noisy
    assert not Result("test", 1, 1, 1, 1, 1, False, False, 0, False, "fp32", "infer", "mismatch").noisy

    table = report.format_markdown_table([quiet, noisy])
    assert table.splitlines()[2].endswith("| ok |") and table.splitlines()[3].endswith("| ok, noisy: rerun |")
    assert "noisy: rerun" in report.format_table([noisy]) and "noisy: rerun" in harness.progress_line(noisy)
    assert "noisy: 1 rows" in report.format_summary([quiet, noisy])

    report.write_json(tmp_path / "results.json", [quiet, noisy], {"device": "cpu"}, {})
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [r["noisy"] for r in doc["results"]] == [False, True] and doc["summary"]["noisy"] == 1
    assert doc["summary"]["speedup"]["train fp32"]["worst_speedup"] == pytest.approx(1.5 / 9.51)


def test_speedup_range_spans_the_quartiles() -> None:
    row = _timed_row(TINY, "infer", 2.0, 1.0, fused_iqr=0.2)
    low, high = row.speedup_range()
    assert low == pytest.approx(1.98 / 1.1) and high == pytest.approx(2.02 / 0.9) and low < 2.0 < high


_CPU_ENVIRONMENT = {
    "date": "2026-01-02T03:04:05+00:00", "device": "cpu", "device_name": "Test CPU", "torch": "2.0",
    "cuda": "13.0", "cudnn": 92400, "cudnn_enabled": True, "cpu_model": "Test CPU", "cpu_count": 2,
    "torch_threads": 2, "torch_cpu_capability": "AVX512", "git_commit": "0123456789abcdef",
    "tf32": {"torch.backends.cudnn.allow_tf32": True}, "env_vars": {"MALLOC_MMAP_THRESHOLD_": "1073741824"},
    "fused_lstm_build_info": {"cuda": False, "cuda_archs": "", "cpu_kernels": "avx512"},
}


def test_markdown_puts_the_environment_after_the_results_with_cpu_rows_only(tmp_path: Path) -> None:
    report.write_markdown(tmp_path / "results.md", [_timed_row(TINY, "infer", 1.5, 1.0)], _CPU_ENVIRONMENT)
    md = (tmp_path / "results.md").read_text()
    assert md.index("## Summary") < md.index("## Results") < md.index("## Environment")
    assert md.splitlines()[2].startswith("CPU: Test CPU, 2 cores, 2 torch threads (AVX512)")
    environment = md[md.index("## Environment"):]
    assert "| cpu_model | Test CPU |" in environment and "MALLOC_MMAP_THRESHOLD_" in environment
    assert "fused_lstm_build_info.cpu_kernels | avx512" in environment
    for cuda_only in ("| cuda |", "| cudnn", "tf32", "cuda_archs", "| device_name |"):
        assert cuda_only not in environment, cuda_only
    gpu = dict(_CPU_ENVIRONMENT, device="cuda:0", device_name="Test GPU")
    assert ("cuda", "13.0") in report.environment_rows(gpu) and ("device_name", "Test GPU") in report.environment_rows(gpu)


def test_plot_draws_panels_with_different_shapes(tmp_path: Path) -> None:
    rows = [_timed_row(TINY, "infer", 1.5, 1.0), _timed_row(Shape(4, 2, 3, 8), "infer", 0.5, 1.0),
            _timed_row(TINY, "train", 3.0, 1.0, fused_iqr=0.9)]
    report.plot_speedup(tmp_path / "speedup.png", rows)
    assert (tmp_path / "speedup.png").read_bytes().startswith(b"\x89PNG")
    assert 1.0 in report._log_ticks(0.5, 3.0)


def test_results_md_is_generated_from_the_kept_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "results" / "2026-01-02-cpu-test"
    run.mkdir(parents=True)
    big = Shape(5, 4, 6, 8, layers=2, bidirectional=True)
    rows = [_timed_row(TINY, "infer", 1.5, 1.0), _timed_row(TINY, "train", 3.0, 2.0),
            _timed_row(big, "infer", 0.9, 1.0), _timed_row(big, "train", 2.0, 1.0, fused_iqr=0.5)]
    report.write_json(run / "results.json", rows, _CPU_ENVIRONMENT, {"preset": "cpu", "shape": []})
    (run / "raw" / "bench").mkdir(parents=True)  # a raw copy inside the run is not another run
    (run / "raw" / "bench" / "results.json").write_text((run / "results.json").read_text())

    assert cli.main(["--results-md", str(tmp_path)]) == 0
    assert "from 1 runs" in capsys.readouterr().out
    page = (tmp_path / "RESULTS.md").read_text()
    assert "## CPU: Test CPU, 2 cores, 2 torch threads (AVX512)" in page
    assert "`--preset cpu`, 2026-01-02; commit `0123456`" in page and "`MALLOC_MMAP_THRESHOLD_=1073741824`" in page
    assert "[JSON](results/2026-01-02-cpu-test/results.json)" in page
    assert "![speedup per shape](results/2026-01-02-cpu-test/speedup.png)" in page
    geomean = (1.5 * 0.9) ** 0.5
    assert f"| infer | fp32 | 2 | {geomean:.2f}x | 0.90x (T=5 N=4 I=6 H=8 L2 bi) | 0 |" in page
    assert "| train | fp32 | 2 | 1.73x | 1.50x (T=6 N=3 I=5 H=8 L1 uni) | 1 |" in page
    assert "| 6 | 3 | 5 | 8 | L1 uni | 1.500 | 1.000 | 1.50x | 3.000 | 2.000 | 1.50x |" in page
    assert "| 5 | 4 | 6 | 8 | L2 bi | 0.900 | 1.000 | 0.90x | 2.000 | 1.000 | 2.00x (noisy) |" in page
    # each kept run's own markdown and plot are re-rendered from its JSON
    assert "## Environment" in (run / "results.md").read_text()
    assert (run / "speedup.png").read_bytes().startswith(b"\x89PNG")


def test_results_md_needs_a_results_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--results-md", str(tmp_path)])
    assert exc.value.code == 2 and "no results/ folder" in capsys.readouterr().err
