"""The persistent CUDA kernels (csrc/cuda/persistent/): what a user of ``fused_lstm.LSTM`` relies on when the
whole forward (and backward) recurrence of a direction runs as one cooperative kernel.

Every test needs a CUDA GPU and is skipped cleanly without one. ``FUSED_LSTM_PERSISTENT=1`` forces the
persistent kernel (an unsupported shape is then an error, never a silent fallback); each test that forces it
also checks, through ``torch.ops.fused_lstm.persistent_launches``, that the kernel really ran. Accuracy is
judged as in test_cuda.py (both use gpu_harness.py): against a float64 CPU ``torch.nn.LSTM`` with the same
weights, our max abs error must stay within twice the error of ``torch.nn.LSTM`` on CUDA (cuDNN) in the same
dtype plus a small floor.
Under ``FUSED_LSTM_PERSISTENT=1`` backward runs the persistent backward kernel on the workspace the persistent
forward saved, so gradients check both. The same cases run on the CPU under the CUDA emulator in CI
(tests/test_emulator.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_lstm
from conftest import assert_cuda_graph_replays
from gpu_harness import Case, build_and_run, check_against_reference, fp32_precision, make_inputs, relayout

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"
ENV = "FUSED_LSTM_PERSISTENT"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def launches() -> int:
    return torch.ops.fused_lstm.persistent_launches()


def max_hidden(dtype: torch.dtype, batch: int) -> int:
    """The largest hidden size the persistent kernel supports on this GPU for `batch` rows of `dtype`."""
    return torch.ops.fused_lstm.persistent_max_hidden(torch.empty(0, device=DEVICE, dtype=dtype), batch)


@pytest.fixture
def persistent(monkeypatch):
    monkeypatch.setenv(ENV, "1")


def kernel_launches(case: Case, backward: bool = False) -> int:
    """Persistent launches per forward (and backward): one per layer and direction each."""
    return case.num_layers * case.directions * (2 if backward else 1)


CASES = [
    Case("base"),
    Case("hidden_200_bidirectional", hidden_size=200, bidirectional=True, batch=3, steps=9),
    Case("batch_beyond_one_tile_two_layers", hidden_size=40, num_layers=2, batch=37, steps=5),
    Case("one_step", batch=2, steps=1),
    Case("packed_unsorted_bidirectional", bidirectional=True, packed=True, batch=6, steps=8),
    Case("packed_two_layers_batch_first_no_hx", num_layers=2, batch_first=True, packed=True, batch=9,
          with_hx=False),
    Case("batch_one_long", hidden_size=64, batch=1, steps=40),
    Case("batch_64", input_size=16, hidden_size=96, batch=64, steps=4),
    Case("all_sizes_one", input_size=1, hidden_size=1, batch=1, steps=3),
    # Projections (proj_size): W_hr on chip too, two grid barriers per step, forward and backward.
    Case("projection_packed_bidirectional", hidden_size=48, proj_size=20, bidirectional=True, packed=True, batch=6,
         steps=8),
    Case("projection_odd_batch_one", input_size=3, hidden_size=33, proj_size=17, batch=1, steps=6),
    Case("projection_two_layers_batch_40", hidden_size=96, proj_size=32, num_layers=2, batch=40, steps=5),
]


def compare(case: Case, dtype: torch.dtype, backward: bool = True) -> None:
    inputs = make_inputs(case, dtype)
    with fp32_precision(allow_tf32=False):
        reference = build_and_run(nn.LSTM, case, inputs, "cpu", torch.float64, backward)
        theirs = build_and_run(nn.LSTM, case, inputs, DEVICE, dtype, backward)
        before = launches()
        ours = build_and_run(fused_lstm.LSTM, case, inputs, DEVICE, dtype, backward)
    assert launches() - before == kernel_launches(case, backward), "the persistent kernels did not run"
    check_against_reference(ours, theirs, reference, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_float64_reference_like_cudnn(persistent, case: Case, dtype: torch.dtype):
    compare(case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=lambda c: c.name)
def test_inference_without_workspace(persistent, case: Case, dtype: torch.dtype):
    """no_grad: the kernel variant that saves no workspace."""
    compare(case, dtype, backward=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_largest_supported_hidden_size(persistent, dtype: torch.dtype):
    batch = 4
    hidden = max_hidden(dtype, batch)
    assert hidden >= 256, f"the persistent kernel supports only H <= {hidden} for batch {batch} in {dtype}"
    compare(Case("largest", input_size=8, hidden_size=hidden, batch=batch, steps=16), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hidden_size_beyond_the_largest(monkeypatch, dtype: torch.dtype):
    """One unit more than fits: FUSED_LSTM_PERSISTENT=1 raises with the reason; auto falls back to the
    standard path and is still correct."""
    batch = 4
    case = Case("beyond", input_size=8, hidden_size=max_hidden(dtype, batch) + 1, batch=batch, steps=16)
    inputs = make_inputs(case, dtype)
    monkeypatch.setenv(ENV, "1")
    with pytest.raises(RuntimeError, match="persistent CUDA kernel cannot run this layer"):
        build_and_run(fused_lstm.LSTM, case, inputs, DEVICE, dtype, backward=False)
    monkeypatch.setenv(ENV, "auto")
    before = launches()
    with fp32_precision(allow_tf32=False):
        reference = build_and_run(nn.LSTM, case, inputs, "cpu", torch.float64, backward=False)
        theirs = build_and_run(nn.LSTM, case, inputs, DEVICE, dtype, backward=False)
        ours = build_and_run(fused_lstm.LSTM, case, inputs, DEVICE, dtype, backward=False)
    assert launches() == before
    check_against_reference(ours, theirs, reference, dtype)


@pytest.mark.parametrize(
    "kwargs, dtype, match",
    [
        (dict(), torch.float64, "dtype"),
        (dict(batch=65), torch.float32, "batch 65"),
    ],
    ids=["float64", "batch_65"],
)
def test_forced_on_an_unsupported_layer_raises(persistent, kwargs, dtype, match):
    batch = kwargs.pop("batch", 3)
    module = fused_lstm.LSTM(5, 8, device=DEVICE, dtype=dtype, **kwargs)
    with pytest.raises(RuntimeError, match=match):
        module(torch.randn(4, batch, 5, device=DEVICE, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forced_off_and_on_agree(monkeypatch, dtype: torch.dtype):
    case = Case("on_off", hidden_size=72, num_layers=2, bidirectional=True, packed=True, batch=7, steps=12)
    inputs = make_inputs(case, dtype)
    results = {}
    with fp32_precision(allow_tf32=False):
        for mode in ("0", "1"):
            monkeypatch.setenv(ENV, mode)
            before = launches()
            results[mode] = build_and_run(fused_lstm.LSTM, case, inputs, DEVICE, dtype)
            assert launches() - before == (kernel_launches(case, backward=True) if mode == "1" else 0), mode
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    for name, off in results["0"].items():
        torch.testing.assert_close(results["1"][name], off, atol=tol * max(1.0, off.abs().max().item()), rtol=tol,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["transposed_view", "strided_slice"])
def test_noncontiguous_weights(monkeypatch, layout: str, dtype: torch.dtype):
    """Weights that are transposed views or strided slices (the kernel reads W_hh through its strides): the
    persistent path gives the standard path's outputs and gradients."""
    case = Case("noncontiguous_weights", hidden_size=40, bidirectional=True, packed=True, batch=6, steps=9)
    inputs = make_inputs(case, dtype)
    module = fused_lstm.LSTM(**case.module_kwargs(), device=DEVICE, dtype=dtype)
    results = {}
    with fp32_precision(allow_tf32=False):
        for mode in ("0", "1"):
            monkeypatch.setenv(ENV, mode)
            params = {name: relayout(value.to(DEVICE), layout).requires_grad_()
                      for name, value in inputs.state_dict.items()}
            assert not params["weight_hh_l0"].is_contiguous()
            x, h0, c0 = (t.to(DEVICE).requires_grad_() for t in (inputs.x, inputs.h0, inputs.c0))
            packed = pack_padded_sequence(x, inputs.lengths, enforce_sorted=False)
            before = launches()
            output, (h_n, c_n) = torch.func.functional_call(module, params, (packed, (h0, c0)))
            assert launches() - before == (kernel_launches(case) if mode == "1" else 0), mode
            output, _ = pad_packed_sequence(output, total_length=case.steps)
            loss = (output.double() * inputs.grad_output.to(device=DEVICE, dtype=torch.float64)).sum()
            loss = loss + h_n.double().sum() + c_n.double().sum()
            grads = torch.autograd.grad(loss, [x, h0, c0, *params.values()])
            results[mode] = [output.detach(), h_n.detach(), c_n.detach(), *grads]
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    for index, (on, off) in enumerate(zip(results["1"], results["0"])):
        torch.testing.assert_close(on, off, atol=tol * max(1.0, off.abs().max().item()), rtol=tol,
                                   msg=lambda m: f"result {index}: {m}")


