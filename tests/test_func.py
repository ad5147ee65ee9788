"""torch.func on fused_lstm.LSTM / LSTMCell: grad, vjp, jacrev, vmap (which torch.nn.LSTM cannot do), per-sample
gradients, and forward mode (jvp, jacfwd, torch.autograd.forward_ad) with real tangents, all against
torch.nn.LSTM / nn.LSTMCell through torch.autograd.functional in float64."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.autograd import functional as AF
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vjp, vmap

from conftest import assert_close, cell_pair, lstm_pair

F64 = torch.float64
LAYER_CASES = [
    pytest.param(dict(), id="plain"),
    pytest.param(dict(num_layers=2, bidirectional=True), id="2layers-bidir"),
    pytest.param(dict(batch_first=True, bias=False), id="batch_first-nobias"),
]


def _input(batch_first: bool, steps=3, batch=2, features=3):
    return torch.randn((batch, steps, features) if batch_first else (steps, batch, features), dtype=F64)


def _output(module):
    return lambda x: module(x)[0]


@pytest.mark.parametrize("kwargs", LAYER_CASES)
def test_grad_over_parameters_and_input(kwargs):
    ref, ours = lstm_pair(3, 4, **kwargs)
    x = _input(kwargs.get("batch_first", False))
    params = {name: p.detach() for name, p in ours.named_parameters()}

    def loss(module):
        return lambda p, x: functional_call(module, p, (x,))[0].sin().sum()

    grads, grad_x = grad(loss(ours), argnums=(0, 1))(params, x)
    names = list(params)
    expected = AF.vjp(lambda x, *ps: loss(ref)(dict(zip(names, ps)), x), (x, *params.values()))[1]
    assert_close(grad_x, expected[0], what="input")
    for name, want in zip(names, expected[1:]):
        assert_close(grads[name], want, what=name)


@pytest.mark.parametrize("kwargs", LAYER_CASES)
def test_vjp_and_jacrev_match_torch(kwargs):
    ref, ours = lstm_pair(3, 4, **kwargs)
    x = _input(kwargs.get("batch_first", False))
    out, pullback = vjp(_output(ours), x)
    v = torch.randn_like(out)
    assert_close(pullback(v)[0], AF.vjp(_output(ref), x, v)[1], what="vjp")
    assert_close(jacrev(_output(ours))(x), AF.jacobian(_output(ref), x), what="jacrev")


def test_jacrev_over_weights_and_state():
    ref, ours = lstm_pair(3, 4)
    x = _input(False)
    h0, c0 = torch.randn(1, 2, 4, dtype=F64), torch.randn(1, 2, 4, dtype=F64)
    w = ours.weight_hh_l0.detach()

    def f(module):
        return lambda w, h0, c0: functional_call(module, {"weight_hh_l0": w}, (x, (h0, c0)))[1][1]

    got = jacrev(f(ours), argnums=(0, 1, 2))(w, h0, c0)
    want = AF.jacobian(f(ref), (w, h0, c0))
    for g, e, what in zip(got, want, ("w_hh", "h0", "c0")):
        assert_close(g, e, what=what)


@pytest.mark.parametrize("kwargs", LAYER_CASES)
def test_forward_mode_gives_real_tangents(kwargs):
    """jvp, jacfwd and forward_ad: the tangents torch computes, never zeros."""
    ref, ours = lstm_pair(3, 4, **kwargs)
    x = _input(kwargs.get("batch_first", False))
    t = torch.randn_like(x)
    want = AF.jvp(_output(ref), x, t)[1]
    assert want.abs().max() > 0
    assert_close(jvp(_output(ours), (x,), (t,))[1], want, what="jvp")
    assert_close(jacfwd(_output(ours))(x), AF.jacobian(_output(ref), x), what="jacfwd")
    with fwAD.dual_level():
        out, (h, c) = ours(fwAD.make_dual(x, t))
        tangent = fwAD.unpack_dual(out).tangent
    assert tangent is not None
    assert_close(tangent, want, what="forward_ad")


def test_forward_mode_through_weights_and_state():
    ref, ours = lstm_pair(3, 4, num_layers=2)
    x = _input(False)
    h0, c0 = torch.randn(2, 2, 4, dtype=F64), torch.randn(2, 2, 4, dtype=F64)
    w = ours.weight_ih_l1.detach()

    def f(module):
        return lambda w, h0, c0: functional_call(module, {"weight_ih_l1": w}, (x, (h0, c0)))[0]

    tangents = (torch.randn_like(w), torch.randn_like(h0), torch.randn_like(c0))
    got = jvp(f(ours), (w, h0, c0), tangents)[1]
    assert_close(got, AF.jvp(f(ref), (w, h0, c0), tangents)[1], what="jvp")


@pytest.mark.parametrize("kwargs", LAYER_CASES)
@pytest.mark.parametrize("with_hx", [False, True])
def test_vmap_matches_a_loop_of_torch_calls(kwargs, with_hx):
    ref, ours = lstm_pair(3, 4, **kwargs)
    states = (2 if kwargs.get("bidirectional") else 1) * kwargs.get("num_layers", 1)
    xs = torch.stack([_input(kwargs.get("batch_first", False)) for _ in range(5)])
    hs = torch.randn(5, states, 2, 4, dtype=F64)
    cs = torch.randn(5, states, 2, 4, dtype=F64)
    if with_hx:
        out, (h, c) = vmap(ours)(xs, (hs, cs))
        expected = [ref(x, (hh, cc)) for x, hh, cc in zip(xs, hs, cs)]
    else:
        out, (h, c) = vmap(ours)(xs)
        expected = [ref(x) for x in xs]
    assert_close(out, torch.stack([e[0] for e in expected]), what="output")
    assert_close(h, torch.stack([e[1][0] for e in expected]), what="h_n")
    assert_close(c, torch.stack([e[1][1] for e in expected]), what="c_n")


def test_vmap_over_unbatched_sequences_and_in_dims():
    """vmap over unbatched (L, H_in) sequences, and with the vmapped dimension not first."""
    ref, ours = lstm_pair(3, 4)
    xs = torch.randn(6, 5, 3, dtype=F64)  # 6 sequences of length 5
    out, (h, c) = vmap(ours)(xs)
    for i in range(6):
        e_out, (e_h, e_c) = ref(xs[i])
        assert_close(out[i], e_out, what="output")
        assert_close(h[i], e_h, what="h_n")
    moved = xs.movedim(0, 2).contiguous()  # [5, 3, 6]: the vmapped dimension last
    assert_close(vmap(ours, in_dims=2)(moved)[0], out, what="in_dims=2")


def test_per_sample_gradients():
    """vmap(grad(loss)) over the samples of a batch: each sample's own weight gradients."""
    ref, ours = lstm_pair(3, 4, batch_first=True, bidirectional=True)
    params = {name: p.detach() for name, p in ours.named_parameters()}
    xs = torch.randn(4, 5, 3, dtype=F64)  # 4 unbatched samples of 5 steps
    targets = torch.randn(4, 5, 8, dtype=F64)

    def loss(p, x, y):
        out, _ = functional_call(ours, p, (x,))
        return (out - y).pow(2).mean()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, targets)
    for i in range(4):
        ref.zero_grad()
        (ref(xs[i])[0] - targets[i]).pow(2).mean().backward()
        for name, p in ref.named_parameters():
            assert_close(per_sample[name][i], p.grad, what=f"sample {i} {name}")


