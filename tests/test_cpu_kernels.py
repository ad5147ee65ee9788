"""The CPU float32 kernels on both sides of every size switch (csrc/cpu/cpu_limits.h): W read in place vs
packed, for the input projection, the fused recurrence and the per-step loop, with row counts and sizes
that leave vector tails (not multiples of 16) and several threads. Each case is checked against
torch.nn.LSTM and against a float64 run (our float32 error within torch's own, as assert_error_within_torch
measures it). Every test runs once per kernel build this CPU supports (AVX-512 and AVX2 on x86-64-v4 CPUs,
csrc/cpu/simd.h): the two differ in vector width and tile shape, so each needs its own run."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fused_lstm
from conftest import assert_close, assert_error_within_torch, lstm_pair

LIMITS = fused_lstm._C.cpu_kernel_limits()
IN_PLACE_BATCH = LIMITS["max_in_place_batch"]
IN_PLACE_ROWS = LIMITS["max_in_place_rows"]
# The smallest hidden size (not a multiple of 16) whose W_hh is read in place at small batches.
IN_PLACE_H = next(h for h in range(16, 4096) if 16 * h * h >= LIMITS["in_place_min_weight_bytes"] and h % 16)
FUSED_BATCH = LIMITS["fused_projection_min_batch"]
CHUNK_ROWS = LIMITS["projection_chunk_rows"]
PACKED_DEPTH = LIMITS["min_packed_depth"]
PACKED_ROWS = LIMITS["min_packed_rows"]
LARGE_W_IN_PLACE_ROWS = LIMITS["max_in_place_rows_large_weight"]  # W of large_weight_bytes or more
# Every test here runs once per kernel build this CPU supports (conftest.py, cpu_kernels).
pytestmark = pytest.mark.usefixtures("cpu_kernels")


def _cases():
    """(steps, batch, input_size, hidden, proj_size, bias, what it covers)."""
    small, large = IN_PLACE_BATCH, IN_PLACE_BATCH + 1
    return [
        (9, 1, 37, IN_PLACE_H, 0, True, "batch 1: W_hh and W_ih in place, K tails"),
        (5, small, 64, IN_PLACE_H, 0, True, "largest in-place batch, two threads per step"),
        (20, small, 19, 64, 0, True, "small batch with a small W_hh: packed"),
        (2 * -(-CHUNK_ROWS // large) + 7, large, 33, 40, 0, True, "smallest packed batch, three projection chunks"),
        (6, 2 * large + 1, 19, 72, 0, False, "packed, no bias, row tile tails"),
        (5, FUSED_BATCH - 1, 48, 96, 0, True, "packed, two threads per step, one projection chunk"),
        (4, FUSED_BATCH + 1, 19, 40, 0, False, "fused projection, batch split over threads, no bias, tails"),
        (3, FUSED_BATCH, 192, 192, 0, True, "fused projection, batch split, 1.2 MB of weights"),
        (2, 2 * FUSED_BATCH, 70, 150, 0, True, "fused projection at a larger batch, batch split"),
        (9, 2 * FUSED_BATCH + 3, 300, 300, 0, True, "large batch and weights: projection in chunks, units split"),
        (IN_PLACE_ROWS - 1, 1, 24, 17, 0, True, "per-step loop's projection in place, one row below the switch"),
        (-(-IN_PLACE_ROWS // large), large, 19, 72, 0, True, "per-step loop: packed projection at the switch"),
        (3, 2, 16, IN_PLACE_H, 0, True, "fewer rows than a packed recurrence needs: in place anyway"),
        (3, 2, 16, 48, 0, True, "fewer rows than a packed recurrence needs, small W_hh: per-step loop"),
        (1, PACKED_DEPTH - 1, 21, 36, 0, True, "weight gradients over one row fewer than packing needs: ATen"),
        (1, PACKED_DEPTH, 21, 36, 0, True, "weight gradients over just enough rows: packed"),
        (37, 29, 19, 72, 0, True, "weight gradients over 1073 rows: three k chunks of 512"),
        (7, 37, 24, 260, 0, True, "input gradient over 4H = 1040 in k chunks, uneven row blocks per thread"),
        (30, 70, 2000, 36, 0, True, "weight gradients with a wide input: one pass per product, past the budget"),
        (6, 3, 21, 36, 11, True, "proj_size: per-step products in place"),
        (5, PACKED_ROWS + 1, 21, 36, 11, True, "proj_size: per-step products in place at the first step, then packed"),
        (3, IN_PLACE_ROWS + 3, 21, 36, 11, True, "proj_size with a large batch: packed per-step products"),
        (1, LARGE_W_IN_PLACE_ROWS - 1, 512, 512, 0, True, "4 MB weights: per-step loop in place below their switch"),
        (1, LARGE_W_IN_PLACE_ROWS, 512, 512, 0, True, "4 MB weights: per-step loop packed at their switch"),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("steps,batch,input_size,hidden,proj,bias,what", _cases(), ids=[c[-1] for c in _cases()])
@pytest.mark.parametrize("recurrence", ["auto", "standard"])
def test_float32_kernels_match_torch_and_float64(steps, batch, input_size, hidden, proj, bias, what, recurrence):
    check_against_torch_and_float64(steps, batch, input_size, hidden, proj, bias, recurrence)


def test_fused_projection_with_the_units_split():
    """The fused input projection with the hidden units split over threads: its weights must be past the row
    split's budget yet each thread's share within the fused projection's, which takes more threads than
    this 2-core machine runs by default (3 MB of weights, 0.75 MB per thread of 4)."""
    assert weight_bytes(512, 256) > LIMITS["row_split_max_weight_bytes"]
    assert weight_bytes(512, 256) / 4 <= LIMITS["fused_projection_max_slice_bytes"] < weight_bytes(512, 256) / 2
    previous = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        check_against_torch_and_float64(3, 4 * LIMITS["row_split_min_batch"], 512, 256, 0, True, "auto")
    finally:
        torch.set_num_threads(previous)


@pytest.mark.slow
def test_projection_in_long_chunks_for_large_weights():
    """Past projection_chunk_max_weight_bytes of packed W_ih and W_hh the forward projects chunks of
    large_projection_chunk_bytes of gates (1572 rows here: two chunks of 17 steps and 3 steps, row tiles
    and a unit block with tails)."""
    steps, batch, input_size, hidden = 20, 97, 50, 1000
    assert weight_bytes(input_size, hidden) > LIMITS["projection_chunk_max_weight_bytes"]
    chunk_steps = -(-(LIMITS["large_projection_chunk_bytes"] // (16 * hidden)) // batch)
    assert 1 < steps / chunk_steps < 2 and steps % chunk_steps
    check_against_torch_and_float64(steps, batch, input_size, hidden, 0, True, "auto")


def weight_bytes(input_size, hidden):
    """Bytes of a layer direction's packed float32 W_ih and W_hh."""
    return (input_size + hidden) * 4 * hidden * 4