@pytest.mark.parametrize("proj_size", [0, 50])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reruns_are_bitwise_equal(persistent, dtype: torch.dtype, proj_size: int):
    case = Case("rerun", hidden_size=130, proj_size=proj_size, num_layers=2, bidirectional=True, packed=True,
                batch=11, steps=10)
    inputs = make_inputs(case, dtype)
    first, second = (build_and_run(fused_lstm.LSTM, case, inputs, DEVICE, dtype) for _ in range(2))
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


@pytest.mark.parametrize("batch, hidden, steps", [(4, 64, 20), (64, 512, 20), (1, 256, 2)])
def test_auto_mode_follows_the_cost_model(monkeypatch, batch, hidden, steps):
    """FUSED_LSTM_PERSISTENT=auto takes the persistent kernel exactly when the cost model predicts it faster for
    this card (torch.ops.fused_lstm.persistent_predicted_us; a prediction until fitted to a GPU run)."""
    monkeypatch.setenv(ENV, "auto")
    sample = torch.empty(0, device=DEVICE)
    try:
        persistent_us, standard_us = torch.ops.fused_lstm.persistent_predicted_us(sample, batch, hidden, steps)
    except RuntimeError:  # no plan on this card: standard
        persistent_us, standard_us = float("inf"), 0.0
    module = fused_lstm.LSTM(8, hidden, device=DEVICE)
    before = launches()
    with torch.no_grad():
        module(torch.randn(steps, batch, 8, device=DEVICE))
    assert launches() - before == (1 if persistent_us < standard_us else 0)


