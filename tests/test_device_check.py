"""Tests of ``benchmarks/device_check.sh``, the one-shot GPU check, on a machine without a GPU.

The script only does real work on a GPU machine, where device time is scarce (one call of at most ten
minutes), so what can go wrong before it gets there is checked here: the stage plan and its time limits
(through ``DRY_RUN=1``), the exit status without a GPU, and that every shape the persistent stage forces
onto the persistent kernel fits that kernel on an H100.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.sh"
ALL_STAGES = ["build", "tests", "bench", "persistent", "sanitizer"]
#: The device tool's limit for one command, in seconds.
DEVICE_COMMAND_LIMIT = 600


def run_script(tmp_path: Path, **env: str) -> Tuple[int, str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("STAGES", "TOTAL_LIMIT", "DRY_RUN")}
    full_env.update(env)
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], env=full_env, capture_output=True,
                          text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


def planned_stages(log: str) -> Dict[str, int]:
    """Stage name -> time limit, from the '== [name] (limit Ns): command' lines, in order."""
    return {name: int(limit) for name, limit in re.findall(r"^== \[(\w+)\] \(limit (\d+)s\)", log, re.M)}


def test_dry_run_plans_every_stage_in_order_within_one_device_command(tmp_path: Path) -> None:
    rc, log = run_script(tmp_path, DRY_RUN="1")
    assert rc == 0, log
    stages = planned_stages(log)
    assert list(stages) == ALL_STAGES, log
    deadline = int(re.search(r"deadline (\d+)s", log).group(1))
    # The whole script, with the time its stages may take and the summary, ends inside one device call.
    assert deadline <= DEVICE_COMMAND_LIMIT - 20
    assert all(0 < limit <= deadline for limit in stages.values()), stages
    # Everything but the last stage fits the deadline at its full limit, so only the sanitizer can be cut short.
    assert sum(limit for name, limit in stages.items() if name != "sanitizer") <= deadline - 10, stages


def test_deadline_leaves_stages_unstarted_and_fails(tmp_path: Path) -> None:
    rc, log = run_script(tmp_path, DRY_RUN="1", TOTAL_LIMIT="25")
    assert rc == 1, log
    assert planned_stages(log) == {}
    assert log.count("not started") == len(ALL_STAGES), log


def test_stages_select_what_runs(tmp_path: Path) -> None:
    rc, log = run_script(tmp_path, DRY_RUN="1", STAGES="sanitizer")
    assert rc == 0, log
    assert list(planned_stages(log)) == ["sanitizer"]
    assert "-k compute_sanitizer" in log


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_without_a_gpu_it_exits_non_zero_and_says_why(tmp_path: Path) -> None:
    rc, log = run_script(tmp_path)
    assert rc == 1
    assert "no CUDA device visible to torch" in log
    assert (tmp_path / "out" / "env.txt").is_file()


# H100 SXM (and H200): 132 SMs, 227 KB of shared memory per block with the opt-in
# (cudaDevAttrMaxSharedMemoryPerBlockOptin = 232448 bytes).
H100_SMS, H100_SMEM_PER_BLOCK = 132, 232448


def persistent_plan_fits(batch: int, hidden: int, element_size: int) -> bool:
    """csrc/cuda/persistent: make_plan and shared_bytes with one block per SM (the least the occupancy
    query can answer): ceil(H / U) blocks of U units each need their W_hh rows [4U][P], the staged h
    [N_pad][P] in the storage dtype and c [N_pad][U] in float32 in shared memory."""
    padded_hidden = math.ceil(hidden / (16 // element_size)) * (16 // element_size)
    n_pad = math.ceil(batch / 4) * 4
    for units in range(1, hidden + 1):
        smem = (4 * units + n_pad) * padded_hidden * element_size + n_pad * units * 4
        if smem > H100_SMEM_PER_BLOCK:
            return False
        if math.ceil(hidden / units) <= H100_SMS:
            return True
    return False


def persistent_stage_jobs() -> List[Tuple[int, int, int]]:
    """(batch, hidden, element size) of every shape and dtype the persistent stage forces."""
    text = SCRIPT.read_text()
    command = text[text.index("stage persistent"):]
    command = command[:command.index("\nfi")].replace("\\\n", " ")
    words = shlex.split(command)
    shapes = [words[i + 1] for i, w in enumerate(words) if w == "--shape"]
    dtypes = words[words.index("--dtypes") + 1].split(",")
    sizes = {"fp32": 4, "bf16": 2, "fp16": 2}
    jobs = []
    for shape in shapes:
        _, batch, _, hidden = (int(v) for v in shape.split(",")[:4])
        jobs += [(batch, hidden, sizes[d]) for d in dtypes]
    return jobs


def test_persistent_stage_shapes_fit_the_kernel_on_an_h100() -> None:
    jobs = persistent_stage_jobs()
    assert len(jobs) >= 4
    assert "FUSED_LSTM_PERSISTENT=1" in SCRIPT.read_text()
    assert [job for job in jobs if not persistent_plan_fits(*job)] == []


def test_persistent_plan_model_rejects_what_does_not_fit() -> None:
    # fp32, batch 32, H = 1024: at most 6 units per block fit 227 KB, and 171 blocks are more than 132 SMs.
    assert not persistent_plan_fits(32, 1024, 4)
    assert persistent_plan_fits(32, 1024, 2)
    assert persistent_plan_fits(16, 1024, 4)