def test_vmap_over_an_ensemble_of_weights():
    """Batched weights (torch.func.stack_module_state): one call per member, each its own weights."""
    pairs = [lstm_pair(3, 4) for _ in range(3)]
    params, _ = torch.func.stack_module_state([ours for _, ours in pairs])
    x = _input(False)
    out = vmap(lambda p: functional_call(pairs[0][1], p, (x,))[0])(params)
    for i, (ref, _) in enumerate(pairs):
        assert_close(out[i], ref(x)[0], what=f"member {i}")


# --- LSTMCell -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_cell_grad_vjp_jacrev(bias):
    ref, ours = cell_pair(3, 4, bias=bias)
    x = torch.randn(2, 3, dtype=F64)
    hx = (torch.randn(2, 4, dtype=F64), torch.randn(2, 4, dtype=F64))
    params = {name: p.detach() for name, p in ours.named_parameters()}

    def loss(module):
        return lambda p, x, h, c: sum(t.sin().sum() for t in functional_call(module, p, (x, (h, c))))

    got = grad(loss(ours), argnums=(0, 1, 2, 3))(params, x, *hx)
    names = list(params)
    want = AF.vjp(lambda x, h, c, *ps: loss(ref)(dict(zip(names, ps)), x, h, c), (x, *hx, *params.values()))[1]
    for g, e, what in zip(got[1:], want[:3], ("input", "hx", "cx")):
        assert_close(g, e, what=what)
    for name, e in zip(names, want[3:]):
        assert_close(got[0][name], e, what=name)
    assert_close(jacrev(lambda x: ours(x, hx)[1])(x), AF.jacobian(lambda x: ref(x, hx)[1], x), what="jacrev")