@pytest.mark.parametrize("product", ["fma", "mma"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[7]], ids=lambda c: c.name)
def test_product_variants(persistent, monkeypatch, case: Case, dtype: torch.dtype, product: str):
    """Each product variant of the forward and backward kernels (FMAs, or tensor cores through WMMA), forced by
    FUSED_LSTM_PERSISTENT_PRODUCT, against cuDNN's error (tests/test_emulator.py runs the same on the CPU)."""
    if product == "mma" and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the tensor-core variant needs sm_80")
    monkeypatch.setenv("FUSED_LSTM_PERSISTENT_PRODUCT", product)
    compare(case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4]], ids=lambda c: c.name)
def test_cluster_exchange(persistent, monkeypatch, case: Case, dtype: torch.dtype):
    """The Hopper variant: one thread-block cluster per direction, h_t through distributed shared memory,
    cluster.sync per step (forced by FUSED_LSTM_PERSISTENT_EXCHANGE=cluster), against cuDNN's error."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")
    monkeypatch.setenv("FUSED_LSTM_PERSISTENT_EXCHANGE", "cluster")
    compare(case, dtype)


def test_tf32_tensor_cores_when_allowed(persistent, monkeypatch):
    """float32 takes the tensor-core variant (forward and backward) only with TF32 allowed; its error, gradients
    included, is then TF32-sized."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the tensor-core variant needs sm_80")
    monkeypatch.setenv("FUSED_LSTM_PERSISTENT_PRODUCT", "mma")
    case = CASES[7]
    inputs = make_inputs(case, torch.float32)
    with fp32_precision(allow_tf32=True):
        reference = build_and_run(nn.LSTM, case, inputs, "cpu", torch.float64, backward=True)
        before = launches()
        ours = build_and_run(fused_lstm.LSTM, case, inputs, DEVICE, torch.float32, backward=True)
    assert launches() - before == kernel_launches(case, backward=True)
    for name, ref in reference.items():
        err = (ours[name].double().cpu() - ref).abs().max().item()
        assert err < 1e-2 * max(1.0, ref.abs().max().item()), (name, err)


