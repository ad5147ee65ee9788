"""The CPU planner (csrc/cpu/cpu_plan.h) called directly: every switch at its threshold and on either side of
it, for this machine and for CPUs with other caches and thread counts (an AMD Zen 5-like 1 MiB L2 / 32 MiB L3,
an Intel Xeon-like 4 MiB L2 / 480 MiB L3, a small-cache CPU), with the thresholds read from the planner
(fused_lstm._C.cpu_kernel_limits) rather than written here; then fused_lstm.explain() against what a call
actually runs."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import fused_lstm
from fused_lstm import _C

KiB, MiB = 1 << 10, 1 << 20
MACHINES = {
    "this": None,
    "zen5": {"threads": 2, "l2_bytes": 1 * MiB, "l3_bytes": 32 * MiB},
    "xeon": {"threads": 2, "l2_bytes": 4 * MiB, "l3_bytes": 480 * MiB},
    "xeon-8": {"threads": 8, "l2_bytes": 2 * MiB, "l3_bytes": 105 * MiB},
    "small": {"threads": 4, "l2_bytes": 256 * KiB, "l3_bytes": 8 * MiB},
    "one-thread": {"threads": 1, "l2_bytes": 1 * MiB, "l3_bytes": 32 * MiB},
}
VECTOR = _C.cpu_machine()["kernels"] != "aten"


@pytest.fixture(params=list(MACHINES), ids=list(MACHINES))
def machine(request):
    """(machine overrides or None, the full machine the planner sees, its limits)."""
    overrides = MACHINES[request.param]
    full = dict(_C.cpu_machine())
    full.update(overrides or {})
    return overrides, full, _C.cpu_kernel_limits(overrides)


def ceil_div(a, b):
    return -(-a // b)


def packed_bytes(k, cols):
    return ceil_div(cols, 64) * k * 64 * 4


# ---- Caches and the limits that follow from them ----

def test_caches_come_from_the_os():
    m = _C.cpu_machine()
    assert m["l2_bytes"] > 0 and m["l3_bytes"] > 0
    assert m["l2_source"] in ("sysconf", "sysfs", "fallback") and m["l3_source"] in ("sysconf", "sysfs", "fallback")
    assert m["threads"] == torch.get_num_threads()
    for level, key in ((2, "l2_bytes"), (3, "l3_bytes")):
        name = f"SC_LEVEL{level}_CACHE_SIZE"
        reported = os.sysconf(name) if name in os.sysconf_names else -1
        if reported > 0:
            assert m[key] == reported and m[f"l{level}_source"] == "sysconf"


def test_cache_limits_scale_with_the_caches(machine):
    overrides, m, limits = machine
    usable = limits["usable_l3_bytes"]
    assert 0 < usable <= m["l3_bytes"]
    assert limits["fused_projection_max_slice_bytes"] < m["l2_bytes"]  # leaves room for the step's rows
    assert limits["row_split_max_weight_bytes"] <= m["l2_bytes"]
    assert limits["projection_chunk_max_weight_bytes"] < usable
    assert limits["shared_gather_max_packed_bytes"] < usable
    # A cache twice as large moves each cache-derived limit up (until the usable L3 caps it), never down.
    bigger = {"threads": m["threads"], "l2_bytes": 2 * m["l2_bytes"], "l3_bytes": 2 * m["l3_bytes"]}
    larger = _C.cpu_kernel_limits(bigger)
    for key in ("fused_projection_max_slice_bytes", "row_split_max_weight_bytes", "projection_chunk_max_weight_bytes",
                "shared_gather_max_packed_bytes", "usable_l3_bytes"):
        assert larger[key] >= limits[key]
    assert larger["fused_projection_max_slice_bytes"] == 2 * limits["fused_projection_max_slice_bytes"]


def test_a_vm_reporting_a_huge_l3_plans_as_for_the_usable_share():
    huge = _C.cpu_kernel_limits({"l2_bytes": 2 * MiB, "l3_bytes": 480 * MiB})
    cap = _C.cpu_kernel_limits({"l2_bytes": 2 * MiB, "l3_bytes": 1 << 40})
    assert huge["usable_l3_bytes"] == cap["usable_l3_bytes"] < 480 * MiB


# ---- Products ----

def product(rows, depth, cols, **kw):
    return _C.cpu_plan_product(rows, depth, cols, **kw)


@pytest.mark.parametrize("large", [False, True], ids=["small-W", "large-W"])
def test_weight_read_in_place_below_its_row_switch(large):
    limits = _C.cpu_kernel_limits()
    # W [cols, depth] of just under / at large_weight_bytes.
    depth, cols = 256, limits["large_weight_bytes"] // (4 * 256) - (0 if large else 1)
    switch = limits["max_in_place_rows_large_weight"] if large else limits["max_in_place_rows"]
    w = dict(b_is_w_transposed=True, b_rows_contiguous=False)
    assert product(switch - 1, depth, cols, **w)["kernel"] == "dot"
    assert product(switch - 1, depth, cols, **w)["first_in_place_use"]
    assert product(switch, depth, cols, **w)["kernel"] == "packed"
    # Used again in the same call: packed from then on when the rows repay it, in place below that.
    assert product(switch - 1, depth, cols, b_in_place_before=True, **w)["kernel"] == "packed"
    assert product(limits["min_packed_rows"], depth, cols, b_in_place_before=True, **w)["kernel"] == "packed"
    again = product(limits["min_packed_rows"] - 1, depth, cols, b_in_place_before=True, **w)
    assert again["kernel"] == "dot" and not again["first_in_place_use"]
    # Packed once: reused whatever the rows.
    assert product(1, depth, cols, b_packed_before=True, **w)["kernel"] == "packed"


def test_small_products_read_b_in_place_or_use_aten():
    limits = _C.cpu_kernel_limits()
    rows = limits["min_packed_rows"]
    assert product(rows - 1, 64, 64)["kernel"] == "rowmajor"
    assert product(rows - 1, 64, 64, b_rows_contiguous=False)["kernel"] == "aten"
    assert product(rows, 64, 64)["kernel"] == "packed"
    # A transposed left operand over a short reduction (the weight gradients of a short sequence).
    depth = limits["min_packed_depth"]
    t = dict(a_rows_contiguous=False, a_transposed=True)
    assert product(64, depth - 1, 64, **t)["kernel"] == "rowmajor"
    assert product(64, depth, 64, **t)["kernel"] == "packed"
    assert product(64, depth, 64, **t)["schedule"] == "gather_rows"
    assert product(0, 64, 64)["kernel"] == "aten"
    assert product(64, 64, 64, vector_kernels=False)["kernel"] == "aten"


def test_packed_schedules(machine):
    overrides, m, limits = machine
    chunk = limits["panel_chunk_k"]
    for rows in (1, 5, 6, 7, 64, 100, 3200):
        for cols in (1, 64, 65, 4096):
            short = product(rows + 16, chunk, cols, machine=overrides)
            assert short["schedule"] == "panel_tasks"
            assert short["rows_per_task"] % m["row_tile"] == 0 and short["grain"] >= 1
            assert short["tasks"] == ceil_div(cols, 64) * ceil_div(rows + 16, short["rows_per_task"])
            long = product(rows + 16, chunk + 1, cols, machine=overrides)
            assert long["schedule"] == "long_k_rows"
            # Row blocks: at least one per thread when there are rows enough, balanced over the threads.
            assert 1 <= long["tasks"] <= rows + 16
            if long["tasks"] > 1 and (rows + 16) >= 2 * m["threads"]:
                assert long["tasks"] % m["threads"] == 0 or long["tasks"] < m["threads"]


def test_gather_blocks_balanced_over_threads(machine):
    overrides, m, _ = machine
    for rows in (16, 255, 256, 257, 1024, 4096, 4097):
        p = product(rows, 64, 64, a_rows_contiguous=False, a_transposed=True, machine=overrides)
        blocks = p["tasks"]
        assert ceil_div(rows, 256) <= blocks
        assert rows // blocks >= 128 or blocks == ceil_div(rows, 256)  # balanced only while blocks stay half full
        if blocks > ceil_div(rows, 256):
            assert blocks % m["threads"] == 0


# ---- Forward recurrences ----

def forward(batch, hidden, input_size, rows=None, machine=None, **kw):
    return _C.cpu_plan_forward(batch, hidden, input_size, rows if rows is not None else 10 * batch, machine=machine,
                               **kw)


def test_forward_reads_a_large_w_hh_in_place_at_small_batches(machine):
    overrides, _, limits = machine
    batch = limits["max_in_place_batch"]
    hidden = 512
    at = limits["in_place_min_weight_bytes"] // (16 * hidden)  # W_hh [4H, Hout] of exactly that many bytes
    assert forward(batch, hidden, 8, out_hidden=at, machine=overrides)["in_place"]
    assert forward(batch, hidden, 8, out_hidden=at, rows=1, machine=overrides)["fused"]  # no row minimum in place
    assert not forward(batch, hidden, 8, out_hidden=at - 1, machine=overrides)["in_place"]
    assert not forward(batch + 1, hidden, 8, out_hidden=at, machine=overrides)["in_place"]


def test_forward_needs_rows_to_repay_packing(machine):
    overrides, _, limits = machine
    rows = limits["min_recurrence_rows"]
    assert not forward(2, 64, 8, rows=rows - 1, machine=overrides)["fused"]
    assert forward(2, 64, 8, rows=rows - 1, required=True, machine=overrides)["fused"]
    assert forward(2, 64, 8, rows=rows, machine=overrides)["fused"]
    for kw in ({"float32": False}, {"projection": True}, {"vector_kernels": False}):
        assert not forward(64, 64, 64, machine=overrides, **kw)["fused"]


def test_forward_row_split_at_the_l2_limit(machine):
    overrides, m, limits = machine
    if m["threads"] < 2:
        pytest.skip("one thread: no split to choose")
    batch = max(limits["row_split_min_batch"], limits["row_split_min_rows_per_thread"] * m["threads"])
    hidden = 16
    inputs_at = limits["row_split_max_weight_bytes"] // (16 * hidden) - hidden  # 16 H (I + H) bytes exactly
    assert inputs_at > 0
    at = forward(batch, hidden, inputs_at, machine=overrides)
    over = forward(batch, hidden, inputs_at + 1, machine=overrides)
    # Split by rows while the weights fit and the row team is as large as the unit team would be.
    unit_team = min(m["threads"], ceil_div(hidden, 16), 8 * hidden * (hidden + inputs_at) * batch
                    // limits["flops_per_thread"])
    assert at["split_rows"] == (m["threads"] >= max(1, unit_team))
    assert not over["split_rows"]
    assert at["per_step_projection"] or not at["split_rows"]
    smaller = forward(limits["row_split_min_batch"] - 1, hidden, inputs_at, machine=overrides)
    assert not smaller["split_rows"]


def test_forward_fuses_the_projection_while_a_thread_share_fits_half_its_l2(machine):
    overrides, m, limits = machine
    batch = limits["fused_projection_min_batch"]
    hidden = 16 * m["threads"]  # one unit block per thread
    team = forward(batch, hidden, 16 * hidden, machine=overrides)["threads"]
    # Packed W_ih + W_hh are 16 H (I + H) bytes: the input size that puts a thread's share exactly at the limit.
    inputs_at = limits["fused_projection_max_slice_bytes"] * team // (16 * hidden) - hidden
    assert inputs_at > 1
    seen = set()
    for inputs in (inputs_at - 1, inputs_at, inputs_at + 1):
        plan = forward(batch, hidden, inputs, machine=overrides)
        weights = 16 * hidden * (hidden + inputs)
        fits = weights // team <= limits["fused_projection_max_slice_bytes"]
        assert plan["per_step_projection"] == (plan["split_rows"] or fits), (inputs, plan)
        assert plan["split_rows"] == (weights <= limits["row_split_max_weight_bytes"] and
                                      min(batch // limits["row_split_min_rows_per_thread"], m["threads"]) >= team)
        seen.add(fits)
        if not plan["per_step_projection"]:
            assert plan["chunk_steps"] >= 1
    assert seen == {True, False}
    below = forward(batch - 1, hidden, inputs_at, machine=overrides)
    assert not below["per_step_projection"] and not below["split_rows"]


def test_forward_projection_chunks(machine):
    overrides, _, limits = machine
    batch, hidden = limits["max_in_place_batch"] + 1, 256  # small batch: projection in chunks
    budget = limits["projection_chunk_max_weight_bytes"]
    inputs_at = budget // (16 * hidden) - hidden
    plan = forward(batch, hidden, inputs_at, machine=overrides, out_hidden=hidden)
    if not plan["in_place"]:
        assert not plan["per_step_projection"]
        assert plan["chunk_steps"] == ceil_div(limits["projection_chunk_rows"], batch)
        over = forward(batch, hidden, inputs_at + 1, machine=overrides)
        if not over["in_place"]:
            assert over["chunk_steps"] == ceil_div(limits["large_projection_chunk_bytes"] // (16 * hidden), batch)


@pytest.mark.parametrize("batch", [1, 4, 8, 33, 64, 512])
@pytest.mark.parametrize("hidden", [1, 16, 100, 1024])
def test_forward_threads_within_the_machine(machine, batch, hidden):
    overrides, m, limits = machine
    plan = forward(batch, hidden, hidden, machine=overrides)
    assert 1 <= plan["threads"] <= m["threads"]
    if not plan["split_rows"]:
        assert plan["threads"] <= ceil_div(hidden, 16)
        flops = 8 * hidden * (hidden if plan["in_place"] else 2 * hidden) * batch
        assert plan["threads"] <= max(1, flops // limits["flops_per_thread"])
    else:
        assert plan["threads"] <= batch // limits["row_split_min_rows_per_thread"]


# ---- Backward ----

@pytest.mark.parametrize("hidden", [1, 64, 65, 256, 257, 1024])
def test_backward(machine, hidden):
    overrides, m, limits = machine
    rows = limits["min_recurrence_rows"]
    assert not _C.cpu_plan_backward(4, hidden, rows - 1, machine=overrides)["fused"]
    assert not _C.cpu_plan_backward(4, hidden, rows, projection=True, machine=overrides)["fused"]
    plan = _C.cpu_plan_backward(64, hidden, rows, machine=overrides)
    assert plan["fused"]
    assert 1 <= plan["threads"] <= min(m["threads"], ceil_div(hidden, 64))
    assert plan["k_chunks"] == ceil_div(4 * hidden, limits["panel_chunk_k"])


def test_weight_gradients_share_a_gather_within_the_l3_budget(machine):
    overrides, _, limits = machine
    depth = limits["min_packed_depth"]
    assert not _C.cpu_plan_weight_gradients(64, depth - 1, 64, machine=overrides)["packed"]
    assert not _C.cpu_plan_weight_gradients(limits["min_packed_rows"] // 4 - 1, 64, 64, machine=overrides)["packed"]
    budget = limits["shared_gather_max_packed_bytes"]
    rows = 512
    # input_size + out_hidden columns in whole panels: exactly the budget, then one panel more.
    panels = budget // (rows * 64 * 4)
    at = _C.cpu_plan_weight_gradients(64, rows, 64 * (panels - 1), out_hidden=64, machine=overrides)
    over = _C.cpu_plan_weight_gradients(64, rows, 64 * panels, out_hidden=64, machine=overrides)
    assert at["packed"] and over["packed"]
    assert packed_bytes(rows, 64 * (panels - 1)) + packed_bytes(rows, 64) <= budget
    assert at["passes"] == 1 and over["passes"] == 2


# ---- explain() ----

def _run(module, x):
    """Runs module(x) (and its backward when it trains); the path the last layer's forward took."""
    output, _ = module(x)
    path = fused_lstm.last_path()
    if output.requires_grad:
        output.sum().backward()
    return path


