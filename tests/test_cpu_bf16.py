"""bfloat16 on the CPU (autocast's dtype there): the fused recurrence (csrc/cpu/bf16_recurrence.h) with each product
kernel this CPU has, forced in turn (AMX tiles, vdpbf16ps); a kernel whose instructions the CPU lacks skips. Each
case runs an fp32 module under torch.autocast, as users do, against a float64 run of the same bfloat16-rounded
arguments: our error at most 2x torch.nn.LSTM's own under the same autocast, plus a floor of a fraction of a
bfloat16 ulp. The driver's buffers come out of at::empty filled with NaN (deterministic mode), so an element the
kernel never writes shows."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_lstm
from fused_lstm import _C, reference

import conftest
from conftest import lstm_pair, selected_cpu_kernels

SUPPORTED = _C._supported_cpu_bf16_kernels()
BF16_EPS = torch.finfo(torch.bfloat16).eps


@pytest.fixture(params=["amx", "avx512_bf16"])
def bf16_kernel(request):
    """Each bfloat16 product kernel in turn, where this CPU has its instructions (cpu_features.h)."""
    if request.param not in SUPPORTED:
        pytest.skip(f"this CPU has no {request.param} (supports {SUPPORTED})")
    with selected_cpu_kernels(float32="avx512", bfloat16=request.param):
        assert fused_lstm.build_info()["cpu_bf16_kernels"] == request.param
        yield request.param


@pytest.fixture
def poisoned_empty():
    """at::empty fills with NaN while this is active."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was)


def expected_kernel(kernel, batch, hidden, input_size, rows):
    plan = _C.cpu_plan_bf16_forward(batch, hidden, input_size, rows)
    assert plan["fused"], plan["reason"]
    assert plan["kernel"] == kernel or (kernel == "amx" and plan["kernel"] == "avx512_bf16"), plan
    return plan["kernel"]


def assert_error_within_torch(mine, theirs, exact, what):
    """conftest's rule with bfloat16 floors: RMS error at most 2x torch's plus 1/16 bfloat16 ulp of the magnitude;
    the largest at most 2x torch's plus one ulp (one element's error is noisier than the RMS: a single rounding of
    a bfloat16 output either way)."""
    conftest.assert_error_within_torch(mine, theirs, exact, what, rms_floor=BF16_EPS / 16, max_factor=2,
                                       max_floor=BF16_EPS)


def rounded(t):
    return t.detach().to(torch.bfloat16).double()


def float64_run(module, x, hx, lengths):
    """torch.nn.LSTM in float64 on the bfloat16-rounded weights, input and state: what autocast hands both."""
    twin = torch.nn.LSTM(module.input_size, module.hidden_size, num_layers=module.num_layers,
                         bidirectional=module.bidirectional, dtype=torch.float64)
    with torch.no_grad():
        for mine, theirs in zip(module._flat_weights, twin._flat_weights):
            theirs.copy_(rounded(mine))
    x64 = rounded(x).requires_grad_(x.requires_grad)
    hx64 = tuple(rounded(s) for s in hx) if hx is not None else None
    return twin, x64, run(twin, x64, hx64, lengths)


def run(module, x, hx, lengths):
    """(output padded [T, N, D H], h_n, c_n) of module on x, packed when lengths is given."""
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if lengths is not None else x
    out, (h, c) = module(inp, hx)
    if lengths is not None:
        out = pad_packed_sequence(out, total_length=x.size(0))[0]
    return out, h, c


CASES = [
    # steps, batch, input, hidden, layers, bidirectional, packed, h0
    (12, 8, 32, 64, 1, False, False, False),
    (20, 1, 20, 37, 1, False, False, True),
    (7, 17, 33, 70, 1, True, False, False),
    (10, 17, 24, 48, 2, True, True, True),
    (8, 5, 16, 16, 2, False, True, False),
    (6, 40, 64, 130, 1, False, False, True),
]