def check_against_torch_and_float64(steps, batch, input_size, hidden, proj, bias, recurrence):
    ref64, _ = lstm_pair(input_size, hidden, proj_size=proj, bias=bias, bidirectional=True, init_scale=None)
    ref32, ours = lstm_pair(input_size, hidden, proj_size=proj, bias=bias, bidirectional=True, dtype=torch.float32)
    ref32.load_state_dict(ref64.state_dict())
    ours.load_state_dict(ref64.state_dict())
    ours.recurrence = recurrence
    x64 = torch.randn(steps, batch, input_size, dtype=torch.float64)
    x = x64.float().requires_grad_()
    exact_out, (exact_h, exact_c) = ref64(x64)
    out_ref, (h_ref, c_ref) = ref32(x)
    out, (h, c) = ours(x)
    packed_too_few_rows = batch * steps < LIMITS["min_recurrence_rows"] and 16 * hidden * hidden < LIMITS[
        "in_place_min_weight_bytes"]
    per_step = recurrence == "standard" or proj or packed_too_few_rows
    expected_path = "cpu:per-step" if per_step else "cpu:fused-recurrence"
    assert fused_lstm.last_path() == expected_path
    for name, mine, theirs, exact in (("output", out, out_ref, exact_out), ("h_n", h, h_ref, exact_h),
                                      ("c_n", c, c_ref, exact_c)):
        assert_close(mine, theirs, torch.float32, name)
        assert_error_within_torch(mine, theirs, exact, name)
    # Inference keeps no workspace (the fused recurrence then holds one step's gates at a time): the same
    # arithmetic, so the same bits.
    with torch.no_grad():
        out_inference, (h_inference, c_inference) = ours(x)
    assert torch.equal(out_inference, out) and torch.equal(h_inference, h) and torch.equal(c_inference, c)
    g = torch.randn_like(out)
    grads_ref = torch.autograd.grad((out_ref * g).sum() + h_ref.sum() + c_ref.sum(), [x, *ref32.parameters()])
    grads = torch.autograd.grad((out * g).sum() + h.sum() + c.sum(), [x, *ours.parameters()])
    for name, mine, theirs in zip(["input", *dict(ours.named_parameters())], grads, grads_ref):
        assert_close(mine, theirs, torch.float32, f"grad {name}")