@pytest.mark.skipif(not VECTOR, reason="the CPU has no vector kernels")
@pytest.mark.parametrize("T, N, I, H, proj, bidirectional, recurrence", [
    (5, 64, 32, 32, 0, False, "auto"),     # packed, batch split
    (7, 3, 16, 600, 0, True, "auto"),     # W_hh in place
    (2, 2, 8, 16, 0, False, "auto"),      # too few rows: per-step loop
    (6, 5, 12, 24, 6, True, "auto"),      # proj_size: per-step loop
    (6, 40, 12, 24, 0, False, "standard"),
])
@pytest.mark.parametrize("training", [False, True])
def test_explain_names_the_path_a_call_takes(T, N, I, H, proj, bidirectional, recurrence, training):
    torch.manual_seed(0)
    module = fused_lstm.LSTM(I, H, num_layers=2, proj_size=proj, bidirectional=bidirectional, recurrence=recurrence)
    module.requires_grad_(training)
    x = torch.randn(T, N, I)
    plan = fused_lstm.explain(module, x)
    assert len(plan["layers"]) == 2
    for layer in plan["layers"]:
        assert len(layer["directions"]) == (2 if bidirectional else 1)
        for direction in layer["directions"]:
            assert ("backward" in direction) == training
    text = str(plan)
    assert "layer 1" in text and "direction 0 forward" in text
    with torch.set_grad_enabled(training):
        path = _run(module, x)
    fused = plan["layers"][-1]["directions"][-1]["forward"]["path"].startswith("fused")
    assert path == ("cpu:fused-recurrence" if fused else "cpu:per-step")