def draw_case(steps, batch, input_size, hidden, layers, bidirectional, packed, h0):
    """float32 torch.nn.LSTM and fused_lstm.LSTM with the same weights, fresh input [T, N, I], h0/c0 or None, and
    lengths (the first one full) or None; also D, the number of directions."""
    ref, ours = lstm_pair(input_size, hidden, num_layers=layers, bidirectional=bidirectional, dtype=torch.float32,
                          init_scale=None)
    D = 2 if bidirectional else 1
    x = torch.randn(steps, batch, input_size)
    hx = tuple(torch.randn(D * layers, batch, hidden) for _ in range(2)) if h0 else None
    lengths = None
    if packed:
        # Long enough that the sequence has the rows the fused recurrence needs (kMinRecurrenceRows), whose kernel
        # the tests check: lengths from 1 fell short in 35 of 4096 draws at 8 steps x 5.
        min_rows = _C.cpu_kernel_limits(None)["min_recurrence_rows"]
        shortest = max(1, -(-(min_rows - steps) // max(1, batch - 1)))
        assert shortest <= steps, f"{steps} steps x {batch} rows cannot reach {min_rows} rows"
        lengths = torch.randint(shortest, steps + 1, (batch,))
        lengths[0] = steps
    return ref, ours, D, x, hx, lengths


@pytest.mark.parametrize("steps,batch,input_size,hidden,layers,bidirectional,packed,h0", CASES)
def test_inference_within_torch_error(steps, batch, input_size, hidden, layers, bidirectional, packed, h0, bf16_kernel,
                                      poisoned_empty):
    ref, ours, D, x, hx, lengths = draw_case(steps, batch, input_size, hidden, layers, bidirectional, packed, h0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mine = run(ours, x, hx, lengths)
        path = fused_lstm.last_path()
        theirs = run(ref, x, hx, lengths)
    rows = int(lengths.sum()) if lengths is not None else steps * batch
    assert path == "cpu:fused-recurrence:" + expected_kernel(bf16_kernel, batch, hidden, input_size, rows)
    with torch.no_grad():
        _, _, exact = float64_run(ours, x, hx, lengths)
    for name, a, b, e in zip(("output", "h_n", "c_n"), mine, theirs, exact):
        assert a.dtype == torch.bfloat16
        assert_error_within_torch(a, b, e, name)


@pytest.mark.parametrize("steps,batch,input_size,hidden,layers,bidirectional,packed,h0", [CASES[0], CASES[3]])
def test_training_gradients_within_torch_error(steps, batch, input_size, hidden, layers, bidirectional, packed, h0,
                                               bf16_kernel):
    """Training under autocast: the forward keeps the workspace the backward reads (post-activation gates,
    c_prev, h_prev in bfloat16); the gradients reach the float32 parameters."""
    ref, ours, D, x, hx, lengths = draw_case(steps, batch, input_size, hidden, layers, bidirectional, packed, h0)
    grad_out = torch.randn(steps, batch, D * hidden)
    if lengths is not None:  # padding gets no gradient (pad_packed_sequence fills it with zeros)
        grad_out *= (torch.arange(steps)[:, None] < lengths[None, :]).unsqueeze(-1)

    def grads(module, x, hx, autocast):
        x = x.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, h, c = run(module, x, hx, lengths)
        (out.double() * grad_out.double()).sum().add(h.double().sum()).backward()
        result = [x.grad] + [p.grad for p in module._flat_weights]
        module.zero_grad()
        return result, out

    mine, out = grads(ours, x, hx, True)
    path = fused_lstm.last_path()
    theirs, _ = grads(ref, x, hx, True)
    twin, _, _ = float64_run(ours, x, hx, lengths)
    exact, _ = grads(twin, rounded(x), tuple(rounded(s) for s in hx) if hx is not None else None, False)
    rows = int(lengths.sum()) if lengths is not None else steps * batch
    assert path == "cpu:fused-recurrence:" + expected_kernel(bf16_kernel, batch, hidden, input_size, rows)
    assert out.dtype == torch.bfloat16
    for i, (a, b, e) in enumerate(zip(mine, theirs, exact)):
        assert a.dtype == torch.float32
        assert_error_within_torch(a, b, e, f"gradient {i}")


@pytest.mark.parametrize("training", [False, True])
def test_projection_in_several_chunks(training, bf16_kernel, poisoned_empty):
    """The input projection runs in chunks of steps (cpu_plan.h, chunk_steps): forward and reversed, packed."""
    N, I, H = 64, 16, 256
    chunk = _C.cpu_plan_bf16_forward(N, H, I, 1 << 20)["chunk_steps"]
    T = chunk + chunk // 2 + 1  # a full chunk and a partial one
    plan = _C.cpu_plan_bf16_forward(N, H, I, T * N)
    assert plan["fused"] and plan["chunk_steps"] == chunk < T, plan
    ref, ours = lstm_pair(I, H, bidirectional=True, dtype=torch.float32, init_scale=None)
    ours.requires_grad_(training)
    x = torch.randn(T, N, I)
    lengths = torch.randint(1, T + 1, (N,))
    lengths[0] = T
    with torch.set_grad_enabled(training), torch.autocast("cpu", dtype=torch.bfloat16):
        mine = run(ours, x, None, lengths)
        assert fused_lstm.last_path() == "cpu:fused-recurrence:" + plan["kernel"]
        theirs = run(ref, x, None, lengths)
    twin, x64, exact = float64_run(ours, x, None, lengths)
    for name, a, b, e in zip(("output", "h_n", "c_n"), mine, theirs, exact):
        assert_error_within_torch(a, b, e, name)
    if training:  # the backward recurrence over 64 rows: AMX's two-tile blocks
        grad_out = torch.randn_like(exact[0]) * (torch.arange(T)[:, None] < lengths[None, :]).unsqueeze(-1)
        grads = [torch.autograd.grad((out.double() * grad_out).sum(), module.weight_hh_l0)[0]
                 for out, module in ((mine[0], ours), (theirs[0], ref), (exact[0], twin))]
        assert_error_within_torch(*grads, "weight_hh_l0 gradient")


@pytest.mark.parametrize("need_workspace", [True, False])
def test_workspace_as_the_per_step_loop_writes_it(need_workspace, bf16_kernel, poisoned_empty):
    """The layer op called directly: the fused recurrence's outputs and workspace (gates, c_prev, h_prev) agree
    with the per-step loop's (recurrence='standard') to bfloat16 rounding, every element written."""
    T, N, I, H = 9, 19, 24, 40
    x = torch.randn(T, N, I, dtype=torch.bfloat16)
    h0, c0 = (torch.randn(1, N, H, dtype=torch.bfloat16) for _ in range(2))
    weights = [(torch.rand(*shape) - 0.5).bfloat16() for shape in ((4 * H, I), (4 * H, H), (4 * H,), (4 * H,))]
    call = lambda recurrence: torch.ops.fused_lstm.lstm_layer(  # noqa: E731
        x, None, h0, c0, weights, True, False, False, need_workspace, recurrence)
    fused = call("auto")
    assert fused_lstm.last_path().startswith("cpu:fused-recurrence:")
    per_step = call("standard")
    assert fused_lstm.last_path() == "cpu:per-step"
    for name, a, b in zip(("output", "h_n", "c_n", "gates", "c_prev", "h_prev"), fused, per_step):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        # The per-step loop rounds c and the pre-activations to bfloat16 every step, the fused recurrence does
        # not: a few bfloat16 ulps apart after 9 steps.
        torch.testing.assert_close(a.float(), b.float(), atol=6 * BF16_EPS, rtol=6 * BF16_EPS, msg=name)


def test_recurrence_persistent_runs_bfloat16(bf16_kernel):
    lstm = fused_lstm.LSTM(3, 4, recurrence="persistent")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lstm(torch.randn(1, 1, 3))  # below the automatic threshold
    assert fused_lstm.last_path() == "cpu:fused-recurrence:avx512_bf16"  # one row: vdpbf16ps even on AMX


def test_aten_bfloat16_kernel_takes_the_per_step_loop():
    with selected_cpu_kernels(bfloat16="aten"):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            fused_lstm.LSTM(8, 16)(torch.randn(5, 4, 8))
        assert fused_lstm.last_path() == "cpu:per-step"
        assert not _C.cpu_plan_bf16_forward(4, 16, 8, 20)["fused"]


def test_kernel_selection_names_and_errors():
    assert SUPPORTED[0] == "aten" and set(SUPPORTED) <= {"aten", "avx512_bf16", "amx"}
    with pytest.raises(ValueError, match="unknown CPU bfloat16 kernel"):
        _C._set_cpu_bf16_kernels("sse")
    for kernel in {"avx512_bf16", "amx"} - set(SUPPORTED):
        with pytest.raises(RuntimeError, match="cannot run"):
            _C._set_cpu_bf16_kernels(kernel)


@pytest.fixture(params=["amx", "bf16_dot", "aten"])
def cell_products(request):
    """The bfloat16 cell's products on fused_lstm's kernels (bf16_dot_gemm.h): AMX tiles (2 to 16 rows over a
    multiple of 32 k, with the amx selection), vdpbf16ps and float32 FMAs (with avx512_bf16); or forced onto
    ATen's (aten)."""
    kernel = {"bf16_dot": "avx512_bf16"}.get(request.param, request.param)
    if kernel not in SUPPORTED:
        pytest.skip(f"this CPU has no {kernel} (supports {SUPPORTED})")
    with selected_cpu_kernels(float32="avx512" if kernel != "aten" else None, bfloat16=kernel):
        yield request.param


def cell_runs(batch, input_size, hidden, bias):
    """(ours, torch's, float64's) outputs and gradients of one LSTMCell step under autocast, on the same
    bfloat16-rounded weights, input and state."""
    torch.manual_seed(batch * 1000 + hidden)
    ref = torch.nn.LSTMCell(input_size, hidden, bias=bias)
    ours = fused_lstm.LSTMCell(input_size, hidden, bias=bias)
    ours.load_state_dict(ref.state_dict())
    exact = torch.nn.LSTMCell(input_size, hidden, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), exact.parameters()):
            q.copy_(rounded(p))
    x, h, c = torch.randn(batch, input_size), torch.randn(batch, hidden), torch.randn(batch, hidden)
    grad_h, grad_c = torch.randn(batch, hidden), torch.randn(batch, hidden)
    results = []
    for module, cast in ((ours, True), (ref, True), (exact, False)):
        args = [(rounded(t) if not cast else t.clone()).requires_grad_() for t in (x, h, c)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
            h1, c1 = module(args[0], (args[1], args[2]))
        torch.autograd.backward([h1, c1], [grad_h.to(h1.dtype), grad_c.to(c1.dtype)])
        results.append([h1, c1] + [a.grad for a in args] + [p.grad for p in module.parameters()])
    return results


# (6, 333, 288): the weight gradient of w_ih has more multiply-adds than kMaxBf16SmallProductMacs over a reduction
# of 6 rows, the path of a cell loop's backward at a large hidden size (cpu_plan.cpp, plan_product). With AMX:
# (8, 128, 128) and (3, 64, 96) run every product but the weight gradients on tiles, (16, 64, 64) a full tile of
# rows, (4, 64, 37) x @ W_ih^T with a partial last W tile (4H = 148), (5, 45, 32) d_gates @ W_ih with a partial
# last column block (I = 45); (17, 20, 37) and (1, 37, 37) have too many or too few rows.
@pytest.mark.parametrize("batch,input_size,hidden",
                         [(1, 37, 37), (17, 20, 37), (8, 128, 128), (3, 64, 96), (6, 333, 288), (16, 64, 64),
                          (4, 64, 37), (5, 45, 32)])
@pytest.mark.parametrize("bias", [True, False])
def test_cell_within_torch_error(batch, input_size, hidden, bias, cell_products, poisoned_empty):
    mine, theirs, exact = cell_runs(batch, input_size, hidden, bias)
    names = ["h_1", "c_1", "grad_input", "grad_h0", "grad_c0", "grad_w_ih", "grad_w_hh", "grad_b_ih", "grad_b_hh"]
    for name, m, t, e in zip(names, mine, theirs, exact):
        assert_error_within_torch(m, t, e, (cell_products, name))


def test_cell_products_agree_with_aten():
    """The vdpbf16ps products against ATen's addmm on the same bfloat16 operands: both sum in float32 and round
    once, so they differ by at most a bfloat16 ulp where the float32 sums' order tips a rounding."""
    if "avx512_bf16" not in SUPPORTED:
        pytest.skip(f"this CPU has no avx512_bf16 (supports {SUPPORTED})")
    torch.manual_seed(0)
    ins = [t.to(torch.bfloat16) for t in (torch.randn(17, 45), torch.randn(17, 37), torch.randn(17, 37),
                                          torch.randn(148, 45), torch.randn(148, 37), torch.randn(148),
                                          torch.randn(148))]
    runs = {}
    for kernel in ("avx512_bf16", "aten"):
        with selected_cpu_kernels(float32="avx512", bfloat16=kernel):
            runs[kernel] = torch.ops.fused_lstm.lstm_cell(*ins)
    for mine, aten in zip(runs["avx512_bf16"], runs["aten"]):
        assert torch.allclose(mine.float(), aten.float(), rtol=2 * BF16_EPS, atol=2 * BF16_EPS)
