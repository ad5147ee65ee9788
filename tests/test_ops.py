"""The custom ops themselves: opcheck, gradcheck / gradgradcheck in float64, fake kernels, error paths."""

from __future__ import annotations

import pytest
import torch

import fused_lstm
from fused_lstm import ops, reference


def layer_args(steps=4, batch=3, input_size=5, hidden=4, proj=0, bidirectional=False, bias=True, packed=False,
               dtype=torch.float64, requires_grad=True, need_workspace=True):
    directions = 2 if bidirectional else 1
    out_hidden = proj or hidden
    weights = []
    for _ in range(directions):
        weights += [torch.randn(4 * hidden, input_size, dtype=dtype), torch.randn(4 * hidden, out_hidden, dtype=dtype)]
        if bias:
            weights += [torch.randn(4 * hidden, dtype=dtype), torch.randn(4 * hidden, dtype=dtype)]
        if proj:
            weights.append(torch.randn(proj, hidden, dtype=dtype))
    weights = [(w * 0.5).requires_grad_(requires_grad) for w in weights]
    if packed:
        batch_sizes = torch.tensor(sorted(torch.randint(1, batch + 1, (steps,)).tolist(), reverse=True))
        batch_sizes[0] = batch
        x = torch.randn(int(batch_sizes.sum()), input_size, dtype=dtype, requires_grad=requires_grad)
    else:
        batch_sizes = None
        x = torch.randn(steps, batch, input_size, dtype=dtype, requires_grad=requires_grad)
    h0 = torch.randn(directions, batch, out_hidden, dtype=dtype, requires_grad=requires_grad)
    c0 = torch.randn(directions, batch, hidden, dtype=dtype, requires_grad=requires_grad)
    return (x, batch_sizes, h0, c0, weights, bias, proj > 0, bidirectional, need_workspace)


VARIANTS = [
    dict(),
    dict(bidirectional=True),
    dict(proj=2, bidirectional=True),
    dict(packed=True),
    dict(packed=True, bidirectional=True, proj=3),
    dict(bias=False, batch=1),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_opcheck_forward(variant):
    torch.library.opcheck(torch.ops.fused_lstm.lstm_layer.default, layer_args(**variant))


@pytest.mark.parametrize("variant", VARIANTS[:3], ids=str)
def test_opcheck_forward_inference(variant):
    torch.library.opcheck(torch.ops.fused_lstm.lstm_layer.default,
                          layer_args(**variant, requires_grad=False, need_workspace=False))


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_opcheck_backward(variant):
    args = layer_args(**variant, requires_grad=False)
    x, batch_sizes, h0, c0, weights, bias, proj, bidir, _ = args
    output, h_n, c_n, gates, c_prev, h_prev = ops.lstm_layer(*args)
    backward_args = (torch.randn_like(output), torch.randn_like(h_n), torch.randn_like(c_n), x, batch_sizes, h0, c0,
                     weights, bias, proj, bidir, gates, c_prev, h_prev)
    torch.library.opcheck(torch.ops.fused_lstm.lstm_layer_backward.default, backward_args)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_matches_reference(variant):
    args = layer_args(**variant)
    output, h_n, c_n, *_ = ops.lstm_layer(*args)
    expected = reference.lstm_layer(*args[:-1])
    for got, want in zip((output, h_n, c_n), expected):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-10)


def _differentiable(variant):
    args = layer_args(**{**dict(steps=3, batch=2, input_size=3, hidden=3), **variant})
    x, batch_sizes, h0, c0, weights, bias, proj, bidir, ws = args

    def fn(x, h0, c0, *weights):
        out, h, c, *_ = ops.lstm_layer(x, batch_sizes, h0, c0, weights, bias, proj, bidir, ws)
        return out, h, c

    return fn, (x, h0, c0, *weights)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_gradcheck(variant):
    fn, inputs = _differentiable(variant)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS[:4], ids=str)
def test_gradgradcheck(variant):
    fn, inputs = _differentiable(variant)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_double_backward_through_module():
    """A gradient penalty (create_graph=True) on the module, against torch.nn.LSTM's."""
    from conftest import lstm_pair

    ref, ours = lstm_pair(3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    penalties = []
    for module in (ref, ours):
        out, _ = module(x)
        (gx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        penalties.append(torch.autograd.grad(gx.pow(2).sum(), list(module.parameters())))
    for a, b in zip(*penalties):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-9)


def test_backward_without_workspace_is_a_clear_error():
    args = layer_args(requires_grad=False, need_workspace=False)
    x, batch_sizes, h0, c0, weights, bias, proj, bidir, _ = args
    output, h_n, c_n, gates, c_prev, h_prev = ops.lstm_layer(*args)
    assert gates.numel() == 0 and c_prev.numel() == 0 and h_prev.numel() == 0
    with pytest.raises(RuntimeError, match="need_workspace=True"):
        ops.lstm_layer_backward(output, h_n, c_n, x, batch_sizes, h0, c0, weights, bias, proj, bidir, gates,
                                c_prev, h_prev)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.__setitem__(1, torch.tensor([3, 4, 1, 1])), "non-increasing"),
    (lambda a: a.__setitem__(1, torch.tensor([3, 2, 1, 1], dtype=torch.int32)), "int64 CPU"),
    (lambda a: a.__setitem__(2, a[2][:, :2]), "batch_sizes\\[0\\]"),
    (lambda a: a.__setitem__(3, a[3].float()), "c0 has dtype"),
    (lambda a: a.__setitem__(4, a[4][:-1]), "weight tensors"),
    (lambda a: a.__setitem__(0, a[0][:-1]), "rows but batch_sizes sum"),
    (lambda a: a.__setitem__(0, a[0][:, :2]), "w_ih of shape"),
    (lambda a: a.__setitem__(0, a[0].round().long()), "input must be a floating point tensor, got Long"),
])
def test_op_argument_errors(mutate, match):
    args = list(layer_args(packed=True, requires_grad=False))
    args[1] = torch.tensor([3, 2, 1, 1])
    args[0] = torch.randn(7, 5, dtype=torch.float64)
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        ops.lstm_layer(*args)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args = layer_args(packed=False, proj=2, bidirectional=True)
        output, h_n, c_n, gates, c_prev, h_prev = ops.lstm_layer(*args)
    assert output.shape == (4, 3, 4) and h_n.shape == (2, 3, 2) and c_n.shape == (2, 3, 4)
    assert gates.shape == (2, 12, 16) and c_prev.shape == (2, 12, 4) and h_prev.shape == (2, 12, 2)


