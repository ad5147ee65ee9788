"""torch.autocast: LSTM and LSTMCell compute and return the autocast dtype (float16 or bfloat16) on the CPU and on
CUDA, whatever mix of float32 and 16-bit input, hx and weights they get, as torch.nn.LSTM does (the CUDA cases
skip without a GPU); values agree with a float64 run of the same 16-bit-rounded arguments, and gradients reach
float32 parameters in float32."""

from __future__ import annotations

import itertools

import pytest
import torch

import fused_lstm
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
