"""Tests of ``benchmarks/device_check.sh`` (the GPU check) and ``benchmarks/device_summary.py`` (its summary), on a
machine without a GPU.

The check only does real work on a CUDA machine, where time is short, so what can go wrong before it gets there
is checked here: the plan (``DRY_RUN=1``: the stages, their commands and limits, that the limits fit the
deadline), the errors for a bad ``STAGES`` or a plan that does not fit, the exit without a GPU, the
compute-sanitizer skips (a fake ``compute-sanitizer`` first on PATH that refuses the device), whole runs with a
fake ``python`` standing in for torch, pytest and the benchmark (stage order, a stage stopped by its limit, the
results folder, the summary printed last), the summary's parsers on synthetic junit XML, pytest logs and
results.json, and that every shape the persistent stage forces onto the persistent kernel fits that kernel on
an H100.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import stat
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.sh"
DEFAULT_STAGES = ["build", "tests", "persistent", "bench"]
#: One call of the check must end within 8 minutes, so that a rerun still fits the GPU time of a run.
CALL_LIMIT = 480
#: The tail of the output a caller may keep: the summary must fit in it.
KEPT_OUTPUT = 12_000
ENV_KNOBS = ("STAGES", "TOTAL_LIMIT", "DRY_RUN", "OUT", "PYTHON", "COMPUTE_SANITIZER", "BUILD_LIMIT", "TEST_LIMIT",
             "PERSISTENT_LIMIT", "BENCH_LIMIT", "SANITIZER_LIMIT", "BENCH_MODES")

spec = importlib.util.spec_from_file_location("device_summary", REPO / "benchmarks" / "device_summary.py")
device_summary = importlib.util.module_from_spec(spec)
sys.modules["device_summary"] = device_summary
spec.loader.exec_module(device_summary)


def run_script(tmp_path: Path, *args: str, timeout: int = 120, **env: str) -> Tuple[int, str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ENV_KNOBS}
    full_env.update(env)
    done = subprocess.run(["bash", str(SCRIPT), *args], env=full_env, capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)
    return done.returncode, done.stdout + done.stderr


def planned_stages(log: str) -> Dict[str, int]:
    """Stage name -> time limit, from the '== [name] (limit Ns...): command' lines, in order."""
    return {name: int(limit) for name, limit in re.findall(r"^== \[(\w+)\] \(limit (\d+)s", log, re.M)}


def stage_command(log: str, name: str) -> List[str]:
    line = re.search(rf"^== \[{name}\] \(limit [^)]*\): (.*)$", log, re.M).group(1)
    return shlex.split(line)


def plan_numbers(log: str) -> Tuple[int, int, int]:
    """(sum of the limits, the planned total with grace and reserve, the deadline) from the 'plan:' line."""
    match = re.search(r"^plan: limits (\d+)s .* = (\d+)s of the (\d+)s deadline", log, re.M)
    assert match, log
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


# ---- the plan -------------------------------------------------------------------------------------------------

def test_dry_run_plans_the_default_stages_within_one_call(tmp_path: Path) -> None:
    rc, log = run_script(tmp_path, DRY_RUN="1")
    assert rc == 0, log
    stages = planned_stages(log)
    assert list(stages) == DEFAULT_STAGES, log
    assert "sanitizer" not in stages
    assert "STAGES=sanitizer" in log  # says how to run it
    limits_sum, total, deadline = plan_numbers(log)
    assert limits_sum == sum(stages.values())
    assert deadline <= CALL_LIMIT
    # The limits leave a margin for the stop grace, the environment and the summary, and all of it fits.
    assert limits_sum + 60 <= total <= deadline, log
    assert all(15 <= limit < deadline for limit in stages.values()), stages
    assert "nothing was run" in log
    assert not (tmp_path / "device-results").exists() and not list(tmp_path.iterdir())


def test_dry_run_commands(tmp_path: Path) -> None:
    rc, log = run_script(tmp_path, DRY_RUN="1")
    assert rc == 0, log
    build = " ".join(stage_command(log, "build"))
    # Offline, against the installed torch, for this GPU's architecture only.
    for flag in ("pip install", "--no-build-isolation", "--no-index", "--no-deps", "-e .", "TORCH_CUDA_ARCH_LIST="):
        assert flag in build, build
    tests = stage_command(log, "tests")
    assert "tests/test_cuda.py" in tests and "tests/test_persistent.py" in tests
    assert "tests/test_ops.py" not in tests and "tests/test_cell_op.py" not in tests
    assert tests[tests.index("-m", tests.index("pytest") + 1) + 1] == "cuda"
    assert "not compute_sanitizer" in tests
    assert any(word.startswith("--junitxml=") and word.endswith("tests.xml") for word in tests)
    bench = stage_command(log, "bench")
    assert bench[bench.index("--preset") + 1] == "gpu" and "--out" in bench
    assert "FUSED_LSTM_PERSISTENT=1" in stage_command(log, "persistent")


def test_sanitizer_is_a_call_of_its_own_that_fits(tmp_path: Path) -> None:
    rc, log = run_script(tmp_path, DRY_RUN="1", STAGES="sanitizer")
    assert rc == 0, log
    stages = planned_stages(log)
    # A machine that has not built fused_lstm builds it first: the plan counts that build.
    assert list(stages) == ["build", "sanitizer"], log
    assert re.search(r"^== \[build\] \(limit \d+s, only if", log, re.M)
    limits_sum, total, deadline = plan_numbers(log)
    assert limits_sum == sum(stages.values()) and total <= deadline <= CALL_LIMIT
    assert "-k compute_sanitizer" in log and "tests/test_cuda.py" in log


def test_stages_run_in_a_fixed_order(tmp_path: Path) -> None:
    rc, log = run_script(tmp_path, DRY_RUN="1", STAGES="bench tests build")
    assert rc == 0, log
    assert list(planned_stages(log)) == ["build", "tests", "bench"]


@pytest.mark.parametrize("dry_run", ["1", "0"])
def test_an_unknown_stage_is_an_error(tmp_path: Path, dry_run: str) -> None:
    rc, log = run_script(tmp_path, DRY_RUN=dry_run, STAGES="build benchmark")
    assert rc == 2, log
    assert "unknown stage 'benchmark'" in log
    assert planned_stages(log) == {}


def test_a_limit_that_is_not_a_number_is_an_error(tmp_path: Path) -> None:
    rc, log = run_script(tmp_path, DRY_RUN="1", TEST_LIMIT="2m")
    assert rc == 2 and "TEST_LIMIT" in log, log


def test_a_plan_that_does_not_fit_the_deadline_does_not_start(tmp_path: Path) -> None:
    rc, log = run_script(tmp_path, DRY_RUN="1", TOTAL_LIMIT="300")
    assert rc == 2, log
    assert "does not fit" in log
    rc, log = run_script(tmp_path, DRY_RUN="1", BENCH_LIMIT="400")
    assert rc == 2 and "does not fit" in log, log


# ---- runs without a GPU -----------------------------------------------------------------------------------------

def results_files(folder: Path) -> List[str]:
    files = sorted(p.name for p in folder.iterdir())
    # What one call leaves is a handful of files and no folder (the logs are packed).
    assert len(files) <= 8 and all((folder / f).is_file() for f in files), files
    return files


def test_without_a_gpu_it_exits_non_zero_and_says_why(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU exit")
    rc, log = run_script(tmp_path, str(tmp_path / "out"), STAGES="tests bench")
    assert rc == 1, log
    assert "no CUDA device visible to torch" in log
    files = results_files(tmp_path / "out")
    assert {"env-tests-bench.txt", "summary-tests-bench.txt", "logs-tests-bench.tgz"} <= set(files), files
    tail = log.rstrip().splitlines()[-3:]
    assert any(line.split()[0] == "tests" and "NOT STARTED" in line for line in tail), tail


def write_executable(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def fake_sanitizer(folder: Path, refuse: bool) -> Path:
    """A compute-sanitizer first on PATH: one that refuses the device as some machines' does, or one that runs
    the program it is given."""
    folder.mkdir(exist_ok=True)
    if refuse:
        body = """\
            #!/usr/bin/env bash
            [ "$1" = --version ] && { echo "NVIDIA (R) Compute Sanitizer"; echo "Version 2025.3.0"; exit 0; }
            echo "========= COMPUTE-SANITIZER"
            echo "========= Error: Device not supported"
            echo "RuntimeError: CUDA error: unknown error (error 999)"
            exit 1
            """
    else:
        body = """\
            #!/usr/bin/env bash
            [ "$1" = --version ] && { echo "Version 2025.3.0"; exit 0; }
            shift 2  # --tool memcheck
            exec "$@"
            """
    return write_executable(folder / "compute-sanitizer", body)


def test_a_sanitizer_that_refuses_the_device_is_a_skip(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_sanitizer(bin_dir, refuse=True)
    out = tmp_path / "out"
    rc, log = run_script(tmp_path, str(out), STAGES="sanitizer", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert rc == 0, log
    last = log.rstrip().splitlines()[-1]
    assert last.split()[0] == "sanitizer" and "SKIP" in last and "Device not supported" in last, last
    assert "building first" not in log and "== [build]" not in log  # decided before any build
    files = results_files(out)
    assert {"env-sanitizer.txt", "summary-sanitizer.txt", "logs-sanitizer.tgz"} <= set(files), files
    assert "Device not supported" in (out / "summary-sanitizer.txt").read_text()
    with tarfile.open(out / "logs-sanitizer.tgz") as tar:
        assert "raw-sanitizer/sanitizer-probe.log" in tar.getnames()


def test_a_missing_sanitizer_is_a_skip(tmp_path: Path) -> None:
    rc, log = run_script(tmp_path, str(tmp_path / "out"), STAGES="sanitizer",
                         COMPUTE_SANITIZER=str(tmp_path / "no-such-compute-sanitizer"))
    assert rc == 0, log
    assert re.search(r"^\s*sanitizer\s.*SKIP: compute-sanitizer not found", log, re.M), log


# ---- whole runs with a fake python ------------------------------------------------------------------------------

FAKE_PYTHON = """\
    #!{python}
    # Stands in for the Python that has torch: the environment snippet, pip, pytest and the benchmark.
    import json, os, sys, time
    from pathlib import Path
    args = sys.argv[1:]
    with open(os.environ["FAKE_LOG"], "a") as log:
        log.write(json.dumps({{"argv": args, "arch": os.environ.get("TORCH_CUDA_ARCH_LIST"),
                               "persistent": os.environ.get("FUSED_LSTM_PERSISTENT")}}) + "\\n")
    if args and args[0].endswith("device_summary.py"):
        os.execv({python!r}, [{python!r}] + args)
    if args[:1] == ["-"]:
        sys.stdin.read()
        print("python: 3.12.3\\ntorch: 2.11.0+cu130 cuda: 13.0 cudnn: 91002")
        print("device: Fake GPU 80GB sm_90, 132 SMs, 79 GiB\\ncard: Fake GPU 80GB\\narch: 9.0")
    elif args[:2] == ["-m", "pip"]:
        print("ptxas info    : Used 64 registers, 0 bytes spill stores, 0 bytes spill loads")
        sys.exit(1 if os.environ.get("FAKE_FAIL") == "build" else 0)
    elif args[:1] == ["-c"]:
        print("sanitizer probe ok 8.0" if "sanitizer probe" in args[1] else "build_info: {{}}")
    elif args[:2] == ["-m", "pytest"]:
        xml = next(a.split("=", 1)[1] for a in args if a.startswith("--junitxml="))
        Path(xml).write_text('<testsuites><testsuite name="pytest">'
                             '<testcase classname="tests.test_cuda" name="test_a"/>'
                             '<testcase classname="tests.test_cuda" name="test_b"/>'
                             '<testcase classname="tests.test_persistent" name="test_c"/>'
                             '</testsuite></testsuites>')
        print("tests/test_cuda.py::test_a PASSED")
    elif args[:2] == ["-m", "fused_lstm.benchmark"]:
        persistent = os.environ.get("FUSED_LSTM_PERSISTENT") == "1"
        if persistent and os.environ.get("FAKE_HANG") == "persistent":
            time.sleep(300)
        out = Path(args[args.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        row = dict(T=100, N=64, I=512, H=512, layers=1, bidirectional=False, packed=False, proj_size=0, cell=False,
                   dtype="fp32", mode="infer", status="ok", speedup=1.75 if persistent else 1.5)
        (out / "results.json").write_text(json.dumps({{"settings": {{}}, "summary": {{}}, "results": [row]}}))
        (out / "results.md").write_text("# fused_lstm vs torch.nn.LSTM\\n")
    else:
        sys.exit("fake python: unexpected " + " ".join(args))
    """


def fake_run(tmp_path: Path, **env: str) -> Tuple[int, str, Path, List[Dict]]:
    fake = write_executable(tmp_path / "fake-python", FAKE_PYTHON.format(python=sys.executable))
    out = tmp_path / "out"
    calls = tmp_path / "calls.jsonl"
    rc, log = run_script(tmp_path, str(out), PYTHON=str(fake), FAKE_LOG=str(calls), **env)
    return rc, log, out, [json.loads(line) for line in calls.read_text().splitlines()]


def call_of(calls: List[Dict], *words: str) -> Optional[Dict]:
    return next((c for c in calls if all(w in c["argv"] for w in words)), None)


def test_a_whole_run_passes_and_ends_with_its_summary(tmp_path: Path) -> None:
    rc, log, out, calls = fake_run(tmp_path)
    assert rc == 0, log
    # The stages ran in order, with the commands the plan shows.
    order = [m for m in re.findall(r"^== \[(\w+)\] ok in", log, re.M)]
    assert order == DEFAULT_STAGES, log
    build = call_of(calls, "pip")
    assert build["arch"] == "9.0" and "--no-build-isolation" in build["argv"] and "-e" in build["argv"]
    tests = call_of(calls, "pytest")
    assert {"tests/test_cuda.py", "tests/test_persistent.py"} <= set(tests["argv"])
    assert call_of(calls, "fused_lstm.benchmark", "--preset")["persistent"] is None
    assert call_of(calls, "fused_lstm.benchmark", "--shape")["persistent"] == "1"
    # The summary is the last thing printed, small enough to be kept, with the counts and the speedups.
    summary = (out / "summary.txt").read_text()
    assert log.rstrip().endswith(summary.rstrip())
    assert len(summary) < KEPT_OUTPUT / 2
    assert "GPU tests: 3 passed, 0 failed, 0 errors, 0 skipped of 3" in summary
    assert re.search(r"T=100 N=64 I=512 H=512 L1 uni\s+fp32\s+1\.50x", summary), summary
    assert re.search(r"T=100 N=64 I=512 H=512 L1 uni\s+fp32\s+1\.75x", summary), summary
    assert "gpu: " in summary or "device: Fake GPU" in summary
    files = results_files(out)
    assert set(files) == {"env.txt", "summary.txt", "tests.xml", "results.json", "results.md", "persistent.json",
                          "logs.tgz"}, files
    assert "Fake GPU" in (out / "env.txt").read_text() and "commit: " in (out / "env.txt").read_text()
    with tarfile.open(out / "logs.tgz") as tar:
        names = tar.getnames()
    assert {"raw/build.log", "raw/tests.log", "raw/bench.log", "raw/ptxas.txt", "raw/stages.tsv"} <= set(names)


def test_a_stage_stopped_by_its_limit_times_out_and_the_rest_still_runs(tmp_path: Path) -> None:
    rc, log, out, _ = fake_run(tmp_path, FAKE_HANG="persistent", PERSISTENT_LIMIT="15")
    assert rc == 1, log
    assert re.search(r"^== \[persistent\] TIMEOUT after 15s", log, re.M), log
    assert re.search(r"^== \[bench\] ok in", log, re.M), log
    stages = log[log.rindex("-- stages"):]
    assert re.search(r"persistent\s.*TIMEOUT", stages) and re.search(r"bench\s.*ok", stages), stages
    assert "persistent.json" not in results_files(out)


def test_a_failed_build_stops_the_stages_that_need_it(tmp_path: Path) -> None:
    rc, log, _, calls = fake_run(tmp_path, FAKE_FAIL="build")
    assert rc == 1, log
    assert re.search(r"^\s*build\s.*FAILED", log, re.M)
    assert re.search(r"^\s*tests\s.*NOT STARTED: the build did not succeed", log, re.M), log
    assert call_of(calls, "pytest") is None


def test_a_sanitizer_that_runs_gives_its_test_counts(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_sanitizer(bin_dir, refuse=False)
    rc, log, out, calls = fake_run(tmp_path, STAGES="sanitizer", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert rc == 0, log
    assert re.search(r"^\s*sanitizer\s+\d+\s+\d+\s+ok$", log, re.M), log
    assert "compute-sanitizer tests: 3 passed" in log
    sanitizer_tests = call_of(calls, "pytest")
    assert "compute_sanitizer" in sanitizer_tests["argv"] and "tests/test_cuda.py" in sanitizer_tests["argv"]
    assert "sanitizer.xml" in results_files(out)


def test_results_go_to_OUT_when_set_else_to_a_folder_named_after_the_card(tmp_path: Path) -> None:
    fake = write_executable(tmp_path / "fake-python", FAKE_PYTHON.format(python=sys.executable))
    env = dict(PYTHON=str(fake), FAKE_LOG=str(tmp_path / "calls.jsonl"), STAGES="tests")
    rc, log = run_script(tmp_path, OUT=str(tmp_path / "o"), **env)
    assert rc == 0, log
    assert {"summary-tests.txt", "env-tests.txt", "tests.xml", "logs-tests.tgz"} <= set(results_files(tmp_path / "o"))
    before = set((REPO / "benchmarks" / "results").iterdir())
    try:
        rc, log = run_script(tmp_path, **env)
        made = set((REPO / "benchmarks" / "results").iterdir()) - before
        assert rc == 0, log
        assert len(made) == 1, made
        folder = made.pop()
        # <date>-gpu-<card>-<commit>
        assert re.fullmatch(r"\d{4}-\d\d-\d\d-gpu-fake-gpu-80gb-[0-9a-f]{7,}", folder.name), folder.name
        assert f"results: {folder}" in log
    finally:
        import shutil

        for folder in set((REPO / "benchmarks" / "results").iterdir()) - before:
            shutil.rmtree(folder)


# ---- the summary's parsers ----------------------------------------------------------------------------------------

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5" time="12.3">
<testcase classname="tests.test_cuda" name="test_a[fp32]" time="1.0"/>
<testcase classname="tests.test_cuda" name="test_a[bf16]" time="1.0"/>
<testcase classname="tests.test_cuda" name="test_b" time="2.0"><failure message="AssertionError: max error 3e-2">trace</failure></testcase>
<testcase classname="tests.test_persistent" name="test_c" time="0.1"><error message="CUDA error: an illegal memory access">trace</error></testcase>
<testcase classname="tests.test_persistent" name="test_d" time="0.0"><skipped type="pytest.skip" message="the persistent kernel declines this shape">skip</skipped></testcase>
</testsuite></testsuites>
"""


def bench_row(N: int, H: int, dtype: str, mode: str, status: str = "ok", speedup: Optional[float] = 1.25,
              **kw) -> Dict:
    row = dict(group="sweep", T=100, N=N, I=H, H=H, layers=1, bidirectional=False, packed=False, proj_size=0,
               cell=False, dtype=dtype, mode=mode, status=status, speedup=speedup if status == "ok" else None,
               message="" if status == "ok" else "max abs err 0.5 > 0.01")
    row.update(kw)
    return row


def test_junit_counts(tmp_path: Path) -> None:
    path = tmp_path / "tests.xml"
    path.write_text(JUNIT)
    counts = device_summary.junit_counts(path)
    assert dict(counts.counts) == {"passed": 2, "failed": 1, "error": 1, "skipped": 1}
    assert counts.line().startswith("2 passed, 1 failed, 1 errors, 1 skipped of 5")
    assert counts.failures == [("tests.test_cuda::test_b", "AssertionError: max error 3e-2"),
                               ("tests.test_persistent::test_c", "CUDA error: an illegal memory access")]
    assert counts.skip_reasons == {"the persistent kernel declines this shape": 1}


def test_log_counts_of_a_run_stopped_before_its_xml(tmp_path: Path) -> None:
    log = tmp_path / "tests.log"
    log.write_text(textwrap.dedent("""\
        ============================= test session starts ==============================
        tests/test_cuda.py::test_a[fp32] PASSED                                  [  1%]
        tests/test_cuda.py::test_a[bf16] FAILED                                  [  2%]
        tests/test_cuda.py::test_b SKIPPED (needs something)                     [  3%]
        tests/test_persistent.py::test_c PASSED                                  [  4%]
        tests/test_persistent.py::test_hangs
        """))
    counts = device_summary.log_counts(log)
    assert (counts.counts["passed"], counts.counts["failed"], counts.counts["skipped"]) == (2, 1, 1)
    assert ("tests/test_persistent.py::test_hangs", "was running when the run stopped") in counts.failures
    assert "no XML" in counts.line() and "1 unfinished" in counts.line()


def test_summary_of_a_synthetic_run(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    (raw / "bench").mkdir(parents=True)
    (raw / "tests.xml").write_text(JUNIT)
    (raw / "env.txt").write_text("date: 2026-12-05T12:00:00Z\ncommit: abc\ngpu: NVIDIA H100 80GB HBM3, 580.1, "
                                 "81559 MiB, 1980 MHz\ntorch: 2.11.0+cu130 cuda: 13.0 cudnn: 91002\nstages: x\n")
    rows = [bench_row(64, 512, d, m, speedup=s) for d, s in (("fp32", 1.5), ("bf16", 0.8))
            for m in ("infer", "train")]
    rows += [bench_row(1, 256, "fp32", "infer", speedup=2.0), bench_row(1, 256, "fp32", "train", status="mismatch"),
             bench_row(20, 512, "fp16", "infer", cell=True, speedup=3.0),
             bench_row(100, 512, "fp32", "infer", layers=2, bidirectional=True, packed=True, speedup=1.1)]
    (raw / "bench" / "results.json").write_text(json.dumps({"settings": {"interrupted": True}, "results": rows,
                                                            "summary": {"speedup": {}}}))
    (raw / "stages.tsv").write_text("build\tok\t61\t120\ntests\tFAILED (rc 1)\t95\t140\nbench\tTIMEOUT after 80s"
                                    "\t90\t80\n")
    text = device_summary.summarize(raw)
    assert "GPU tests: 2 passed, 1 failed, 1 errors, 1 skipped of 5 (tests.xml)" in text
    assert "FAILED tests.test_cuda::test_b: AssertionError: max error 3e-2" in text
    assert "gpu: NVIDIA H100 80GB HBM3" in text and "stages: x" not in text
    assert "stopped by its limit" in text
    lines = text.splitlines()
    header = next(line for line in lines if line.strip().startswith("shape"))
    assert header.split()[2:] == ["infer", "train"]
    assert re.search(r"T=100 N=64 I=512 H=512 L1 uni\s+fp32\s+1\.50x\s+1\.50x$", text, re.M)
    assert re.search(r"T=100 N=64 I=512 H=512 L1 uni\s+bf16\s+0\.80x\s+0\.80x$", text, re.M)
    assert re.search(r"T=100 N=1 I=256 H=256 L1 uni\s+fp32\s+2\.00x\s+MISMATCH$", text, re.M)
    assert re.search(r"T=100 N=20 I=512 H=512 cell\s+fp16\s+3\.00x\s+-$", text, re.M)
    assert "T=100 N=100 I=512 H=512 L2 bi packed" in text
    # Geometric means are computed when the file has none: fp32 infer over 1.5, 2.0, 1.1.
    expected = math.exp((math.log(1.5) + math.log(2.0) + math.log(1.1)) / 3)
    assert f"geomean infer fp32: {expected:.2f}x over 3 shapes" in text
    assert "MISMATCH T=100 N=1 I=256 H=256 L1 uni fp32 train: max abs err 0.5 > 0.01" in text
    # The stage table comes last.
    assert re.search(r"^\s+bench\s+90\s+80\s+TIMEOUT after 80s$", lines[-1]), lines[-1]


def test_summary_falls_back_to_the_benchmark_log(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "bench.log").write_text(
        "[1/3] T=100 N=64 I=512 H=512 L1 uni fp32 infer: torch 1.200 ms, fused 0.800 ms, 1.50x  12.30 TFLOP/s\n"
        "[2/3] T=100 N=64 I=512 H=512 L2 bi packed bf16 train: MISMATCH grad_x max err 1.0\n"
        "[3/3] T=100 N=8 I=512 H=512 cell fp32 infer: torch 1.000 ms, fused 2.000 ms, 0.50x  (noisy: rerun)\n")
    text = device_summary.summarize(raw)
    assert "from bench.log" in text
    assert re.search(r"T=100 N=64 I=512 H=512 L1 uni\s+fp32\s+1\.50x", text)
    assert re.search(r"T=100 N=64 I=512 H=512 L2 bi packed\s+bf16\s+-\s+MISMATCH", text)
    assert re.search(r"T=100 N=8 I=512 H=512 cell\s+fp32\s+0\.50x", text)


def test_summary_of_a_full_gpu_preset_fits_the_kept_output(tmp_path: Path) -> None:
    """The gpu preset's 42 (shape, dtype) pairs in 5 modes, with failing tests: the summary stays well within
    the tail of the output that is kept."""
    raw = tmp_path / "raw"
    (raw / "bench").mkdir(parents=True)
    (raw / "persistent").mkdir()
    rows = [bench_row(n, h, d, m, speedup=1.0 + n / 100) for n in (1, 8, 64, 128, 256) for h in (256, 512, 1024)
            for d in ("fp32", "bf16", "fp16") for m in device_summary.MODES][:210]
    (raw / "bench" / "results.json").write_text(json.dumps({"results": rows}))
    (raw / "persistent" / "results.json").write_text(json.dumps({"results": rows[:16]}))
    junit = "".join(f'<testcase classname="tests.test_cuda" name="test_{i}"><failure message="{"x" * 400}"/>'
                    f"</testcase>" for i in range(40))
    (raw / "tests.xml").write_text(f"<testsuites><testsuite>{junit}</testsuite></testsuites>")
    text = device_summary.summarize(raw)
    assert len(text) < KEPT_OUTPUT * 3 // 4, len(text)
    assert "... and 28 more" in text


def test_summary_cli(tmp_path: Path) -> None:
    (tmp_path / "stages.tsv").write_text("sanitizer\tSKIP: compute-sanitizer not found\t0\t\n")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "device_summary.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\s+sanitizer\s+0\s+SKIP: compute-sanitizer not found$", done.stdout, re.M), done.stdout
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "device_summary.py")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "usage" in done.stderr


# ---- the persistent stage's shapes -----------------------------------------------------------------------------

def persistent_plan_fits(batch: int, hidden: int, element_size: int, backward: bool, proj: int = 0) -> bool:
    """Whether the persistent kernel's own plan (csrc/cuda/persistent, run by the CUDA emulator under its
    H100 profile: 132 SMs, 227 KB of shared memory per block) has a launch for this shape."""
    emu = pytest.importorskip("fused_lstm._emu", reason="the CUDA emulator is not built")
    dtype = {4: torch.float32, 2: torch.bfloat16}[element_size]
    previous = emu.device_profile()
    emu.set_device_profile("h100")
    try:
        torch.ops.fused_lstm_emu.persistent_plan(torch.empty(1, dtype=dtype), batch, hidden, backward, proj)
        return True
    except RuntimeError:
        return False
    finally:
        emu.set_device_profile(previous)


def persistent_stage_jobs(tmp_path: Path) -> List[Tuple[int, int, int, int]]:
    """(batch, hidden, element size, proj_size) of every shape and dtype the persistent stage forces, from its
    command."""
    rc, log = run_script(tmp_path, DRY_RUN="1")
    assert rc == 0, log
    words = stage_command(log, "persistent")
    assert "FUSED_LSTM_PERSISTENT=1" in words
    shapes = [words[i + 1] for i, w in enumerate(words) if w == "--shape"]
    dtypes = words[words.index("--dtypes") + 1].split(",")
    sizes = {"fp32": 4, "bf16": 2, "fp16": 2}
    jobs = []
    for shape in shapes:
        fields = shape.split(",")
        _, batch, _, hidden = (int(v) for v in fields[:4])
        proj = int(fields[7]) if len(fields) > 7 else 0
        jobs += [(batch, hidden, sizes[d], proj) for d in dtypes]
    return jobs


def test_persistent_stage_shapes_fit_the_kernel_on_an_h100(tmp_path: Path) -> None:
    """The stage trains too, so every shape must fit the forward and the backward kernel."""
    jobs = persistent_stage_jobs(tmp_path)
    assert len(jobs) >= 4 and any(proj for *_, proj in jobs)  # a projection shape too
    assert [job for job in jobs for backward in (False, True)
            if not persistent_plan_fits(*job[:3], backward, job[3])] == []


def test_persistent_plan_rejects_what_does_not_fit() -> None:
    # fp32, batch 32, H = 1024: at most 6 units per block fit 227 KB, and 171 blocks are more than 132 SMs.
    assert not persistent_plan_fits(32, 1024, 4, backward=False)
    assert persistent_plan_fits(32, 1024, 2, backward=False)
    assert persistent_plan_fits(16, 1024, 4, backward=False)
    # Backward stages [N, 4H] gate gradients: fp32 batch 16 at H = 1024 does not fit, bf16 does.
    assert not persistent_plan_fits(16, 1024, 4, backward=True)
    assert persistent_plan_fits(16, 1024, 2, backward=True)
