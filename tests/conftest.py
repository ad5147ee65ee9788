"""Shared helpers: build a torch.nn.LSTM / fused_lstm.LSTM pair with one state_dict, draw inputs, compare."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import fused_lstm

# float64 compares to rounding noise; float32 to what a different summation order gives.
TOLERANCE = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=2e-5, rtol=1e-4)}


VECTOR_KERNELS = [k for k in ("avx512", "avx2") if k in fused_lstm._C._supported_cpu_kernels()]


@contextlib.contextmanager
def selected_cpu_kernels(float32=None, bfloat16=None):
    """Runs the block with these CPU kernel sets selected (fused_lstm._C._set_cpu_kernels / _set_cpu_bf16_kernels;
    None leaves that one as it is) and restores the previous selection after it, however it ends."""
    previous_f32 = fused_lstm._C._set_cpu_kernels(float32) if float32 else None
    try:
        previous_bf16 = fused_lstm._C._set_cpu_bf16_kernels(bfloat16) if bfloat16 else None
        try:
            yield
        finally:
            if previous_bf16 is not None:
                fused_lstm._C._set_cpu_bf16_kernels(previous_bf16)
    finally:
        if previous_f32 is not None:
            fused_lstm._C._set_cpu_kernels(previous_f32)


@pytest.fixture(params=VECTOR_KERNELS or [pytest.param("none", marks=pytest.mark.skip(
    reason="this CPU runs no fused_lstm kernels (neither AVX2 nor AVX-512): test_cpu_fallback.py covers it"))])
def cpu_kernels(request):
    """Each of fused_lstm's CPU kernel builds this CPU supports in turn (csrc/cpu/simd.h: they differ in vector
    width and tile shape); restores the default after the test. Also for tests of what only the kernels run
    (the fused recurrence, recurrence='persistent' on the CPU): on a CPU with neither AVX2 nor AVX-512 they
    are skipped, and test_cpu_fallback.py checks that CPU's path and errors instead."""
    with selected_cpu_kernels(float32=request.param):
        assert fused_lstm.build_info()["cpu_kernels"] == request.param
        yield request.param


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different seed for every test (and every run), so inputs are never stale. A failing test's report
    shows its seed (pytest_runtest_makereport below); FUSED_LSTM_TEST_SEED=<seed> reruns with it."""
    chosen = os.environ.get("FUSED_LSTM_TEST_SEED")
    seed = int(chosen) if chosen else torch.seed() % (2**31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = dict(item.user_properties).get("seed")
    if report.failed and seed is not None:
        report.sections.append(("fused_lstm test seed", f"rerun with FUSED_LSTM_TEST_SEED={seed}"))


def lstm_pair(*args, dtype=torch.float64, device="cpu", init_scale=0.6, **kwargs):
    """(torch.nn.LSTM, fused_lstm.LSTM) with identical weights, uniform in +-init_scale (large for small
    sizes, so gates leave their linear range); init_scale=None keeps torch's 1/sqrt(H) initialisation."""
    ref = torch.nn.LSTM(*args, **kwargs, dtype=dtype, device=device)
    if init_scale is not None:
        with torch.no_grad():
            for p in ref.parameters():
                p.uniform_(-init_scale, init_scale)
    ours = fused_lstm.LSTM(*args, **kwargs, dtype=dtype, device=device)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def cell_pair(*args, dtype=torch.float64, **kwargs):
    ref = torch.nn.LSTMCell(*args, **kwargs, dtype=dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(-0.6, 0.6)
    ours = fused_lstm.LSTMCell(*args, **kwargs, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def cell_loop(cell, xs, h, c):
    """The h of each step of an LSTMCell run over xs [T, N, I] from (h, c)."""
    hs = []
    for x in xs:
        h, c = cell(x, (h, c))
        hs.append(h)
    return hs


def assert_close(actual, expected, dtype=torch.float64, what=""):
    """Elementwise closeness with the absolute tolerance scaled by the tensor's magnitude: weight gradients
    sum over every step and row, so their rounding error grows with their size."""
    tol = dict(TOLERANCE[dtype])
    scale = expected.detach().abs().max().item() if expected.numel() else 1.0
    tol["atol"] *= max(1.0, scale)
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


def assert_error_within_torch(mine, theirs, exact, what="", *, rms_floor=1e-7, max_factor=4,
                              max_floor=8 * torch.finfo(torch.float32).eps):
    """Accuracy against a float64 run, relative to torch.nn.LSTM's own at the same precision: the RMS error
    at most 2x torch's plus rms_floor x the magnitude, the largest at most max_factor x torch's plus max_floor x
    the magnitude (defaults for float32: 1e-7, 4x and 8 ulps; every element finite, i.e. written). One element's error is a noisy statistic: over 150 random models (2 layers, bidirectional,
    30 steps) the ratio of our to torch's largest error reached 3 while the RMS ratio stayed within 1.3
    (median 1.1); and where a result has a handful of elements, one of torch's may round exactly while
    ours is a few ulps off (activations a few ulps apart, both valid): a one-row cell's weight gradient,
    5 ulps against torch's 0.8, failed the 4x bound alone about one run in 50."""
    mine, theirs, exact = mine.detach().double(), theirs.detach().double(), exact.detach().double()
    magnitude = max(1.0, exact.abs().max().item()) if exact.numel() else 0.0
    rms = lambda t: (t - exact).pow(2).mean().sqrt().item() if t.numel() else 0.0  # noqa: E731
    largest = lambda t: (t - exact).abs().max().item() if t.numel() else 0.0  # noqa: E731
    assert torch.isfinite(mine).all(), (what, "non-finite: an element was never written")
    assert rms(mine) <= 2 * rms(theirs) + rms_floor * magnitude, (what, "rms", rms(mine), rms(theirs))
    assert largest(mine) <= max_factor * largest(theirs) + max_floor * magnitude, (
        what, "max", largest(mine), largest(theirs))


def assert_backward_skips_unneeded(op, backward_args, need_input_grad, need_weight_grads, weight_grads,
                                   need_h0_grad=None):
    """A backward op (lstm_layer_backward, lstm_cell_backward) called without need_input_grad /
    need_weight_grads / need_h0_grad (the layer op's; None: not passed): those gradients come back empty
    (not computed), the others are the full call's bit for bit, and opcheck holds. weight_grads picks the
    weight gradients out of the op's results."""
    flags = (need_input_grad, need_weight_grads) + (() if need_h0_grad is None else (need_h0_grad,))
    full = op(*backward_args)
    part = op(*backward_args, *flags)
    torch.library.opcheck(op, (*backward_args, *flags))
    assert torch.equal(part[1], full[1]) if need_h0_grad is not False else part[1].numel() == 0
    assert torch.equal(part[2], full[2])
    assert torch.equal(part[0], full[0]) if need_input_grad else part[0].numel() == 0
    for got, want in zip(weight_grads(part), weight_grads(full)):
        assert torch.equal(got, want) if need_weight_grads else got.numel() == 0


def assert_cuda_graph_replays(module, static_x):
    """Capture module(static_x) in a CUDA graph (after a side-stream warm-up, as torch's docs do), then
    check that replays on fresh inputs written into static_x equal eager calls."""
    with torch.no_grad():
        warmup = torch.cuda.Stream()
        warmup.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warmup):
            for _ in range(2):
                module(static_x)
        torch.cuda.current_stream().wait_stream(warmup)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out, (static_h, static_c) = module(static_x)
        for _ in range(3):
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            out, (h, c) = module(static_x)
            for replayed, eager in ((static_out, out), (static_h, h), (static_c, c)):
                torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-6)