@pytest.mark.skipif(not VECTOR, reason="the CPU has no vector kernels")
def test_explain_products_follow_the_planner():
    module = fused_lstm.LSTM(24, 40, proj_size=20)
    with torch.no_grad():
        plan = fused_lstm.explain(module, torch.randn(9, 20, 24))
    fwd = plan["layers"][0]["directions"][0]["forward"]
    assert fwd["path"] == "per-step loop"
    names = {p["name"]: p for p in fwd["products"]}
    # W_hh^T: in place on its first step, packed (rows >= min_packed_rows) on the 8 after it.
    assert names["recurrent product h @ W_hh^T per step"]["kernels"] == {"dot": 1, "packed": 8}
    assert names["input projection x @ W_ih^T"]["kernels"] == {"packed": 1}


def test_explain_packed_sequence_and_other_machines():
    module = fused_lstm.LSTM(8, 64, bidirectional=True)
    seqs = [torch.randn(n, 8) for n in (9, 7, 7, 2)]
    packed = pack_sequence(seqs)
    plan = fused_lstm.explain(module, packed, machine={"threads": 8, "l2_bytes": MiB, "l3_bytes": 32 * MiB})
    assert plan["machine"]["threads"] == 8
    assert "rows=25" in plan["shape"]
    assert "training" in plan["shape"]
    with pytest.raises(TypeError):
        fused_lstm.explain(torch.nn.GRU(8, 8), torch.randn(3, 2, 8))


