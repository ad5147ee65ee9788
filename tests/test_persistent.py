"""The persistent CUDA forward kernel (csrc/cuda/persistent/): what a user of ``fused_lstm.LSTM`` relies on when
the whole forward recurrence of a direction runs as one cooperative kernel.

Every test needs a CUDA GPU and is skipped cleanly without one. ``FUSED_LSTM_PERSISTENT=1`` forces the
persistent kernel (an unsupported shape is then an error, never a silent fallback); each test that forces it
also checks, through ``torch.ops.fused_lstm.persistent_launches``, that the kernel really ran. Accuracy is
judged as in test_cuda.py: against a float64 CPU ``torch.nn.LSTM`` with the same weights, our max abs error
must stay within twice the error of ``torch.nn.LSTM`` on CUDA (cuDNN) in the same dtype plus a small floor.
Backward runs the standard CUDA path on the workspace the persistent forward saved, so gradients check
that workspace too.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_lstm
from conftest import assert_cuda_graph_replays

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"
ENV = "FUSED_LSTM_PERSISTENT"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Floor of the tolerance, relative to max(1, max |reference|): rounding the two implementations do in
# different places (about two units in the last place of the storage dtype for fp16 / bf16).
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def launches() -> int:
    return torch.ops.fused_lstm.persistent_launches()


def max_hidden(dtype: torch.dtype, batch: int) -> int:
    """The largest hidden size the persistent kernel supports on this GPU for `batch` rows of `dtype`."""
    return torch.ops.fused_lstm.persistent_max_hidden(torch.empty(0, device=DEVICE, dtype=dtype), batch)


@pytest.fixture
def persistent(monkeypatch):
    monkeypatch.setenv(ENV, "1")


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    input_size: int = 7
    hidden_size: int = 33  # not a multiple of any slice or vector width
    num_layers: int = 1
    bidirectional: bool = False
    batch_first: bool = False
    batch: int = 5
    steps: int = 6
    packed: bool = False  # PackedSequence of unsorted lengths, enforce_sorted=False
    with_hx: bool = True

    def module_kwargs(self) -> dict:
        return dict(input_size=self.input_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
                    bidirectional=self.bidirectional, batch_first=self.batch_first)

    @property
    def kernel_launches(self) -> int:
        """Persistent launches per forward: one per layer and direction."""
        return self.num_layers * (2 if self.bidirectional else 1)


SHAPES = [
    Shape("base"),
    Shape("hidden_200_bidirectional", hidden_size=200, bidirectional=True, batch=3, steps=9),
    Shape("batch_beyond_one_tile_two_layers", hidden_size=40, num_layers=2, batch=37, steps=5),
    Shape("one_step", batch=2, steps=1),
    Shape("packed_unsorted_bidirectional", bidirectional=True, packed=True, batch=6, steps=8),
    Shape("packed_two_layers_batch_first_no_hx", num_layers=2, batch_first=True, packed=True, batch=9,
          with_hx=False),
    Shape("batch_one_long", hidden_size=64, batch=1, steps=40),
    Shape("batch_64", input_size=16, hidden_size=96, batch=64, steps=4),
    Shape("all_sizes_one", input_size=1, hidden_size=1, batch=1, steps=3),
]


@dataclasses.dataclass
class Inputs:
    """Everything random about one run, in the storage dtype, on the CPU."""

    state_dict: Dict[str, torch.Tensor]
    x: torch.Tensor
    lengths: Optional[torch.Tensor]
    h0: Optional[torch.Tensor]
    c0: Optional[torch.Tensor]
    grad_output: torch.Tensor


def make_inputs(shape: Shape, dtype: torch.dtype, seed: Optional[int] = None) -> Inputs:
    """Fresh inputs every run: the seed comes from the global generator, which conftest.py reseeds per test
    (and records in the test report), unless a test pins one."""
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    gen = torch.Generator().manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(dtype)

    torch.manual_seed(seed)
    state_dict = {k: v.to(dtype) for k, v in nn.LSTM(**shape.module_kwargs()).state_dict().items()}
    T, N, H = shape.steps, shape.batch, shape.hidden_size
    D = 2 if shape.bidirectional else 1
    x = randn(N, T, shape.input_size) if shape.batch_first else randn(T, N, shape.input_size)
    lengths = None
    if shape.packed:
        lengths = torch.randint(1, T + 1, (N,), generator=gen)
        lengths[torch.randint(0, N, (1,), generator=gen)] = T
        if N > 1 and bool((lengths[1:] <= lengths[:-1]).all()):
            lengths = lengths.flip(0)  # unsorted
    states = (shape.num_layers * D, N, H)
    h0, c0 = (randn(*states), randn(*states)) if shape.with_hx else (None, None)
    out_shape = (N, T, D * H) if shape.batch_first else (T, N, D * H)
    return Inputs(state_dict, x, lengths, h0, c0, randn(*out_shape))


def run(cls, shape: Shape, inputs: Inputs, device, dtype, backward: bool = True) -> Dict[str, torch.Tensor]:
    """Forward (and backward) of a `cls` module on `inputs` moved to (device, dtype)."""
    module = cls(**shape.module_kwargs(), device=device, dtype=dtype)
    module.load_state_dict(inputs.state_dict)

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype, copy=True).requires_grad_(backward)

    x = leaf(inputs.x)
    hx = (leaf(inputs.h0), leaf(inputs.c0)) if shape.with_hx else None
    module_input = x
    if shape.packed:
        module_input = pack_padded_sequence(x, inputs.lengths, batch_first=shape.batch_first, enforce_sorted=False)
    with torch.set_grad_enabled(backward):
        output, (h_n, c_n) = module(module_input, hx)
    if shape.packed:
        output, _ = pad_packed_sequence(output, batch_first=shape.batch_first, total_length=shape.steps)
    result = {"output": output, "h_n": h_n, "c_n": c_n}
    if backward:
        loss = (output.double() * inputs.grad_output.to(device=device, dtype=torch.float64)).sum()
        loss = loss + h_n.double().sum() + c_n.double().sum()
        loss.backward()
        result["grad_input"] = x.grad
        if shape.with_hx:
            result.update(grad_h0=hx[0].grad, grad_c0=hx[1].grad)
        for name, p in module.named_parameters():
            result[f"grad_{name}"] = p.grad
    return {k: v.detach() for k, v in result.items()}


def max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (value.double().cpu() - reference).abs().max().item() if reference.numel() else 0.0


def check_against_reference(ours, theirs, reference, dtype) -> None:
    """Our error vs the float64 reference <= 2 x cuDNN's + floor, for every output and gradient."""
    assert ours.keys() == theirs.keys() == reference.keys()
    failures = []
    for name, ref in reference.items():
        ref = ref.double().cpu()
        assert ours[name].shape == ref.shape and ours[name].dtype == dtype, name
        err_ours, err_theirs = max_error(ours[name], ref), max_error(theirs[name], ref)
        bound = 2 * err_theirs + FLOOR[dtype] * max(1.0, ref.abs().max().item() if ref.numel() else 1.0)
        if not err_ours <= bound:  # also catches NaN
            failures.append(f"{name}: error {err_ours:.3g} > bound {bound:.3g} (torch.nn.LSTM: {err_theirs:.3g})")
    assert not failures, "\n".join(failures)


