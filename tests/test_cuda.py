"""The CUDA backend of fused_lstm: what a user of ``fused_lstm.LSTM`` on a GPU relies on.

Every test needs a CUDA GPU and is skipped cleanly without one. Accuracy is judged against a float64
CPU ``torch.nn.LSTM`` with the same weights: our max abs error must stay within twice the error of
``torch.nn.LSTM`` on CUDA (cuDNN) in the same dtype, plus a small per-dtype floor scaled by the
reference's magnitude.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from typing import List, Optional

import pytest
import torch
from torch import nn

import fused_lstm
from conftest import assert_close, assert_cuda_graph_replays
from gpu_harness import (Case, build, build_and_run, check_against_reference, fp32_precision, make_inputs,
                         max_error, relayout, run)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"

CASES = [
    Case("base"),
    Case("two_layers_batch_first_bidirectional_no_hx", num_layers=2, batch_first=True, bidirectional=True,
         with_hx=False),
    Case("projection_bidirectional", num_layers=2, bidirectional=True, proj_size=5),
    Case("packed_unsorted_bidirectional_no_bias", bidirectional=True, bias=False, packed=True, batch=4, steps=7),
    Case("packed_projection_batch_first", num_layers=2, proj_size=3, packed=True, batch_first=True, batch=6),
    Case("unbatched_bidirectional", num_layers=2, bidirectional=True, unbatched=True),
    Case("unbatched_no_hx_projection", proj_size=1, hidden_size=7, unbatched=True, with_hx=False),
    Case("all_sizes_one", input_size=1, hidden_size=1, batch=1, steps=1),
    Case("noncontiguous_input_batch_first", batch_first=True, bidirectional=True, noncontiguous=True),
    Case("medium", input_size=64, hidden_size=96, num_layers=2, bidirectional=True, batch=40, steps=12),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def compare_with_cudnn(case: Case, dtype: torch.dtype, device=DEVICE):
    inputs = make_inputs(case, dtype)
    reference = build_and_run(nn.LSTM, case, inputs, "cpu", torch.float64)
    theirs = build_and_run(nn.LSTM, case, inputs, device, dtype)
    ours = build_and_run(fused_lstm.LSTM, case, inputs, device, dtype)
    return ours, theirs, reference


def test_extension_built_with_cuda():
    assert fused_lstm.build_info()["cuda_available"], fused_lstm.build_info()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_float64_reference_like_cudnn(case: Case, dtype: torch.dtype):
    with fp32_precision(allow_tf32=False):
        ours, theirs, reference = compare_with_cudnn(case, dtype)
    check_against_reference(ours, theirs, reference, dtype)


@pytest.mark.parametrize("case", [CASES[2], CASES[-1]], ids=lambda c: c.name)
def test_float32_with_tf32_allowed(case: Case):
    """The default: TF32 allowed for cuDNN RNNs, so for us too. Errors are TF32-sized, i.e. compared
    with cuDNN's own TF32 error, or 1e-2 of the magnitude where cuDNN happens to be more exact."""
    with fp32_precision(allow_tf32=True):
        ours, theirs, reference = compare_with_cudnn(case, torch.float32)
    for name, ref in reference.items():
        scale = max(1.0, ref.abs().max().item())
        err_ours, err_theirs = max_error(ours[name], ref), max_error(theirs[name], ref)
        assert err_ours <= max(2 * err_theirs, 1e-2 * scale), (name, err_ours, err_theirs)


