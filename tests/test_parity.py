"""fused_lstm.LSTM against torch.nn.LSTM with the same state_dict: outputs, states and every gradient,
over the product of the features a user can combine."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from conftest import assert_close, assert_error_within_torch, lstm_pair

ODD_SIZES = (1, 7, 33)

CASES = list(itertools.product(
    (1, 2, 3),                          # num_layers
    (True, False),                      # bias
    (False, True),                      # batch_first
    (False, True),                      # bidirectional
    (0, 2),                             # proj_size
    ("padded", "packed", "unbatched"),  # input form
    (False, True),                      # hx given
))


def _case_id(case):
    layers, bias, batch_first, bidir, proj, form, hx = case
    return (f"L{layers}-{'bias' if bias else 'nobias'}-{'bf' if batch_first else 'tf'}-"
            f"{'bi' if bidir else 'uni'}-p{proj}-{form}-{'hx' if hx else 'nohx'}")


def _sizes(index: int):
    """Odd sizes, rotated over the cases so every size meets every feature somewhere."""
    batch = ODD_SIZES[index % 3]
    input_size = ODD_SIZES[(index // 3) % 3]
    hidden = (5, 7, 33)[(index // 9) % 3]
    steps = (1, 6, 9)[(index // 2) % 3]
    return steps, batch, input_size, hidden


def _non_contiguous(shape, dtype):
    """A tensor of `shape` that is a strided slice of a larger one."""
    big = torch.randn(*shape[:-1], 2 * shape[-1] + 1, dtype=dtype)
    view = big[..., 1::2]
    assert view.shape == shape
    assert shape[-1] == 1 or view.numel() <= 1 or not view.is_contiguous()
    return view


def run_pair(ref, ours, case, index, dtype, sizes=None):
    layers, bias, batch_first, bidir, proj, form, hx_given = case
    steps, batch, input_size, hidden = sizes or _sizes(index)
    directions = 2 if bidir else 1
    out_hidden = proj or ref.hidden_size
    if form == "unbatched":
        x = _non_contiguous((steps, input_size), dtype).requires_grad_()
        state_shape = (layers * directions,)
    else:
        shape = (batch, steps, input_size) if batch_first else (steps, batch, input_size)
        x = _non_contiguous(shape, dtype).requires_grad_()
        state_shape = (layers * directions, batch)
    hx = None
    if hx_given:
        hx = (_non_contiguous((*state_shape, out_hidden), dtype).requires_grad_(),
              _non_contiguous((*state_shape, ref.hidden_size), dtype).requires_grad_())

    def forward(module):
        inp = x
        if form == "packed":
            lengths = torch.randint(1, steps + 1, (batch,))
            lengths[torch.randint(0, batch, ())] = steps  # the longest is the padded length
            inp = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
        return module(inp, hx)

    # Same lengths for both: draw them once from a fixed generator state.
    state = torch.get_rng_state()
    out_ref, (h_ref, c_ref) = forward(ref)
    torch.set_rng_state(state)
    out, (h, c) = forward(ours)

    if form == "packed":
        assert torch.equal(out.batch_sizes, out_ref.batch_sizes)
        assert torch.equal(out.sorted_indices, out_ref.sorted_indices)
        assert torch.equal(out.unsorted_indices, out_ref.unsorted_indices)
        out, out_ref = out.data, out_ref.data
    assert out.shape == out_ref.shape and h.shape == h_ref.shape and c.shape == c_ref.shape
    assert_close(out, out_ref, dtype, "output")
    assert_close(h, h_ref, dtype, "h_n")
    assert_close(c, c_ref, dtype, "c_n")

    weights = [torch.randn_like(t) for t in (out, h, c)]
    loss = lambda o, hh, cc: (o * weights[0]).sum() + (hh * weights[1]).sum() + (cc * weights[2]).sum()  # noqa: E731
    leaves = [x] + ([*hx] if hx else [])
    grads_ref = torch.autograd.grad(loss(out_ref, h_ref, c_ref), leaves + list(ref.parameters()))
    grads = torch.autograd.grad(loss(out, h, c), leaves + list(ours.parameters()))
    names = ["input"] + (["h_0", "c_0"] if hx else []) + [n for n, _ in ours.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert_close(g, g_ref, dtype, f"grad {name}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_parity_float64(case):
    index = CASES.index(case)
    layers, bias, batch_first, bidir, proj, *_ = case
    hidden = _sizes(index)[3]
    ref, ours = lstm_pair(_sizes(index)[2], hidden, num_layers=layers, bias=bias, batch_first=batch_first,
                          bidirectional=bidir, proj_size=min(proj, hidden - 1))
    run_pair(ref, ours, case, index, torch.float64)


@pytest.mark.parametrize("case", CASES[::7], ids=_case_id)
def test_parity_float32(case):
    index = CASES.index(case)
    layers, bias, batch_first, bidir, proj, *_ = case
    hidden = _sizes(index)[3]
    ref, ours = lstm_pair(_sizes(index)[2], hidden, num_layers=layers, bias=bias, batch_first=batch_first,
                          bidirectional=bidir, proj_size=min(proj, hidden - 1), dtype=torch.float32)
    run_pair(ref, ours, case, index, torch.float32)


# hidden_size 1 (no room for a projection): a sample of the cases without one, in both dtypes.
HIDDEN_ONE_CASES = [case for case in CASES if case[4] == 0][::5]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", HIDDEN_ONE_CASES, ids=_case_id)
def test_parity_hidden_size_one(case, dtype):
    index = CASES.index(case)
    layers, bias, batch_first, bidir, *_ = case
    steps, batch, input_size, _ = _sizes(index)
    ref, ours = lstm_pair(input_size, 1, num_layers=layers, bias=bias, batch_first=batch_first,
                          bidirectional=bidir, dtype=dtype)
    run_pair(ref, ours, case, index, dtype, sizes=(steps, batch, input_size, 1))


@pytest.mark.parametrize("hidden,batch,packed", [(128, 4, False), (256, 16, False), (96, 64, False),
                                                  (192, 40, True)])
def test_parity_float32_larger(hidden, batch, packed):
    """Sizes where the CPU kernels take their vectorised, multi-threaded fused recurrences (bidirectional
    and packed so that both directions' row bookkeeping runs with several threads)."""
    ref, ours = lstm_pair(hidden // 2, hidden, num_layers=2, bidirectional=packed, dtype=torch.float32,
                          init_scale=None)
    x = torch.randn(20, batch, hidden // 2, requires_grad=True)
    lengths = torch.randint(1, 21, (batch,))
    lengths[0] = 20
    feed = (lambda: pack_padded_sequence(x, lengths, enforce_sorted=False)) if packed else (lambda: x)
    out_ref, (h_ref, c_ref) = ref(feed())
    out, (h, c) = ours(feed())
    if packed:
        out_ref, out = out_ref.data, out.data
    assert_close(out, out_ref, torch.float32, "output")
    assert_close(h, h_ref, torch.float32, "h_n")
    assert_close(c, c_ref, torch.float32, "c_n")
    g = torch.randn_like(out)
    grads_ref = torch.autograd.grad((out_ref * g).sum() + h_ref.sum() + c_ref.sum(), [x, *ref.parameters()])
    grads = torch.autograd.grad((out * g).sum() + h.sum() + c.sum(), [x, *ours.parameters()])
    for a, b in zip(grads, grads_ref):
        assert_close(a, b, torch.float32, "grad")


def test_float32_against_float64_reference():
    """float32 error against a float64 run stays within what torch.nn.LSTM's own float32 error is."""
    ref64, ours64 = lstm_pair(24, 48, num_layers=2, bidirectional=True)
    ref32, ours32 = lstm_pair(24, 48, num_layers=2, bidirectional=True, dtype=torch.float32)
    ref32.load_state_dict(ref64.state_dict())
    ours32.load_state_dict(ref64.state_dict())
    x = torch.randn(30, 5, 24, dtype=torch.float64)
    with torch.no_grad():
        exact = ref64(x)[0]
        assert_error_within_torch(ours32(x.float())[0], ref32(x.float())[0], exact, "output")


def test_bfloat16_runs_and_is_close():
    ref, ours = lstm_pair(16, 32, dtype=torch.float32)
    x = torch.randn(10, 3, 16)
    with torch.no_grad():
        expected = ref(x)[0]
        ours_bf16 = ours.to(torch.bfloat16)
        out = ours_bf16(x.to(torch.bfloat16))[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)
