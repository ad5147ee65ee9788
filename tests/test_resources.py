"""Resource budgets of the CUDA kernels, from the ptxas report of this build (no GPU needed).

The build keeps ptxas's per-kernel lines (registers, stack frame, spills) when FUSED_LSTM_PTXAS_REPORT names a
folder (.ci/run sets it; see .ci/nvcc_ptxas_report.py). Every kernel and every dtype instantiation must be
there for every architecture built, must not spill or use a stack frame, and must fit the register budget its
launch assumes: the persistent kernel needs one block of 256 threads per SM (its plan keeps every block of the
grid resident), and so does the persistent backward kernel: at most 65536 / 256 registers per thread.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from typing import Dict, List, Tuple

import pytest

import fused_lstm

REGISTERS_PER_SM = 65536
# Kernel (demangled, as a substring) -> the threads of one block the register budget must allow.
EXPECTED = {
    # (product, exchange, projection): FMA or tensor cores on the grid exchange, FMA in a cluster; each with and
    # without a projection
    **{f"persistent_forward_kernel<{t}, {w}, (fused_lstm::cuda::persistent::Product){p}, "
       f"(fused_lstm::cuda::persistent::Exchange){e}, {j}>": 256
       for t in ("float", "c10::Half", "c10::BFloat16") for w in ("true", "false")
       for p, e in ((0, 0), (1, 0), (0, 1)) for j in ("false", "true")},
    # (projection, product, exchange): FMA or tensor cores on the grid exchange, FMA in a cluster; each with and
    # without a projection
    **{f"persistent_backward_kernel<{t}, {j}, (fused_lstm::cuda::persistent::Product){p}, "
       f"(fused_lstm::cuda::persistent::Exchange){e}>": 256
       for t in ("float", "c10::Half", "c10::BFloat16")
       for p, e in ((0, 0), (1, 0), (0, 1)) for j in ("false", "true")},
    **{f"{k}<{t}>": 256 for k in ("step_forward_kernel", "step_backward_kernel")
       for t in ("float", "double", "c10::Half", "c10::BFloat16")},
}

Usage = Dict[str, int]


def demangle(names: List[str]) -> Dict[str, str]:
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_report(text: str) -> Dict[Tuple[str, str], Usage]:
    """(kernel, arch) -> registers, stack, spill_stores, spill_loads, from ptxas -v lines."""
    usage: Dict[Tuple[str, str], Usage] = {}
    entry = None
    properties_of = None
    arch_of: Dict[str, str] = {}
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            entry = (m.group(1), m.group(2))
            arch_of[m.group(1)] = m.group(2)
            usage.setdefault(entry, {})
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            properties_of = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and properties_of in arch_of:
            key = (properties_of, arch_of[properties_of])
            usage.setdefault(key, {}).update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                             spill_loads=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and entry is not None:
            usage[entry]["registers"] = int(m.group(1))
    names = demangle(sorted({k for k, _ in usage}))
    return {(names[k], arch): u for (k, arch), u in usage.items()}


def budget_violations(usage: Dict[Tuple[str, str], Usage]) -> List[str]:
    problems = []
    for (kernel, arch), u in sorted(usage.items()):
        if u.get("spill_stores", 0) or u.get("spill_loads", 0) or u.get("stack", 0):
            problems.append(f"{kernel} ({arch}) spills: {u}")
        threads = next((t for name, t in EXPECTED.items() if name in kernel), None)
        if threads is not None and u.get("registers", 0) * threads > REGISTERS_PER_SM:
            problems.append(f"{kernel} ({arch}) uses {u['registers']} registers per thread: {threads} threads "
                            f"need more than one SM's {REGISTERS_PER_SM}")
    return problems


def missing_kernels(usage: Dict[Tuple[str, str], Usage]) -> List[str]:
    archs = sorted({arch for _, arch in usage})
    return [f"{name} ({arch})" for name in EXPECTED for arch in archs
            if not any(name in kernel and a == arch for kernel, a in usage)]


SAMPLE = """\
ptxas info    : Compiling entry function '_ZN10fused_lstm4cuda19step_forward_kernelIfEEvPT_S3_PKS2_S3_S3_lS3_S3_jN2at4cuda6detail10IntDividerIjEEl' for 'sm_90'
ptxas info    : Function properties for _ZN10fused_lstm4cuda19step_forward_kernelIfEEvPT_S3_PKS2_S3_S3_lS3_S3_jN2at4cuda6detail10IntDividerIjEEl
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 26 registers, used 0 barriers, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN10fused_lstm4cuda20step_backward_kernelIfEEvPKT_S4_S4_S4_lPS2_S5_S5_jN2at4cuda6detail10IntDividerIjEE' for 'sm_90'
ptxas info    : Function properties for _ZN10fused_lstm4cuda20step_backward_kernelIfEEvPKT_S4_S4_S4_lPS2_S5_S5_jN2at4cuda6detail10IntDividerIjEE
    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 400 bytes cmem[0]
"""


def test_report_parser_finds_spills_and_register_overruns():
    usage = parse_report(SAMPLE)
    assert len(usage) == 2
    problems = budget_violations(usage)
    assert len(problems) == 1 and "step_backward_kernel" in problems[0] and "spills" in problems[0]
    usage[next(k for k in usage if "step_forward" in k[0])]["registers"] = 300
    assert any("300 registers" in p for p in budget_violations(usage))
    assert ("persistent_forward_kernel<float, true, (fused_lstm::cuda::persistent::Product)1, "
            "(fused_lstm::cuda::persistent::Exchange)0, true> (sm_90)") in missing_kernels(usage)
    assert ("persistent_backward_kernel<c10::Half, true, (fused_lstm::cuda::persistent::Product)1, "
            "(fused_lstm::cuda::persistent::Exchange)0> (sm_90)") in missing_kernels(usage)


def report_text() -> str:
    folder = os.environ.get("FUSED_LSTM_PTXAS_REPORT")
    if not fused_lstm.build_info()["cuda"]:
        pytest.skip("this build has no CUDA kernels")
    files = sorted(glob.glob(os.path.join(folder, "*.txt"))) if folder else []
    if not files:
        if os.environ.get("CI") == "true":
            pytest.fail("CI builds the CUDA kernels but left no ptxas report: .ci/run must set FUSED_LSTM_PTXAS_REPORT")
        pytest.skip("no ptxas report: build with FUSED_LSTM_PTXAS_REPORT=<folder> to check the kernels' budgets")
    return "\n".join(open(f).read() for f in files)


def test_every_kernel_within_budget():
    usage = parse_report(report_text())
    assert not missing_kernels(usage), missing_kernels(usage)
    assert not budget_violations(usage), budget_violations(usage)
    built = {arch for _, arch in usage}
    archs = fused_lstm.build_info()["cuda_archs"].replace("+PTX", "").split(";")
    assert {f"sm_{a.replace('.', '')}" for a in archs} <= built