def test_autocast_matches_torch():
    case = Case("autocast", num_layers=2, bidirectional=True)
    inputs = make_inputs(case, torch.float32)
    results = []
    for cls in (nn.LSTM, fused_lstm.LSTM):
        module = build(cls, case, inputs, DEVICE, torch.float32)
        x = inputs.x.to(DEVICE)
        hx = (inputs.h0.to(DEVICE), inputs.c0.to(DEVICE))
        with torch.autocast("cuda"):
            output, (h_n, c_n) = module(x, hx)
        (output.float().sum() + h_n.float().sum() + c_n.float().sum()).backward()
        results.append((output, h_n, c_n, module.weight_ih_l0.grad))
    (out_t, h_t, c_t, gw_t), (out_o, h_o, c_o, gw_o) = results
    for theirs, ours in ((out_t, out_o), (h_t, h_o), (c_t, c_o)):
        assert ours.dtype == theirs.dtype == torch.float16
        torch.testing.assert_close(ours, theirs, atol=1e-2, rtol=1e-2)
    assert gw_o.dtype == torch.float32
    torch.testing.assert_close(gw_o, gw_t, atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic(dtype: torch.dtype):
    case = Case("determinism", num_layers=2, bidirectional=True, proj_size=4, packed=True, batch=9, steps=11)
    inputs = make_inputs(case, dtype)
    first, second = (run(build(fused_lstm.LSTM, case, inputs, DEVICE, dtype), case, inputs, DEVICE, dtype)
                     for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def poison_caching_allocator() -> None:
    """Leave the caching allocator's free blocks (large and small pools) full of NaN."""
    torch.cuda.synchronize()
    blocks: List[torch.Tensor] = [torch.full((64 << 20,), float("nan"), device=DEVICE)]  # 256 MiB, large pool
    for size in (1 << 8, 1 << 12, 1 << 16, (1 << 18) - 1):  # small pool (<= 1 MiB)
        blocks += [torch.full((size,), float("nan"), device=DEVICE) for _ in range(16)]
    del blocks


@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[5]], ids=lambda c: c.name)
def test_every_output_written(case: Case):
    dtype = torch.float32
    inputs = make_inputs(case, dtype)
    module = build(fused_lstm.LSTM, case, inputs, DEVICE, dtype)
    poison_caching_allocator()
    result = run(module, case, inputs, DEVICE, dtype)
    for name, value in result.items():
        assert not value.isnan().any(), name


def test_torch_compile_fullgraph_matches_eager():
    case = Case("compile", num_layers=2, bidirectional=True, proj_size=5)
    inputs = make_inputs(case, torch.float32)
    module = build(fused_lstm.LSTM, case, inputs, DEVICE, torch.float32)
    eager = run(module, case, inputs, DEVICE, torch.float32)
    module.zero_grad()
    compiled = run(torch.compile(module, fullgraph=True), case, inputs, DEVICE, torch.float32)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-6, msg=name)


def test_cuda_graph_capture_replays():
    torch.manual_seed(0)
    module = fused_lstm.LSTM(8, 16, num_layers=2, bidirectional=True, proj_size=4, device=DEVICE)
    static_x = torch.randn(5, 3, 8, device=DEVICE)
    assert_cuda_graph_replays(module, static_x)


def test_runs_on_the_current_stream():
    """Work goes to the caller's stream: an input produced late on a side stream (behind a long sleep) is
    read only after it is ready, and the results equal those computed on the default stream."""
    case = Case("stream", num_layers=2, bidirectional=True, proj_size=6)
    inputs = make_inputs(case, torch.float32)
    module = build(fused_lstm.LSTM, case, inputs, DEVICE, torch.float32)
    expected = run(module, case, inputs, DEVICE, torch.float32)
    module.zero_grad()
    source = inputs.x.to(DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms: anything not ordered on `side` would run first
        late = dataclasses.replace(inputs, x=source * 1)
        got = run(module, case, late, DEVICE, torch.float32)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_batch_zero(bidirectional: bool):
    module = fused_lstm.LSTM(4, 6, num_layers=2, bidirectional=bidirectional, device=DEVICE)
    x = torch.randn(3, 0, 4, device=DEVICE, requires_grad=True)
    output, (h_n, c_n) = module(x)
    D = 2 if bidirectional else 1
    assert output.shape == (3, 0, D * 6) and h_n.shape == (2 * D, 0, 6) and c_n.shape == (2 * D, 0, 6)
    (output.sum() + h_n.sum() + c_n.sum()).backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.isnan().any() for p in module.parameters())


def op_args(dtype: torch.dtype, packed: bool, proj: int, seed: Optional[int] = None):
    """Arguments of torch.ops.fused_lstm.lstm_layer for a bidirectional layer with biases, on the CPU."""
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    gen = torch.Generator().manual_seed(seed)
    T, N, I, H, D = 5, 4, 6, 7, 2
    Hout = proj or H

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    weights = []
    for _ in range(D):
        weights += [randn(4 * H, I, scale=0.5), randn(4 * H, Hout, scale=0.5), randn(4 * H, scale=0.5),
                    randn(4 * H, scale=0.5)]
        if proj:
            weights.append(randn(proj, H, scale=0.5))
    batch_sizes = torch.tensor([N, N, 3, 1, 1]) if packed else None
    x = randn(int(batch_sizes.sum()), I) if packed else randn(T, N, I)
    return x, batch_sizes, randn(D, N, Hout), randn(D, N, H), weights, True, proj > 0, True