def test_cell_forward_mode():
    ref, ours = cell_pair(3, 4)
    x = torch.randn(2, 3, dtype=F64)
    hx = (torch.randn(2, 4, dtype=F64), torch.randn(2, 4, dtype=F64))
    t = torch.randn_like(x)
    want = AF.jvp(lambda x: ref(x, hx)[0], x, t)[1]
    assert want.abs().max() > 0
    assert_close(jvp(lambda x: ours(x, hx)[0], (x,), (t,))[1], want, what="jvp")
    assert_close(jacfwd(lambda x: ours(x, hx)[0])(x), AF.jacobian(lambda x: ref(x, hx)[0], x), what="jacfwd")
    with fwAD.dual_level():
        h, _ = ours(fwAD.make_dual(x, t), hx)
        assert_close(fwAD.unpack_dual(h).tangent, want, what="forward_ad")


def test_cell_vmap_and_per_sample_gradients():
    ref, ours = cell_pair(3, 4)
    xs = torch.randn(5, 2, 3, dtype=F64)
    h, c = vmap(ours)(xs)
    for i in range(5):
        e_h, e_c = ref(xs[i])
        assert_close(h[i], e_h, what="h")
        assert_close(c[i], e_c, what="c")
    params = {name: p.detach() for name, p in ours.named_parameters()}
    singles = torch.randn(5, 3, dtype=F64)  # 1-D (unbatched) inputs, one per sample
    per_sample = vmap(grad(lambda p, x: functional_call(ours, p, (x,))[0].sum()), in_dims=(None, 0))(params, singles)
    for i in range(5):
        ref.zero_grad()
        ref(singles[i])[0].sum().backward()
        for name, p in ref.named_parameters():
            assert_close(per_sample[name][i], p.grad, what=f"sample {i} {name}")


def test_hessian_nests_the_transforms():
    """torch.func.hessian (jacfwd over jacrev) and jacrev over jacrev: the transforms nest."""
    ref, ours = lstm_pair(2, 3, bidirectional=True)
    x = torch.randn(3, 1, 2, dtype=F64)

    def loss(module):
        return lambda x: module(x)[0].sin().sum()

    expected = AF.hessian(loss(ref), x)
    assert_close(torch.func.hessian(loss(ours))(x), expected, what="hessian")
    assert_close(jacrev(jacrev(loss(ours)))(x), expected, what="jacrev(jacrev)")
    # per sample, the gradient of a gradient norm: vmap over grad over grad
    xs = torch.randn(3, 3, 1, 2, dtype=F64)
    per_sample = vmap(grad(lambda x: grad(loss(ours))(x).pow(2).sum()))(xs)
    for i in range(3):
        xi = xs[i].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(ref)(xi), xi, create_graph=True)
        (want,) = torch.autograd.grad(g.pow(2).sum(), xi)
        assert_close(per_sample[i], want, what=f"sample {i}")


@pytest.mark.parametrize("bias", [True, False])
def test_cell_hessian_and_per_sample_hessian_vector(bias):
    ref, ours = cell_pair(3, 4, bias=bias)
    x = torch.randn(2, 3, dtype=F64)
    hx = (torch.randn(2, 4, dtype=F64), torch.randn(2, 4, dtype=F64))

    def loss(module):
        return lambda x, h: sum(t.sin().sum() for t in module(x, (h, hx[1])))

    expected = AF.hessian(loss(ref), (x, hx[0]))
    got = torch.func.hessian(loss(ours), argnums=(0, 1))(x, hx[0])
    for i in range(2):
        for j in range(2):
            assert_close(got[i][j], expected[i][j], what=f"hessian[{i}][{j}]")
    # grad of a gradient norm per sample: vmap over grad(grad-norm)
    xs = torch.randn(3, 2, 3, dtype=F64)
    per_sample = vmap(grad(lambda x: grad(loss(ours))(x, hx[0]).pow(2).sum()))(xs)
    for i in range(3):
        xi = xs[i].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(ref)(xi, hx[0]), xi, create_graph=True)
        (want,) = torch.autograd.grad(g.pow(2).sum(), xi)
        assert_close(per_sample[i], want, what=f"sample {i}")