def test_invalid_mode_is_an_error(monkeypatch):
    monkeypatch.setenv(ENV, "sometimes")
    module = fused_lstm.LSTM(4, 8, device=DEVICE)
    with pytest.raises(RuntimeError, match=ENV):
        module(torch.randn(20, 2, 4, device=DEVICE))


def test_runs_on_the_current_stream(persistent):
    """An input produced late on a side stream is read only when ready; results equal the default stream's."""
    case = Case("stream", hidden_size=48, bidirectional=True, batch=3, steps=20)
    inputs = make_inputs(case, torch.float32)
    expected = build_and_run(fused_lstm.LSTM, case, inputs, DEVICE, torch.float32, backward=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        got = build_and_run(fused_lstm.LSTM, case, inputs, DEVICE, torch.float32, backward=False)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_cuda_graph_capture_replays(persistent):
    torch.manual_seed(0)
    module = fused_lstm.LSTM(8, 16, num_layers=2, bidirectional=True, device=DEVICE)
    static_x = torch.randn(17, 3, 8, device=DEVICE)
    assert_cuda_graph_replays(module, static_x)


def test_module_argument_forces_either_path(monkeypatch):
    """recurrence= on the module overrides FUSED_LSTM_PERSISTENT both ways; both paths agree."""
    module = fused_lstm.LSTM(8, 64, device=DEVICE, recurrence="persistent")
    x = torch.randn(20, 4, 8, device=DEVICE)
    monkeypatch.setenv(ENV, "0")
    before = launches()
    with torch.no_grad(), fp32_precision(allow_tf32=False):  # the persistent kernel is strict FP32
        persistent = module(x)[0]
    assert launches() == before + 1 and fused_lstm.last_path() == "cuda:persistent"
    monkeypatch.setenv(ENV, "1")
    module.recurrence = "standard"
    with torch.no_grad(), fp32_precision(allow_tf32=False):
        standard = module(x)[0]
    assert launches() == before + 1 and fused_lstm.last_path() == "cuda:standard"
    torch.testing.assert_close(persistent, standard, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("product", ["fma", "mma"])
def test_projection_product_variants(persistent, monkeypatch, product: str, dtype: torch.dtype):
    """A projection with either W_hh product in both kernels (the projection's own product is FMA): both agree with
    float64 like cuDNN, forward and backward."""
    if product == "mma" and (torch.cuda.get_device_capability()[0] < 8 or dtype == torch.float32):
        pytest.skip("tensor cores: sm_80+, and float32 only with TF32 (test_tf32_tensor_cores_when_allowed)")
    monkeypatch.setenv("FUSED_LSTM_PERSISTENT_PRODUCT", product)
    compare(CASES[-3], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_projection_in_a_cluster(persistent, monkeypatch, dtype: torch.dtype):
    """A projection on the Hopper cluster exchange (h' and h through distributed shared memory, two cluster.sync
    per step), forced, against cuDNN's error; the backward runs in a cluster too (dh_total and d_gates through
    distributed shared memory)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("clusters need sm_90")
    monkeypatch.setenv("FUSED_LSTM_PERSISTENT_EXCHANGE", "cluster")
    compare(CASES[-2], dtype)


def test_sixteen_block_cluster(persistent):
    """bf16, H = 512, batch 1: W_hh fits 16 SMs' shared memory but not 8, so the cost model's pick is a 16-block
    (non-portable) cluster wherever the device runs one (H100 / H200 do: 16 is their non-portable size); it agrees
    with float64 like cuDNN. Elsewhere the plan falls back to the grid, still correct."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("clusters need sm_90")
    sample = torch.empty(0, device=DEVICE, dtype=torch.bfloat16)
    units, blocks, _, _, _, cluster, _, _ = torch.ops.fused_lstm.persistent_plan(sample, 1, 512)
    if any(name in torch.cuda.get_device_name() for name in ("H100", "H200")):
        assert cluster and (blocks, units) == (16, 32)
    compare(Case("cluster_16_blocks", input_size=8, hidden_size=512, batch=1, steps=20), torch.bfloat16)