@pytest.mark.parametrize("batch", [IN_PLACE_BATCH + 2, FUSED_BATCH - 3])
def test_packed_sequences_over_several_projection_chunks(batch):
    """Variable lengths, both directions, more steps than one projection chunk holds: each chunk's rows are
    a different range per direction, and rows drop out inside chunks."""
    steps = 3 * -(-CHUNK_ROWS // batch)
    ref, ours = lstm_pair(27, 40, bidirectional=True, dtype=torch.float32, init_scale=None)
    x = torch.randn(steps, batch, 27, requires_grad=True)
    lengths = torch.randint(1, steps + 1, (batch,))
    lengths[0] = steps
    packed = lambda: pack_padded_sequence(x, lengths, enforce_sorted=False)  # noqa: E731
    out_ref, (h_ref, c_ref) = ref(packed())
    out, (h, c) = ours(packed())
    assert fused_lstm.last_path() == "cpu:fused-recurrence"
    for name, mine, theirs in (("output", out.data, out_ref.data), ("h_n", h, h_ref), ("c_n", c, c_ref)):
        assert_close(mine, theirs, torch.float32, name)
    with torch.no_grad():
        out_inference, (h_inference, c_inference) = ours(packed())
    assert torch.equal(out_inference.data, out.data) and torch.equal(h_inference, h) and torch.equal(c_inference, c)
    g = torch.randn_like(out.data)
    grads_ref = torch.autograd.grad((out_ref.data * g).sum() + h_ref.sum(), [x, *ref.parameters()])
    grads = torch.autograd.grad((out.data * g).sum() + h.sum(), [x, *ours.parameters()])
    for name, mine, theirs in zip(["input", *dict(ours.named_parameters())], grads, grads_ref):
        assert_close(mine, theirs, torch.float32, f"grad {name}")


def test_limits_are_consistent():
    """The switches the cases above straddle exist and are ordered as the cases assume."""
    assert 1 <= IN_PLACE_BATCH < IN_PLACE_ROWS
    assert 1 <= LIMITS["min_packed_rows"] <= IN_PLACE_ROWS < LARGE_W_IN_PLACE_ROWS
    assert 4 * 512 * 512 * 4 >= LIMITS["large_weight_bytes"] > 4 * 36 * 36 * 4
    assert LIMITS["min_recurrence_rows"] >= 1 and PACKED_DEPTH > 1
    assert IN_PLACE_BATCH < FUSED_BATCH
    # The cases above straddle the byte budgets as their names say (float32 packed weights, bytes).
    assert FUSED_BATCH >= LIMITS["row_split_min_batch"]
    assert weight_bytes(19, 40) <= weight_bytes(192, 192) <= LIMITS["row_split_max_weight_bytes"]
    assert weight_bytes(70, 150) <= LIMITS["row_split_max_weight_bytes"] < weight_bytes(300, 300)
    assert weight_bytes(300, 300) / 2 > LIMITS["fused_projection_max_slice_bytes"]
    # The weight gradients' packed right operands ([rows, I] and [rows, H] in 64-column panels, float32):
    # the other cases share one pass, the wide-input case does not.
    packed_bytes = lambda rows, cols: rows * -(-cols // 64) * 64 * 4  # noqa: E731
    assert packed_bytes(37 * 29, 19) + packed_bytes(37 * 29, 72) <= LIMITS["shared_gather_max_packed_bytes"]
    assert packed_bytes(30 * 70, 2000) > LIMITS["shared_gather_max_packed_bytes"]


@pytest.mark.parametrize("steps,batch,input_size,hidden", [(50, 64, 256, 256), (400, 33, 24, 20)])
def test_long_reductions_within_torch_error(steps, batch, input_size, hidden):
    """Float32 errors against a float64 run where the products reduce over many terms: the weight
    gradients over every row of the sequence (3200 and 13200 here), with the bias gradient summed in the
    same pass; the input gradient and the backward recurrence over 4H = 1024; the forward over I + H = 512.
    Beyond the shared within-torch bound, the RMS error of each is held to 1.3x torch.nn.LSTM's: the kernel
    keeps 256-term partial sums, and measured 0.9-1.1x (12 draws at T=50, batch 64, H=256; 15 at the
    long sequence); with whole-K register sums the input gradient had 1.6x, the output 1.5x, the weight
    gradients up to 1.7x."""
    ref64, _ = lstm_pair(input_size, hidden, init_scale=None)
    ref32, ours = lstm_pair(input_size, hidden, dtype=torch.float32)
    ref32.load_state_dict(ref64.state_dict())
    ours.load_state_dict(ref64.state_dict())
    x64 = torch.randn(steps, batch, input_size, dtype=torch.float64, requires_grad=True)
    g64 = torch.randn(steps, batch, hidden, dtype=torch.float64)
    x_theirs, x_mine = (x64.detach().float().requires_grad_() for _ in range(2))
    out64, out_theirs, out_mine = ref64(x64)[0], ref32(x_theirs)[0], ours(x_mine)[0]
    assert fused_lstm.last_path() == "cpu:fused-recurrence"
    exact = torch.autograd.grad((out64 * g64).sum(), [x64, *ref64.parameters()])
    theirs = torch.autograd.grad((out_theirs * g64.float()).sum(), [x_theirs, *ref32.parameters()])
    mine = torch.autograd.grad((out_mine * g64.float()).sum(), [x_mine, *ours.parameters()])
    rms_error = lambda t, e: (t.detach().double() - e.detach()).pow(2).mean().sqrt().item()  # noqa: E731
    names = ["output", "grad input", *(f"grad {n}" for n in dict(ours.named_parameters()))]
    for name, m, t, e in zip(names, [out_mine, *mine], [out_theirs, *theirs], [out64, *exact]):
        assert_error_within_torch(m, t, e, name)
        assert rms_error(m, e) <= 1.3 * rms_error(t, e), (name, rms_error(m, e), rms_error(t, e))


@pytest.mark.parametrize("hidden,batch,packed,bidirectional", [(128, 64, False, False), (320, 24, True, True)])
def test_bitwise_deterministic_at_multithreaded_sizes(hidden, batch, packed, bidirectional, cpu_kernels):
    """Run to run, bit for bit, at sizes where the fused recurrences split each step between threads and the
    products run in parallel blocks (H=320: grad_input's long reduction over 4H > 1024 in chunks)."""
    _, ours = lstm_pair(hidden, hidden, bidirectional=bidirectional, dtype=torch.float32, init_scale=None)
    steps = 12
    x = torch.randn(steps, batch, hidden, requires_grad=True)
    hx = tuple(torch.randn(2 if bidirectional else 1, batch, hidden, requires_grad=True) for _ in range(2))
    lengths = torch.randint(1, steps + 1, (batch,))
    lengths[0] = steps

    def run():
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        out, (h, c) = ours(inp, hx)
        assert fused_lstm.last_path() == "cpu:fused-recurrence"
        data = out.data if packed else out
        loss = (data * data.detach().cos()).sum() + (h * 0.5).sum() + c.sum()
        return [data, h, c, *torch.autograd.grad(loss, [x, *hx, *ours.parameters()])]

    first, second = run(), run()
    assert all(t.abs().sum() > 0 for t in first)  # nothing trivially zero
    for a, b in zip(first, second):
        assert torch.equal(a, b)