class strict_fp32:
    """TF32 off for cuDNN RNNs (and so for our cuBLAS backward, which follows the same switch); the
    persistent kernel itself always multiplies in FP32."""

    def __enter__(self) -> None:
        rnn = getattr(torch.backends.cudnn, "rnn", None)
        if rnn is not None and hasattr(rnn, "fp32_precision"):
            self.saved = ("rnn", rnn.fp32_precision)
            rnn.fp32_precision = "ieee"
        else:
            self.saved = ("legacy", torch.backends.cudnn.allow_tf32)
            torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc) -> None:
        kind, value = self.saved
        if kind == "rnn":
            torch.backends.cudnn.rnn.fp32_precision = value
        else:
            torch.backends.cudnn.allow_tf32 = value


def compare(shape: Shape, dtype: torch.dtype, backward: bool = True) -> None:
    inputs = make_inputs(shape, dtype)
    with strict_fp32():
        reference = run(nn.LSTM, shape, inputs, "cpu", torch.float64, backward)
        theirs = run(nn.LSTM, shape, inputs, DEVICE, dtype, backward)
        before = launches()
        ours = run(fused_lstm.LSTM, shape, inputs, DEVICE, dtype, backward)
    assert launches() - before == shape.kernel_launches, "the persistent kernel did not run"
    check_against_reference(ours, theirs, reference, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_matches_float64_reference_like_cudnn(persistent, shape: Shape, dtype: torch.dtype):
    compare(shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[4]], ids=lambda s: s.name)