def op_forward_backward(args, device) -> List[torch.Tensor]:
    """Forward (keeping the workspace) and backward of the layer op; every output and gradient."""
    x, batch_sizes, h0, c0, weights, has_biases, has_projections, bidirectional = args
    x, h0, c0 = (t.to(device) for t in (x, h0, c0))
    output, h_n, c_n, gates, c_prev, h_prev = torch.ops.fused_lstm.lstm_layer(
        x, batch_sizes, h0, c0, weights, has_biases, has_projections, bidirectional, True)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=t.dtype)
             for t in (output, h_n, c_n)]
    grad_input, grad_h0, grad_c0, grad_weights = torch.ops.fused_lstm.lstm_layer_backward(
        *grads, x, batch_sizes, h0, c0, weights, has_biases, has_projections, bidirectional, gates, c_prev, h_prev)
    return [output, h_n, c_n, grad_input, grad_h0, grad_c0, *grad_weights]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["transposed_view", "strided_slice"])
@pytest.mark.parametrize("packed, proj", [(False, 0), (True, 3)], ids=["dense", "packed_projection"])
def test_noncontiguous_weights_match_cpu(packed: bool, proj: int, layout: str, dtype: torch.dtype):
    """User weights stored as transposed views (cuBLAS reads them as they are, with the other op flag) or as
    strided slices (no cuBLAS form: ATen's product) give what the CPU op gives with contiguous weights."""
    args = op_args(dtype, packed, proj)
    with fp32_precision(allow_tf32=False):
        expected = op_forward_backward(args, "cpu")
        weights = [relayout(w.to(DEVICE), layout) for w in args[4]]
        got = op_forward_backward((*args[:4], weights, *args[5:]), DEVICE)
    assert len(got) == len(expected)
    for index, (value, want) in enumerate(zip(got, expected)):
        assert value.device.type == "cuda" and value.is_contiguous(), index
        assert_close(value.cpu(), want, dtype=dtype, what=f"result {index}")


@pytest.mark.parametrize("packed, proj", [(False, 0), (True, 3)], ids=["dense", "packed_projection"])
def test_opcheck_on_cuda(packed: bool, proj: int):
    """Schema, fake-kernel metadata (shapes, strides, dtypes) and autograd registration hold for the CUDA kernels."""
    x, batch_sizes, h0, c0, weights, *flags = op_args(torch.float64, packed, proj)
    x, h0, c0 = (t.to(DEVICE).requires_grad_() for t in (x, h0, c0))
    weights = [w.to(DEVICE).requires_grad_() for w in weights]
    forward_args = (x, batch_sizes, h0, c0, weights, *flags, True)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")  # compile paths: test_ops.py
    torch.library.opcheck(torch.ops.fused_lstm.lstm_layer.default, forward_args, test_utils=checks)
    with torch.no_grad():
        output, h_n, c_n, gates, c_prev, h_prev = torch.ops.fused_lstm.lstm_layer(*forward_args)
    backward_args = (torch.randn_like(output), torch.randn_like(h_n), torch.randn_like(c_n), x.detach(), batch_sizes,
                     h0.detach(), c0.detach(), [w.detach() for w in weights], *flags, gates, c_prev, h_prev)
    torch.library.opcheck(torch.ops.fused_lstm.lstm_layer_backward.default, backward_args, test_utils=checks)


SANITIZER_SCRIPT = """
import os
import torch
from torch.nn.utils.rnn import pack_padded_sequence
import fused_lstm

# The standard path, then the persistent kernel (the only kernel of ours with shared memory, so the one
# racecheck can check); the mode is read on every call. Forced persistent raises on what it cannot run:
# only its dtypes, no projection.
PATHS = [
    ("0", [(torch.float32, True, 3), (torch.float16, True, 0), (torch.float64, False, 2)]),
    ("1", [(torch.float32, True, 0), (torch.float16, True, 0), (torch.bfloat16, False, 0)]),
]
torch.manual_seed(0)
for mode, configs in PATHS:
    os.environ["FUSED_LSTM_PERSISTENT"] = mode
    launches = torch.ops.fused_lstm.persistent_launches()
    for dtype, bidirectional, proj_size in configs:
        module = fused_lstm.LSTM(5, 7, num_layers=2, bidirectional=bidirectional, proj_size=proj_size,
                                 device="cuda", dtype=dtype)
        x = torch.randn(4, 3, 5, device="cuda", dtype=dtype, requires_grad=True)
        packed = pack_padded_sequence(x, torch.tensor([2, 4, 3]), enforce_sorted=False)
        output, (h_n, c_n) = module(packed)
        (output.data.float().sum() + h_n.float().sum() + c_n.float().sum()).backward()
        output, (h_n, c_n) = module(x)
        (output.float().sum() + h_n.float().sum() + c_n.float().sum()).backward()
    assert (torch.ops.fused_lstm.persistent_launches() > launches) == (mode == "1"), mode
torch.cuda.synchronize()
print("sanitizer script done")
"""


