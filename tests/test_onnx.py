"""ONNX export: both exporters emit ONNX's own LSTM operator for fused_lstm's layer op, and onnxruntime's
results match eager ones. onnx, onnxscript and onnxruntime are test-only dependencies (.ci/install installs
them): without them these tests skip, except in CI (CI=true), where a missing one fails."""

from __future__ import annotations

import importlib
import io
import os
import warnings

import pytest
import torch

import fused_lstm


def _require(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"{name} is not installed (pip install onnx onnxscript onnxruntime)", allow_module_level=True)


onnx = _require("onnx")
_require("onnxscript")
ort = _require("onnxruntime")

EXPORTERS = [pytest.param(True, id="dynamo"), pytest.param(False, id="torchscript")]


def _export(model, args, dynamo: bool, tmp_path) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation, tracer warnings
        if dynamo:
            path = tmp_path / "model.onnx"
            torch.onnx.export(model, args, str(path), dynamo=True, external_data=False, verbose=False)
            return path.read_bytes()
        buffer = io.BytesIO()
        torch.onnx.export(model, args, buffer, dynamo=False)
        return buffer.getvalue()


def _run(model_bytes: bytes, args):
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    flat = [args[0], *args[1]] if len(args) > 1 else [args[0]]
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(flat)
    return [torch.from_numpy(o) for o in session.run(None, {n: t.numpy() for n, t in zip(names, flat)})]


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("num_layers,bidirectional,batch_first,bias,with_hx", [
    (1, False, False, True, False),
    (2, True, False, True, True),
    (2, False, True, False, True),
    (1, True, True, True, False),
])
def test_export_matches_eager(dynamo, num_layers, bidirectional, batch_first, bias, with_hx, tmp_path):
    lstm = fused_lstm.LSTM(5, 6, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
                           bias=bias).eval()
    with torch.no_grad():
        for p in lstm.parameters():
            p.uniform_(-0.7, 0.7)
    seq, batch = 4, 3
    x = torch.randn((batch, seq, 5) if batch_first else (seq, batch, 5))
    args = (x,)
    if with_hx:
        states = num_layers * (2 if bidirectional else 1)
        args = (x, (torch.randn(states, batch, 6), torch.randn(states, batch, 6)))
    model_bytes = _export(lstm, args, dynamo, tmp_path)
    ops = [node.op_type for node in onnx.load_from_string(model_bytes).graph.node]
    assert ops.count("LSTM") == num_layers, ops  # ONNX's operator, not an unrolled loop
    assert "Loop" not in ops and "Scan" not in ops
    with torch.no_grad():
        out, (h, c) = lstm(*args)
    got = _run(model_bytes, args)
    assert len(got) == 3
    for mine, theirs in zip(got, (out, h, c)):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_export_with_dynamic_batch_and_length(dynamo, tmp_path):
    """Exported at one batch size and length, run at others."""
    lstm = fused_lstm.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True).eval()
    x = torch.randn(2, 5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            path = tmp_path / "model.onnx"
            shapes = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("length")},)
            torch.onnx.export(lstm, (x,), str(path), dynamo=True, dynamic_shapes=shapes, external_data=False)
            model_bytes = path.read_bytes()
        else:
            buffer = io.BytesIO()
            torch.onnx.export(lstm, (x,), buffer, dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "batch", 1: "length"}})
            model_bytes = buffer.getvalue()
    other = torch.randn(3, 7, 3)
    with torch.no_grad():
        out, (h, c) = lstm(other)
    for mine, theirs in zip(_run(model_bytes, (other,)), (out, h, c)):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_export_proj_size_is_a_clear_error(dynamo, tmp_path):
    lstm = fused_lstm.LSTM(4, 6, proj_size=3).eval()
    with pytest.raises(Exception) as caught:
        _export(lstm, (torch.randn(3, 2, 4),), dynamo, tmp_path)
    chain, error = [], caught.value
    while error is not None:  # the dynamo exporter wraps the translation's error
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("proj_size" in message for message in chain), chain


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("bias,with_hx", [(True, True), (False, False)])
def test_export_cell(dynamo, bias, with_hx, tmp_path):
    """LSTMCell: one step of ONNX's LSTM."""
    cell = fused_lstm.LSTMCell(5, 6, bias=bias).eval()
    x = torch.randn(3, 5)
    args = (x, (torch.randn(3, 6), torch.randn(3, 6))) if with_hx else (x,)
    model_bytes = _export(cell, args, dynamo, tmp_path)
    assert [node.op_type for node in onnx.load_from_string(model_bytes).graph.node].count("LSTM") == 1
    with torch.no_grad():
        expected = cell(*args)
    got = _run(model_bytes, args)
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


def test_custom_translation_table_is_the_registered_one(tmp_path):
    """The explicit table works too (a user passing their own table along with ours)."""
    table = fused_lstm.onnx.custom_translation_table()
    assert set(table) == {torch.ops.fused_lstm.lstm_layer.default, torch.ops.fused_lstm.lstm_cell.default}
    lstm = fused_lstm.LSTM(3, 4).eval()
    x = torch.randn(2, 1, 3)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(lstm, (x,), str(path), dynamo=True, external_data=False, custom_translation_table=table)
    with torch.no_grad():
        out, _ = lstm(x)
    torch.testing.assert_close(_run(path.read_bytes(), (x,))[0], out, atol=1e-5, rtol=1e-4)


def test_import_does_not_load_onnx():
    """import fused_lstm stays cheap: neither onnx nor onnxscript is imported until torch's exporter needs it."""
    import subprocess
    import sys

    code = "import sys, fused_lstm; print(sorted(m for m in ('onnx', 'onnxscript', 'onnxruntime') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(fused_lstm.__file__))))
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