def test_inference_without_workspace(persistent, shape: Shape, dtype: torch.dtype):
    """no_grad: the kernel variant that saves no workspace."""
    compare(shape, dtype, backward=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_largest_supported_hidden_size(persistent, dtype: torch.dtype):
    batch = 4
    hidden = max_hidden(dtype, batch)
    assert hidden >= 256, f"the persistent kernel supports only H <= {hidden} for batch {batch} in {dtype}"
    compare(Shape("largest", input_size=8, hidden_size=hidden, batch=batch, steps=16), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hidden_size_beyond_the_largest(monkeypatch, dtype: torch.dtype):
    """One unit more than fits: FUSED_LSTM_PERSISTENT=1 raises with the reason; auto falls back to the
    standard path and is still correct."""
    batch = 4
    shape = Shape("beyond", input_size=8, hidden_size=max_hidden(dtype, batch) + 1, batch=batch, steps=16)
    inputs = make_inputs(shape, dtype)
    monkeypatch.setenv(ENV, "1")
    with pytest.raises(RuntimeError, match="persistent CUDA kernel cannot run this layer"):
        run(fused_lstm.LSTM, shape, inputs, DEVICE, dtype, backward=False)
    monkeypatch.setenv(ENV, "auto")
    before = launches()
    with strict_fp32():
        reference = run(nn.LSTM, shape, inputs, "cpu", torch.float64, backward=False)
        theirs = run(nn.LSTM, shape, inputs, DEVICE, dtype, backward=False)
        ours = run(fused_lstm.LSTM, shape, inputs, DEVICE, dtype, backward=False)
    assert launches() == before
    check_against_reference(ours, theirs, reference, dtype)


@pytest.mark.parametrize(
    "kwargs, dtype, match",
    [
        (dict(proj_size=4), torch.float32, "projections"),
        (dict(), torch.float64, "dtype"),
        (dict(batch=65), torch.float32, "batch 65"),
    ],
    ids=["projection", "float64", "batch_65"],
)
def test_forced_on_an_unsupported_layer_raises(persistent, kwargs, dtype, match):
    batch = kwargs.pop("batch", 3)
    module = fused_lstm.LSTM(5, 8, device=DEVICE, dtype=dtype, **kwargs)
    with pytest.raises(RuntimeError, match=match):
        module(torch.randn(4, batch, 5, device=DEVICE, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forced_off_and_on_agree(monkeypatch, dtype: torch.dtype):
    shape = Shape("on_off", hidden_size=72, num_layers=2, bidirectional=True, packed=True, batch=7, steps=12)
    inputs = make_inputs(shape, dtype)
    results = {}
    with strict_fp32():
        for mode in ("0", "1"):
            monkeypatch.setenv(ENV, mode)
            before = launches()
            results[mode] = run(fused_lstm.LSTM, shape, inputs, DEVICE, dtype)
            assert launches() - before == (shape.kernel_launches if mode == "1" else 0), mode
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    for name, off in results["0"].items():
        torch.testing.assert_close(results["1"][name], off, atol=tol * max(1.0, off.abs().max().item()), rtol=tol,
                                   msg=lambda m: f"{name}: {m}")



def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of `t` stored another way: "transposed_view" (a 2-D tensor as the transpose of its contiguous
    transpose: column-major) or "strided_slice" (every other element of a larger tensor along the last dim)."""
    if layout == "transposed_view":
        return t.t().contiguous().t() if t.dim() == 2 else t
    big = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), device=t.device, dtype=t.dtype)
    big[..., ::2] = t
    return big[..., ::2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["transposed_view", "strided_slice"])
def test_noncontiguous_weights(monkeypatch, layout: str, dtype: torch.dtype):
    """Weights that are transposed views or strided slices (the kernel reads W_hh through its strides): the
    persistent path gives the standard path's outputs and gradients."""
    shape = Shape("noncontiguous_weights", hidden_size=40, bidirectional=True, packed=True, batch=6, steps=9)
    inputs = make_inputs(shape, dtype)
    module = fused_lstm.LSTM(**shape.module_kwargs(), device=DEVICE, dtype=dtype)
    results = {}
    with strict_fp32():
        for mode in ("0", "1"):
            monkeypatch.setenv(ENV, mode)
            params = {name: relayout(value.to(DEVICE), layout).requires_grad_()
                      for name, value in inputs.state_dict.items()}
            assert not params["weight_hh_l0"].is_contiguous()
            x, h0, c0 = (t.to(DEVICE).requires_grad_() for t in (inputs.x, inputs.h0, inputs.c0))
            packed = pack_padded_sequence(x, inputs.lengths, enforce_sorted=False)
            before = launches()
            output, (h_n, c_n) = torch.func.functional_call(module, params, (packed, (h0, c0)))
            assert launches() - before == (shape.kernel_launches if mode == "1" else 0), mode
            output, _ = pad_packed_sequence(output, total_length=shape.steps)
            loss = (output.double() * inputs.grad_output.to(device=DEVICE, dtype=torch.float64)).sum()
            loss = loss + h_n.double().sum() + c_n.double().sum()
            grads = torch.autograd.grad(loss, [x, h0, c0, *params.values()])
            results[mode] = [output.detach(), h_n.detach(), c_n.detach(), *grads]
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    for index, (on, off) in enumerate(zip(results["1"], results["0"])):
        torch.testing.assert_close(on, off, atol=tol * max(1.0, off.abs().max().item()), rtol=tol,
                                   msg=lambda m: f"result {index}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reruns_are_bitwise_equal(persistent, dtype: torch.dtype):
    shape = Shape("rerun", hidden_size=130, num_layers=2, bidirectional=True, packed=True, batch=11, steps=10)
    inputs = make_inputs(shape, dtype)
    first, second = (run(fused_lstm.LSTM, shape, inputs, DEVICE, dtype) for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_unset_means_standard_path(monkeypatch):
    """Until a GPU run has verified and timed the persistent kernel, it is opt-in: unset means never."""
    monkeypatch.delenv(ENV, raising=False)
    module = fused_lstm.LSTM(8, 64, device=DEVICE)
    before = launches()
    with torch.no_grad():
        module(torch.randn(20, 4, 8, device=DEVICE))
    assert launches() == before


def test_auto_mode_picks_persistent_for_small_batch_long_sequence(monkeypatch):
    """The current Auto heuristic (a guess until benchmarked): N <= 32 and T >= 16 -> persistent;
    a short sequence -> standard. Update together with persistent_preferred."""
    monkeypatch.setenv(ENV, "auto")
    module = fused_lstm.LSTM(8, 64, device=DEVICE)
    before = launches()
    with torch.no_grad():
        module(torch.randn(20, 4, 8, device=DEVICE))
    assert launches() == before + 1
    with torch.no_grad():
        module(torch.randn(3, 4, 8, device=DEVICE))
    assert launches() == before + 1


def test_invalid_mode_is_an_error(monkeypatch):
    monkeypatch.setenv(ENV, "sometimes")
    module = fused_lstm.LSTM(4, 8, device=DEVICE)
    with pytest.raises(RuntimeError, match=ENV):
        module(torch.randn(20, 2, 4, device=DEVICE))


def test_runs_on_the_current_stream(persistent):
    """An input produced late on a side stream is read only when ready; results equal the default stream's."""
    shape = Shape("stream", hidden_size=48, bidirectional=True, batch=3, steps=20)
    inputs = make_inputs(shape, torch.float32)
    expected = run(fused_lstm.LSTM, shape, inputs, DEVICE, torch.float32, backward=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        got = run(fused_lstm.LSTM, shape, inputs, DEVICE, torch.float32, backward=False)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_cuda_graph_capture_replays(persistent):
    torch.manual_seed(0)
    module = fused_lstm.LSTM(8, 16, num_layers=2, bidirectional=True, device=DEVICE)
    static_x = torch.randn(17, 3, 8, device=DEVICE)
    assert_cuda_graph_replays(module, static_x)
