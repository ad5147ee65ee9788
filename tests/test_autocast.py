"""torch.autocast: LSTM and LSTMCell compute and return the autocast dtype (float16 or bfloat16) on the CPU and on
CUDA, whatever mix of float32 and 16-bit input, hx and weights they get, as torch.nn.LSTM does (the CUDA cases
skip without a GPU); values agree with a float64 run of the same 16-bit-rounded arguments, and gradients reach
float32 parameters in float32."""

from __future__ import annotations

import itertools

import pytest
import torch

import fused_lstm
from conftest import cell_loop
from fused_lstm import reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
HALF = [torch.bfloat16, torch.float16]
# input, hx (None: omitted), weights: float32 or the autocast dtype (None below stands for it)
MIXES = list(itertools.product([torch.float32, None], ["none", torch.float32, None], [torch.float32, None]))


def _tolerance(dtype):
    return dict(atol=4e-2, rtol=4e-2) if dtype == torch.bfloat16 else dict(atol=5e-3, rtol=5e-3)


def _expected_layer(lstm, x, hx, dtype):
    """A float64 run of what autocast hands the op: every argument rounded to the autocast dtype."""
    rounded = lambda t: t.to(dtype).double()  # noqa: E731
    weights = [rounded(w) for w in lstm._flat_weights]
    out, h, c = reference.lstm_layer(rounded(x), None, rounded(hx[0]), rounded(hx[1]), weights, lstm.bias, False,
                                     False)
    return out, h, c


