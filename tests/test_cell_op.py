"""The single-step ops behind fused_lstm.LSTMCell: ``fused_lstm::lstm_cell`` and ``lstm_cell_backward``.

opcheck, gradcheck / gradgradcheck in float64, the pure PyTorch cell as the oracle, float32 accuracy
against a float64 run relative to torch.nn.LSTMCell's, both CPU backward forms (the fused one-step
recurrence for float32 with enough rows, the pointwise step + product otherwise), and argument errors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fused_lstm
from conftest import (VECTOR_KERNELS, assert_backward_skips_unneeded, assert_close, assert_error_within_torch,
                      cell_pair, selected_cpu_kernels)
from fused_lstm import ops, reference
from gpu_harness import relayout

LIMITS = fused_lstm._C.cpu_kernel_limits()
MIN_RECURRENCE_ROWS = LIMITS["min_recurrence_rows"]  # float32 backward: a fused one-step recurrence from here
PACKED_DEPTH = LIMITS["min_packed_depth"]  # weight gradients (k = batch) packed from here, ATen below
IN_PLACE_ROWS = LIMITS["max_in_place_rows"]  # float32 forward products read W in place below this


def cell_args(batch=3, input_size=5, hidden=4, bias=True, dtype=torch.float64, requires_grad=True):
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_(requires_grad)

    biases = (randn(4 * hidden, scale=0.5), randn(4 * hidden, scale=0.5)) if bias else (None, None)
    return (randn(batch, input_size), randn(batch, hidden), randn(batch, hidden),
            randn(4 * hidden, input_size, scale=0.5), randn(4 * hidden, hidden, scale=0.5), *biases)


VARIANTS = [dict(), dict(bias=False), dict(batch=1, input_size=1, hidden=1), dict(batch=MIN_RECURRENCE_ROWS + 1)]


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_opcheck_forward(variant):
    torch.library.opcheck(torch.ops.fused_lstm.lstm_cell.default, cell_args(**variant))


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize("grads", ["both", "h_only", "c_only"])
def test_opcheck_backward(variant, grads):
    args = cell_args(**variant, requires_grad=False)
    h, c, gates = ops.lstm_cell(*args)
    grad_h = torch.randn_like(h) if grads != "c_only" else None
    grad_c = torch.randn_like(c) if grads != "h_only" else None
    torch.library.opcheck(torch.ops.fused_lstm.lstm_cell_backward.default,
                          (grad_h, grad_c, *args[:5], gates, variant.get("bias", True)))


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_matches_reference_and_gates(variant):
    args = cell_args(**variant)
    h, c, gates = ops.lstm_cell(*args)
    h_ref, c_ref = reference.lstm_cell(*args)
    torch.testing.assert_close(h, h_ref, atol=1e-12, rtol=1e-11)
    torch.testing.assert_close(c, c_ref, atol=1e-12, rtol=1e-11)
    x, hx, cx, w_ih, w_hh, b_ih, b_hh = args
    pre = x @ w_ih.t() + hx @ w_hh.t() + (0 if b_ih is None else b_ih + b_hh)
    i, f, g, o = pre.chunk(4, dim=1)
    expected = torch.cat([i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()], dim=1)
    torch.testing.assert_close(gates, expected, atol=1e-12, rtol=1e-11)
    assert not gates.requires_grad and h.requires_grad and c.requires_grad


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize("grads", ["both", "h_only", "c_only"])
def test_gradients_match_reference(variant, grads):
    args = cell_args(**variant)
    present = [a for a in args if a is not None]
    h, c, _ = ops.lstm_cell(*args)
    h_ref, c_ref = reference.lstm_cell(*args)
    # Only the used outputs enter the loss, so the unused one's gradient reaches the backward as None.
    weight_h, weight_c = torch.randn_like(h), torch.randn_like(c)
    terms = {"both": (1, 1), "h_only": (1, 0), "c_only": (0, 1)}[grads]
    loss = sum(((out * w).sum() for out, w, used in zip((h, c), (weight_h, weight_c), terms) if used))
    loss_ref = sum(((out * w).sum() for out, w, used in zip((h_ref, c_ref), (weight_h, weight_c), terms) if used))
    got = torch.autograd.grad(loss, present)
    want = torch.autograd.grad(loss_ref, present)
    for index, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, what=f"gradient {index}")


def _differentiable(variant):
    args = cell_args(**{**dict(batch=2, input_size=3, hidden=3), **variant})
    bias = args[5] is not None

    def fn(x, hx, cx, w_ih, w_hh, *b):
        h, c, _ = ops.lstm_cell(x, hx, cx, w_ih, w_hh, *(b if bias else (None, None)))
        return h, c

    return fn, tuple(a for a in args if a is not None)


@pytest.mark.parametrize("variant", [dict(), dict(bias=False)], ids=str)
def test_gradcheck_and_gradgradcheck(variant):
    fn, inputs = _differentiable(variant)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("batch", sorted({1, PACKED_DEPTH - 1, PACKED_DEPTH, MIN_RECURRENCE_ROWS - 1,
                                           MIN_RECURRENCE_ROWS, 40, IN_PLACE_ROWS - 1, IN_PLACE_ROWS}))
@pytest.mark.parametrize("hidden", [5, 70])
def test_float32_accuracy_within_torch(batch, hidden, cpu_kernels):
    """Forward and every gradient in float32 against a float64 run, relative to torch.nn.LSTMCell's own
    float32 error, with each CPU kernel build; batches on both sides of the fused one-step backward
    recurrence, of packed weight gradients and of forward products with packed weights. Errors are pooled
    over 8 random cells: a single small cell has too few elements for an error statistic (at batch 1,
    H = 5, one draw in 150 put our RMS error over twice torch's)."""
    pooled = {"exact": [], "torch": [], "ours": []}
    for _ in range(8):
        ref64, _ = cell_pair(11, hidden)
        x = torch.randn(batch, 11, dtype=torch.float64)
        hx = tuple(torch.randn(batch, hidden, dtype=torch.float64) for _ in "hc")
        weights = (torch.randn(batch, hidden, dtype=torch.float64), torch.randn(batch, hidden, dtype=torch.float64))
        for name, cls, dtype in [("exact", nn.LSTMCell, torch.float64), ("torch", nn.LSTMCell, torch.float32),
                                 ("ours", fused_lstm.LSTMCell, torch.float32)]:
            cell = cls(11, hidden, dtype=dtype)
            cell.load_state_dict(ref64.state_dict())
            leaves = [x.to(dtype).requires_grad_(), *(s.to(dtype).requires_grad_() for s in hx)]
            h, c = cell(leaves[0], tuple(leaves[1:]))
            loss = (h * weights[0].to(dtype)).sum() + (c * weights[1].to(dtype)).sum()
            results = [h, c, *torch.autograd.grad(loss, leaves + list(cell.parameters()))]
            pooled[name].append([t.detach().double().flatten() for t in results])
    for index in range(len(pooled["exact"][0])):
        mine, theirs, exact = (torch.cat([draw[index] for draw in pooled[name]]) for name in ("ours", "torch", "exact"))
        assert_error_within_torch(mine, theirs, exact, what=f"result {index}")


def test_empty_batch():
    args = cell_args(batch=0)
    h, c, gates = ops.lstm_cell(*args)
    assert h.shape == (0, 4) and c.shape == (0, 4) and gates.shape == (0, 16)
    grads = torch.autograd.grad(h.sum() + c.sum(), [a for a in args if a is not None])
    assert [tuple(g.shape) for g in grads] == [tuple(a.shape) for a in args]
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_on_cpu_matches_torch(dtype):
    ref, ours = cell_pair(6, 8, dtype=dtype)
    x = torch.randn(5, 6, dtype=dtype)
    hx = (torch.randn(5, 8, dtype=dtype), torch.randn(5, 8, dtype=dtype))
    for got, want in zip(ours(x, hx), ref(x, hx)):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_pointwise_is_the_same_in_every_kernel_build(dtype):
    """bfloat16 and float16 pointwise steps run the float32 code on float32 copies, chunk by chunk (H=300: chunks
    of 128, 128 and 44 units): every kernel build (AVX-512, AVX2, and the baseline the ATen setting runs) gives
    the same bits, forward and backward, and a NaN in one input row stays NaN in that row's results."""
    torch.manual_seed(0)
    args = [a.detach().to(dtype) for a in cell_args(batch=3, input_size=7, hidden=300, dtype=torch.float32)]
    args[0][1, 2] = float("nan")
    grad_h, grad_c = torch.randn(3, 300).to(dtype), torch.randn(3, 300).to(dtype)
    runs = []
    for kernels in VECTOR_KERNELS + ["aten"]:
        with selected_cpu_kernels(float32=kernels):
            h, c, gates = torch.ops.fused_lstm.lstm_cell(*args)
            grads = torch.ops.fused_lstm.lstm_cell_backward(grad_h, grad_c, *args[:5], gates, True)
        runs.append([h, c, gates, *grads[:3]])
    assert len(runs) >= 2
    names = ["h", "c", "gates", "grad_input", "grad_hx", "grad_cx"]
    for name, value in zip(names, runs[0]):
        assert torch.isnan(value[1]).all() and not torch.isnan(value[[0, 2]]).any(), name
    for other in runs[1:]:
        for name, a, b in zip(names, runs[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_state_rounds_as_torch(dtype, cpu_kernels):
    """With saturated gates (pre-activations +-100: i = f = o = 1, g = +-1 exactly) c' = c +- 1 is computed in
    float32 and rounded to the storage type: it must equal torch's own rounding of the same sum, ties included,
    in every kernel build (H=300 spans three float32 chunks)."""
    N, H = 4, 300
    c = torch.randn(N, H).to(dtype)
    sign = torch.randint(0, 2, (H,)).float() * 2 - 1
    b_ih = torch.cat([torch.full((H,), 100.0), torch.full((H,), 100.0), 100 * sign, torch.full((H,), 100.0)])
    zeros = lambda *shape: torch.zeros(*shape, dtype=dtype)  # noqa: E731
    _, c_next, _ = torch.ops.fused_lstm.lstm_cell(torch.randn(N, 3).to(dtype), zeros(N, H), c, zeros(4 * H, 3),
                                                  zeros(4 * H, H), b_ih.to(dtype), zeros(4 * H))
    assert torch.equal(c_next, (c.float() + sign).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_noncontiguous_arguments(dtype):
    """Strided slices and transposed layouts of every matrix, forward and every gradient."""
    args = cell_args(batch=5, dtype=dtype, requires_grad=False)
    x, hx, cx, w_ih, w_hh, b_ih, b_hh = args
    strided = [relayout(x, "strided_slice"), relayout(hx, "transposed_view"), relayout(cx, "strided_slice"),
               relayout(w_ih, "strided_slice"), relayout(w_hh, "transposed_view"), relayout(b_ih, "strided_slice"),
               b_hh]
    assert not any(t.is_contiguous() for t in strided[:-1])
    leaves = [t.requires_grad_() for t in strided]
    expected = [t.detach().clone().requires_grad_() for t in args]
    h, c, _ = ops.lstm_cell(*leaves)
    h_ref, c_ref = reference.lstm_cell(*expected)
    tolerance = dict(atol=1e-12, rtol=1e-11) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    for got, want in zip((h, c), (h_ref, c_ref)):
        torch.testing.assert_close(got, want, **tolerance)
    weight = torch.randn_like(h)
    grads = torch.autograd.grad((h * weight).sum() + c.sum(), leaves)
    grads_ref = torch.autograd.grad((h_ref * weight).sum() + c_ref.sum(), expected)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.__setitem__(0, a[0][:, :2]), "w_ih of shape \\[16, 2\\]"),
    (lambda a: a.__setitem__(1, a[1][:2]), "hx of shape \\[3, 4\\]"),
    (lambda a: a.__setitem__(2, a[2].float()), "cx has dtype Float but input has dtype Double"),
    (lambda a: a.__setitem__(4, a[4][:, :3]), "w_hh of shape \\[16, 4\\]"),
    (lambda a: a.__setitem__(5, a[5][:7]), "b_ih of shape \\[16\\]"),
    (lambda a: a.__setitem__(6, None), "b_ih and b_hh must be given together"),
    (lambda a: a.__setitem__(0, a[0][0]), "expected cell input \\[N, I\\], got a 1-D tensor"),
    (lambda a: a.__setitem__(0, a[0].long()), "input must be a floating point tensor"),
])
def test_op_argument_errors(mutate, match):
    args = list(cell_args(requires_grad=False))
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        ops.lstm_cell(*args)


def test_backward_argument_errors():
    args = cell_args(requires_grad=False)
    h, c, gates = ops.lstm_cell(*args)
    with pytest.raises(RuntimeError, match="gates of shape \\[3, 16\\]"):
        ops.lstm_cell_backward(h, c, *args[:5], gates[:, :8], True)
    with pytest.raises(RuntimeError, match="grad_h of shape \\[3, 4\\]"):
        ops.lstm_cell_backward(h[:1], c, *args[:5], gates, True)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args = cell_args(batch=6, input_size=3, hidden=5)
        h, c, gates = ops.lstm_cell(*args)
        grads = ops.lstm_cell_backward(h, c, *args[:5], gates, True)
    assert h.shape == (6, 5) and c.shape == (6, 5) and gates.shape == (6, 20)
    assert [tuple(g.shape) for g in grads] == [(6, 3), (6, 5), (6, 5), (20, 3), (20, 5), (20,), (20,)]


def test_module_uses_the_cell_op_and_named_paths_the_layer_op(cpu_kernels):
    cell = fused_lstm.LSTMCell(3, 4)
    with torch.no_grad():
        h, _ = cell(torch.randn(2, 3))
    assert fused_lstm.last_path() == "cpu:per-step"
    fused_lstm.LSTM(3, 4)(torch.randn(5, 20, 3))  # leaves another path behind
    assert fused_lstm.last_path() == "cpu:fused-recurrence"
    cell(torch.randn(2, 3))
    assert fused_lstm.last_path() == "cpu:per-step"
    assert h.grad_fn is None
    h, c = cell(torch.randn(2, 3, requires_grad=True))
    assert "lstm_cell" in type(h.grad_fn).__name__


@pytest.mark.parametrize("batch", [1, 40])
def test_bitwise_deterministic(batch):
    args = cell_args(batch=batch, input_size=37, hidden=70, dtype=torch.float32)
    runs = []
    for _ in range(2):
        h, c, _ = ops.lstm_cell(*args)
        runs.append([h, c, *torch.autograd.grad(h.sum() + 2 * c.sum(), list(args))])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("need_input_grad,need_weight_grads", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("bias", [True, False])
def test_backward_skips_what_is_not_needed(need_input_grad, need_weight_grads, bias):
    args = cell_args(bias=bias, requires_grad=False)
    h, c, gates = ops.lstm_cell(*args)
    backward_args = (torch.randn_like(h), torch.randn_like(c), *args[:5], gates, bias)
    assert_backward_skips_unneeded(torch.ops.fused_lstm.lstm_cell_backward.default, backward_args, need_input_grad,
                                   need_weight_grads, weight_grads=lambda results: results[3:])


@pytest.mark.parametrize("frozen", ["weights", "input", "weights_and_input"])
def test_module_gradients_with_frozen_parts(frozen):
    ref, ours = cell_pair(3, 4)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad="input" not in frozen)
    hx = (torch.randn(2, 4, dtype=torch.float64, requires_grad=True), torch.randn(2, 4, dtype=torch.float64))
    results = []
    for module in (ref, ours):
        module.requires_grad_("weights" not in frozen)
        h, c = module(x, hx)
        leaves = [t for t in (x, hx[0]) if t.requires_grad] + [p for p in module.parameters() if p.requires_grad]
        results.append(torch.autograd.grad(h.pow(2).sum() + c.sum(), leaves))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-11)