# ---- bfloat16 (csrc/cpu/bf16_recurrence.h) ----

def bf16_forward(batch, hidden, input_size, rows=None, machine=None, kernels="amx", **kw):
    machine = dict(machine or {}, bf16_kernels=kernels)
    return _C.cpu_plan_bf16_forward(batch, hidden, input_size, rows if rows is not None else 50 * batch,
                                    machine=machine, **kw)


def test_bf16_forward_kernel_follows_the_cpu_and_the_batch(machine):
    overrides, _, limits = machine
    small = limits["amx_min_batch"]
    assert not bf16_forward(8, 64, 64, machine=overrides, kernels="aten")["fused"]
    assert bf16_forward(8, 64, 64, machine=overrides, kernels="avx512_bf16")["kernel"] == "avx512_bf16"
    assert bf16_forward(small, 64, 64, machine=overrides)["kernel"] == "amx"
    plan = bf16_forward(small - 1, 64, 64, machine=overrides)
    assert plan["kernel"] == "avx512_bf16" and plan["row_tile"] == 1
    assert bf16_forward(small, 64, 64, machine=overrides)["row_tile"] == limits["amx_tile_rows"]
    assert not bf16_forward(8, 64, 64, machine=overrides, projection=True, out_hidden=32)["fused"]
    assert not bf16_forward(1, 64, 64, rows=limits["min_recurrence_rows"] - 1, machine=overrides)["fused"]
    assert bf16_forward(1, 64, 64, rows=1, machine=overrides, required=True)["fused"]