@pytest.mark.parametrize("op", ["fused_lstm::lstm_layer", "fused_lstm::lstm_cell"])
def test_both_devices_have_the_autocast_kernel(op):
    """CUDA's autocast kernel is csrc/autocast.cpp's template that the CPU cases below run, registered for
    AutocastCUDA too: without a GPU, the registration is what can be checked here."""
    for key in ("AutocastCPU", "AutocastCUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), (op, key)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("input_dtype,hx_dtype,weight_dtype", MIXES)
def test_lstm_follows_the_autocast_dtype(device, dtype, input_dtype, hx_dtype, weight_dtype):
    lstm = fused_lstm.LSTM(5, 6, device=device, dtype=weight_dtype or dtype)
    x = torch.randn(4, 3, 5, device=device, dtype=input_dtype or dtype)
    hx = None
    if hx_dtype != "none":
        hx = tuple(torch.randn(1, 3, 6, device=device, dtype=hx_dtype or dtype) for _ in range(2))
    with torch.autocast(device, dtype=dtype):
        out, (h, c) = lstm(x, hx)
    assert (out.dtype, h.dtype, c.dtype) == (dtype,) * 3
    zeros = torch.zeros(1, 3, 6, device=device)
    expected = _expected_layer(lstm, x, hx if hx is not None else (zeros, zeros), dtype)
    for got, want in zip((out, h, c), expected):
        torch.testing.assert_close(got.double(), want, **_tolerance(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("input_dtype,hx_dtype,weight_dtype", MIXES)
def test_cell_follows_the_autocast_dtype(device, dtype, input_dtype, hx_dtype, weight_dtype):
    cell = fused_lstm.LSTMCell(5, 6, device=device, dtype=weight_dtype or dtype)
    x = torch.randn(3, 5, device=device, dtype=input_dtype or dtype)
    hx = None
    if hx_dtype != "none":
        hx = tuple(torch.randn(3, 6, device=device, dtype=hx_dtype or dtype) for _ in range(2))
    with torch.autocast(device, dtype=dtype):
        h, c = cell(x, hx)
    assert (h.dtype, c.dtype) == (dtype, dtype)
    rounded = lambda t: t.to(dtype).double()  # noqa: E731
    states = hx if hx is not None else (torch.zeros(3, 6, device=device),) * 2
    expected = reference.lstm_cell(rounded(x), rounded(states[0]), rounded(states[1]),
                                   *[rounded(p) for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)])
    for got, want in zip((h, c), expected):
        torch.testing.assert_close(got.double(), want, **_tolerance(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
def test_linear_then_lstm_trains_under_autocast(device, dtype):
    """The issue's case: Linear (autocast makes its output 16-bit) into an LSTM with float32 weights, then a
    backward: float32 gradients, close to torch.nn.LSTM's under the same autocast."""
    torch_model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.LSTM(5, 6, num_layers=2)).to(device)
    ours = fused_lstm.convert(torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.LSTM(5, 6, num_layers=2)).to(device))
    ours.load_state_dict(torch_model.state_dict())
    x = torch.randn(7, 3, 4, device=device)
    results = []
    for model in (torch_model, ours):
        with torch.autocast(device, dtype=dtype):
            out, _ = model(x)
        if device == "cpu" and dtype == torch.float16 and model is torch_model:
            results.append(None)  # torch.nn.LSTM under CPU float16 autocast fails in oneDNN
            continue
        assert out.dtype == dtype
        out.float().pow(2).sum().backward()
        results.append((out.float(), [p.grad for p in model.parameters()]))
    out, grads = results[1]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    if results[0] is not None:
        torch.testing.assert_close(out, results[0][0], **_tolerance(dtype))
        for got, want in zip(grads, results[0][1]):
            scale = max(1.0, want.abs().max().item())
            torch.testing.assert_close(got / scale, want / scale, atol=0.1, rtol=0.1)


class _CastCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the dtype casts of tensors of the given shapes that reach the dispatcher (autocast's casts do)."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.casts = {tuple(s) for s in shapes}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) in self.shapes:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def _cell_loop(cell, xs, dtype):
    h = c = torch.zeros(xs.size(1), cell.hidden_size)
    with torch.autocast("cpu", dtype=dtype):
        hs = cell_loop(cell, xs, h, c)
    return torch.stack(hs)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_cell_loop_casts_each_weight_once_per_autocast_region(grad):
    """A loop of LSTMCell steps under autocast casts each float32 parameter once per autocast region, through
    torch's own autocast cache, as torch.nn.LSTMCell does (an uncached cast of W_ih and W_hh each step costs
    about as much as a bfloat16 step at H=512)."""
    steps, counts = 5, []
    for cls in (torch.nn.LSTMCell, fused_lstm.LSTMCell):
        cell = cls(7, 12)
        counter = _CastCounter([p.shape for p in cell.parameters()])
        with torch.set_grad_enabled(grad), counter:
            _cell_loop(cell, torch.randn(steps, 3, 7), torch.bfloat16)
        counts.append(counter.casts)
    assert counts[1] == 4, counts  # W_ih, W_hh, b_ih, b_hh: once each, not once per step
    assert counts[0] == counts[1], counts


def test_cached_casts_follow_weight_updates_between_regions():
    """The cache lives for one autocast region: an optimizer step between two regions is seen by the second
    (outputs and gradients against torch.nn.LSTMCell doing the same)."""
    torch_cell = torch.nn.LSTMCell(6, 10)
    ours = fused_lstm.LSTMCell(6, 10)
    ours.load_state_dict(torch_cell.state_dict())
    xs = torch.randn(4, 3, 6)
    results = []
    for cell in (torch_cell, ours):
        optimizer = torch.optim.SGD(cell.parameters(), lr=0.5)
        runs = []
        for _ in range(2):
            optimizer.zero_grad()
            out = _cell_loop(cell, xs, torch.bfloat16)
            out.float().pow(2).sum().backward()
            runs.append((out.float(), [p.grad.clone() for p in cell.parameters()]))
            optimizer.step()
        results.append(runs)
    first, second = results[1]
    assert not torch.equal(first[0], second[0])  # the update changed what the second region computed
    for (got_out, got_grads), (want_out, want_grads) in zip(results[1], results[0]):
        torch.testing.assert_close(got_out, want_out, **_tolerance(torch.bfloat16))
        for got, want in zip(got_grads, want_grads):
            scale = max(1.0, want.abs().max().item())
            torch.testing.assert_close(got / scale, want / scale, atol=0.1, rtol=0.1)


def test_autocast_inside_compiled_function():
    """torch.compile traces the casts of the ops' autocast kernels into one graph: same dtype and values as
    eager."""
    lstm = fused_lstm.LSTM(5, 6)
    x = torch.randn(4, 3, 5)

    def run(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lstm(x)[0]

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")(x)
    eager = run(x)
    assert compiled.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, eager)


def test_autocast_inside_exported_program():
    """torch.export keeps the casts of the ops' autocast kernels: the exported program returns the autocast dtype
    and eager's values."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = fused_lstm.LSTM(5, 6)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.lstm(x)[0]

    model, x = Model(), torch.randn(4, 3, 5)
    exported = torch.export.export(model, (x,), strict=False).module()(x)
    eager = model(x)
    assert exported.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(exported, eager)