def test_build_info():
    info = fused_lstm.build_info()
    assert set(info) >= {"cuda", "cuda_archs", "torch_version", "version", "cuda_available"}
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]


@pytest.mark.parametrize("recurrence", ["standard", "persistent"])
def test_opcheck_with_recurrence_argument(recurrence, cpu_kernels):
    args = layer_args(bidirectional=True, packed=True, dtype=torch.float32)
    torch.library.opcheck(torch.ops.fused_lstm.lstm_layer.default, (*args, recurrence))


def test_unknown_recurrence_is_an_error():
    with pytest.raises(RuntimeError, match="recurrence must be 'auto', 'standard' or 'persistent'"):
        ops.lstm_layer(*layer_args(), recurrence="sometimes")


# Float32 with rows enough for the CPU's fused backward recurrence (float64 takes the per-step loop), packed
# and both directions: without h0's gradient each direction skips a different step's products (csrc/
# lstm_layer.h, carried_rows).
FUSED_BACKWARD_VARIANT = dict(packed=True, bidirectional=True, steps=12, batch=6, hidden=20, dtype=torch.float32)


@pytest.mark.parametrize("variant", VARIANTS + [FUSED_BACKWARD_VARIANT], ids=str)
@pytest.mark.parametrize("need_input_grad,need_weight_grads,need_h0_grad", [
    (False, True, True), (True, False, True), (False, False, True), (True, True, False), (False, False, False)])
def test_backward_skips_what_is_not_needed(variant, need_input_grad, need_weight_grads, need_h0_grad):
    from conftest import assert_backward_skips_unneeded

    args = layer_args(**variant, requires_grad=False)
    x, batch_sizes, h0, c0, weights, bias, proj, bidir, _ = args
    output, h_n, c_n, gates, c_prev, h_prev = ops.lstm_layer(*args)
    backward_args = (torch.randn_like(output), torch.randn_like(h_n), torch.randn_like(c_n), x, batch_sizes, h0, c0,
                     weights, bias, proj, bidir, gates, c_prev, h_prev)
    assert_backward_skips_unneeded(torch.ops.fused_lstm.lstm_layer_backward.default, backward_args, need_input_grad,
                                   need_weight_grads, weight_grads=lambda results: results[3],
                                   need_h0_grad=need_h0_grad)


@pytest.mark.parametrize("frozen", ["weights", "input", "weights_and_input", "one_weight", "h0"])
def test_module_gradients_with_frozen_parts(frozen, monkeypatch):
    """Frozen weights, data inputs and a detached h0 (the autograd wrapper then skips those products)
    against torch."""
    from conftest import lstm_pair

    asked = []

    def recording_backward(*args):
        assert args[-1] == "auto"  # the forward call's recurrence
        asked.append(args[-4:-1])  # need_input_grad, need_weight_grads, need_h0_grad
        return real_backward(*args)

    real_backward = ops.lstm_layer_backward
    monkeypatch.setattr(ops, "lstm_layer_backward", recording_backward)
    ref, ours = lstm_pair(3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad="input" not in frozen)
    h0 = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=frozen != "h0")
    c0 = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=frozen == "h0")
    for module in (ref, ours):
        for name, p in module.named_parameters():
            p.requires_grad_(not ("weights" in frozen or (frozen == "one_weight" and name == "weight_hh_l1")))
    leaves = [t for t in (x, h0, c0) if t.requires_grad]
    results = []
    for module in (ref, ours):
        out, _ = module(x, (h0, c0))
        params = [p for p in module.parameters() if p.requires_grad]
        results.append(torch.autograd.grad(out.pow(2).sum(), leaves + params))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    # Layer 1 first (its input, layer 0's output, always needs a gradient here), then layer 0.
    weights_needed = frozen not in ("weights", "weights_and_input")
    h0_needed = frozen != "h0"
    assert asked == [(True, weights_needed, h0_needed), ("input" not in frozen, weights_needed, h0_needed)]