def test_bf16_projection_chunks(machine):
    """The input projection's chunks (cpu_limits.h): the most steps of half an L2 of gates, of
    kBf16MinProjectionChunkRows rows, and of kBf16ProjectionChunkRows rows cut to whole steps within
    kBf16ProjectionChunkBytes."""
    overrides, full, limits = machine
    for batch, hidden in ((1, 64), (8, 512), (64, 512), (64, 1024), (64, 2048), (3, 4096), (64, 16384)):
        step_bytes = batch * 8 * hidden
        long_steps = min(-(-limits["bf16_projection_chunk_rows"] // batch),
                         limits["bf16_projection_chunk_bytes"] // step_bytes)
        expected = max(1, full["l2_bytes"] // limits["bf16_projection_l2_divisor"] // step_bytes,
                       -(-limits["bf16_min_projection_chunk_rows"] // batch), long_steps)
        assert bf16_forward(batch, hidden, hidden, machine=overrides)["chunk_steps"] == expected, (batch, hidden)
        if expected > -(-limits["bf16_min_projection_chunk_rows"] // batch):  # the minimum did not decide
            assert expected * step_bytes <= limits["bf16_projection_chunk_bytes"], (batch, hidden)
    assert limits["bf16_min_projection_chunk_rows"] <= limits["bf16_projection_chunk_rows"]


def test_bf16_backward_plan(machine):
    overrides, full, limits = machine
    plan = _C.cpu_plan_bf16_backward(8, 100, 400, machine=dict(overrides or {}, bf16_kernels="amx"))
    assert plan["fused"] and plan["kernel"] == "amx" and plan["packed_depth"] == 416
    assert 1 <= plan["threads"] <= min(full["threads"], ceil_div(100, 64))
    assert not _C.cpu_plan_bf16_backward(8, 100, 400, machine=dict(overrides or {}, bf16_kernels="aten"))["fused"]
    assert not _C.cpu_plan_bf16_backward(8, 100, 400, projection=True, machine=overrides)["fused"]
    assert _C.cpu_plan_bf16_backward(limits["amx_min_batch"] - 1, 100, 400,
                                     machine=dict(overrides or {}, bf16_kernels="amx"))["kernel"] == "avx512_bf16"


@pytest.mark.parametrize("hidden", [16, 37, 100, 512, 1030])
def test_bf16_forward_packed_depth_and_threads(machine, hidden):
    overrides, full, limits = machine
    for batch in (1, 8, 64, 200):
        plan = bf16_forward(batch, hidden, 32, machine=overrides)
        multiple = limits["bf16_packed_depth_multiple"]
        assert plan["packed_depth"] % multiple == 0 and hidden <= plan["packed_depth"] < hidden + multiple
        assert 1 <= plan["threads"] <= min(full["threads"], ceil_div(hidden, 16) if not plan["split_rows"] else batch)
        packed = 4 * ceil_div(hidden, 16) * 16 * plan["packed_depth"] * 2
        if plan["split_rows"]:
            assert batch >= limits["row_split_min_batch"]
            assert packed <= full["l2_bytes"] // limits["bf16_row_split_l2_divisor"]


@pytest.mark.skipif("amx" not in _C._supported_cpu_bf16_kernels() and "avx512_bf16" not in
                    _C._supported_cpu_bf16_kernels(), reason="this CPU has no AVX512-BF16")
@pytest.mark.parametrize("N", [1, 8])
def test_explain_under_autocast_names_the_bf16_kernel(N):
    module = fused_lstm.LSTM(16, 32, bidirectional=True)
    x = torch.randn(20, N, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plan = fused_lstm.explain(module, x)
        module(x)
    fwd = plan["layers"][0]["directions"][1]["forward"]
    assert "torch.bfloat16" in plan["shape"] and "bfloat16" in str(plan)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bwd = fused_lstm.explain(module, x.requires_grad_())["layers"][0]["directions"][0]["backward"]
    assert bwd["path"] == f"fused backward recurrence, bfloat16 {bwd['recurrence']['kernel']}"
    kernel = fwd["recurrence"]["kernel"]
    assert fwd["path"] == f"fused recurrence, bfloat16 {kernel}"
    assert fused_lstm.last_path() == f"cpu:fused-recurrence:{kernel}"


def test_bfloat16_products_with_few_rows_read_w_in_place():
    switch = _C.cpu_kernel_limits()["max_bf16_dot_rows"]
    w = dict(vector_kernels=False, bf16_dot_kernels=True, b_is_w_transposed=True, b_rows_contiguous=False)
    assert product(1, 37, 148, **w)["kernel"] == "bf16_dot"
    assert product(switch - 1, 128, 512, **w)["kernel"] == "bf16_dot"
    assert product(switch, 128, 512, **w)["kernel"] == "aten"  # ATen's AMX GEMM repays its per-call cost
    assert product(8, 512, 2048, **w)["kernel"] == "aten"  # 8M multiply-adds: so does a large W
    # d_gates @ W and d_gates^T @ x (b's rows contiguous): b read in place while the multiply-adds are few.
    macs = _C.cpu_kernel_limits()["max_bf16_small_product_macs"]
    b = dict(vector_kernels=False, bf16_dot_kernels=True)
    assert product(1, 512, 128, **b)["kernel"] == "bf16_rowmajor"
    t = dict(a_rows_contiguous=False, a_transposed=True)
    assert product(512, 1, 128, **b, **t)["kernel"] == "bf16_rowmajor"
    assert product(macs // (512 * 128), 512, 128, **b)["kernel"] == "aten"
    # With AMX tiles: 2 to 16 rows over a multiple of 32 k, against W^T (W as A tiles) or b's rows (paired into B
    # tiles); one row, 17 rows, a ragged reduction or no AMX take the kernels above.
    amx, amx_w = dict(b, bf16_amx=True), dict(w, bf16_amx=True)
    tile_rows, tile_depth = _C.cpu_kernel_limits()["amx_tile_rows"], _C.cpu_kernel_limits()["amx_tile_depth"]
    for rows in (2, tile_rows):
        assert product(rows, 512, 2048, **amx_w)["kernel"] == "bf16_amx"
        assert product(rows, 2048, 512, **amx)["kernel"] == "bf16_amx_rowmajor"
    assert product(1, 512, 2048, **amx_w)["kernel"] == "bf16_dot"
    assert product(tile_rows + 1, 512, 2048, **amx_w)["kernel"] == "aten"
    assert product(8, tile_depth + 2, 148, **amx_w)["kernel"] == "bf16_dot"
    assert product(8, 2048, 512, **b)["kernel"] == "aten"  # no AMX
    assert product(2048, 8, 512, **amx, **t)["kernel"] == "bf16_rowmajor"  # a transposed: not a's rows in place
    # A step's weight gradients (a = d_gates^T over a reduction of its few rows): ours at any size, since
    # writing out is the cost; from kMinPackedDepth rows, ATen.
    depth = _C.cpu_kernel_limits()["min_packed_depth"]
    assert product(2048, depth - 1, 512, **b, **t)["kernel"] == "bf16_rowmajor"
    assert product(2048, depth, 512, **b, **t)["kernel"] == "aten"
    assert product(16, 512, 128, b_rows_contiguous=False, **b)["kernel"] == "aten"
    assert product(1, 128, 512, vector_kernels=False, b_is_w_transposed=True)["kernel"] == "aten"