def find_compute_sanitizer() -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "compute-sanitizer"), os.X_OK):
            return os.path.join(home, "bin", "compute-sanitizer")
    return None


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_clean(tool: str, tmp_path):
    """memcheck: no out-of-bounds or misaligned access in any kernel, standard and persistent path;
    racecheck: no shared-memory hazard in our kernels."""
    sanitizer = find_compute_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    script = tmp_path / "sanitize_fused_lstm.py"
    script.write_text(SANITIZER_SCRIPT)
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fused_lstm.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    # Every tensor its own cudaMalloc, so an out-of-bounds access cannot land in a neighbouring cached block.
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    command = [sanitizer, "--tool", tool, "--report-api-errors", "no"]
    if tool == "racecheck":
        # Racecheck instruments shared memory; restrict it to our kernels (cuBLAS is not ours to check).
        command += ["--kernel-name", "kns=fused_lstm"]
    command += [sys.executable, str(script)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert "sanitizer script done" in log, log[-4000:]
    assert "ERROR SUMMARY: 0 errors" in log, log[-4000:]


# ---- LSTMCell (the lstm_cell op) ----------------------------------------------------------------------------

def cell_results(cls, state_dict, inputs, device, dtype):
    """h', c' and the gradients of every input and parameter of one cell step, as float64 on the CPU."""
    cell = cls(*inputs["sizes"], device=device, dtype=dtype)
    cell.load_state_dict(state_dict)
    leaves = [inputs[k].to(device, dtype).requires_grad_() for k in ("x", "h", "c")]
    h, c = cell(leaves[0], (leaves[1], leaves[2]))
    loss = (h * inputs["weight_h"].to(device, dtype)).sum() + (c * inputs["weight_c"].to(device, dtype)).sum()
    grads = torch.autograd.grad(loss, leaves + list(cell.parameters()))
    names = ["h", "c", "grad_x", "grad_h", "grad_c", *(f"grad_{n}" for n, _ in cell.named_parameters())]
    return dict(zip(names, (t.detach() for t in (h, c, *grads))))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,input_size,hidden", [(1, 7, 5), (40, 33, 96)])
def test_cell_matches_float64_reference_like_torch(batch: int, input_size: int, hidden: int, dtype: torch.dtype):
    """Our LSTMCell against a float64 CPU run, within twice torch.nn.LSTMCell's own CUDA error (both follow
    torch.matmul's TF32 switch, left at its default)."""
    reference_cell = nn.LSTMCell(input_size, hidden, dtype=torch.float64)
    inputs = dict(sizes=(input_size, hidden), x=torch.randn(batch, input_size, dtype=torch.float64),
                  h=torch.randn(batch, hidden, dtype=torch.float64), c=torch.randn(batch, hidden, dtype=torch.float64),
                  weight_h=torch.randn(batch, hidden, dtype=torch.float64),
                  weight_c=torch.randn(batch, hidden, dtype=torch.float64))
    state = reference_cell.state_dict()
    reference = cell_results(nn.LSTMCell, state, inputs, "cpu", torch.float64)
    theirs = cell_results(nn.LSTMCell, state, inputs, DEVICE, dtype)
    ours = cell_results(fused_lstm.LSTMCell, state, inputs, DEVICE, dtype)
    check_against_reference(ours, theirs, reference, dtype)


def test_cell_opcheck_on_cuda():
    def randn(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=torch.float64)

    args = (randn(3, 5), randn(3, 4), randn(3, 4), randn(16, 5), randn(16, 4), randn(16), randn(16))
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.fused_lstm.lstm_cell.default, [a.requires_grad_() for a in args], test_utils=checks)
    with torch.no_grad():
        h, c, gates = torch.ops.fused_lstm.lstm_cell(*args)
    backward_args = (torch.randn_like(h), None, *(a.detach() for a in args[:5]), gates, True)
    torch.library.opcheck(torch.ops.fused_lstm.lstm_cell_backward.default, backward_args, test_utils=checks)


def test_cell_autocast_matches_torch():
    cells = [nn.LSTMCell(6, 8, device=DEVICE)]
    cells.append(fused_lstm.LSTMCell(6, 8, device=DEVICE))
    cells[1].load_state_dict(cells[0].state_dict())
    x, h, c = (torch.randn(4, n, device=DEVICE) for n in (6, 8, 8))
    results = []
    for cell in cells:
        with torch.autocast("cuda"):
            results.append(cell(x, (h, c)))
    for theirs, ours in zip(*results):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, atol=1e-2, rtol=1e-2)
