"""fused_lstm.LSTM / LSTMCell as drop-ins: constructor, parameters, state_dict, serialisation, input
validation (same exception type and message as torch where torch has one)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_lstm
from conftest import TOLERANCE, cell_pair, lstm_pair


def raises_like_torch(make_call):
    """make_call(module_class) -> zero-arg callable. Both torch and fused_lstm must raise, alike."""
    with pytest.raises(Exception) as expected:
        make_call(nn.LSTM)()
    with pytest.raises(type(expected.value)) as got:
        make_call(fused_lstm.LSTM)()
    assert str(got.value) == str(expected.value)


CONFIGS = [
    ((3, 5), {}),
    ((3, 5, 2), dict(bias=False, batch_first=True)),
    ((4, 6), dict(num_layers=3, dropout=0.25, bidirectional=True, proj_size=2)),
    ((4, 6, 2, True, True, 0.0, True, 3), {}),  # every argument positional
]


@pytest.mark.parametrize("args,kwargs", CONFIGS)
def test_same_parameters_and_initialisation(args, kwargs):
    torch.manual_seed(1234)
    ref = nn.LSTM(*args, **kwargs)
    torch.manual_seed(1234)
    ours = fused_lstm.LSTM(*args, **kwargs)
    assert [(n, p.shape) for n, p in ref.named_parameters()] == [(n, p.shape) for n, p in ours.named_parameters()]
    for (_, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters()):
        assert torch.equal(a, b)
    assert [[p.shape for p in layer] for layer in ref.all_weights] == [[p.shape for p in l] for l in ours.all_weights]
    assert repr(ours) == "fused_lstm." + repr(ref)  # says whose module it is
    assert not isinstance(ours, nn.LSTM) and isinstance(ours, nn.RNNBase)


@pytest.mark.parametrize("kwargs", [
    dict(input_size=3, hidden_size=0), dict(input_size=0, hidden_size=3), dict(input_size=3, hidden_size=4.5),
    dict(input_size=3, hidden_size=4, num_layers=0), dict(input_size=3, hidden_size=4, dropout=1.5),
    dict(input_size=3, hidden_size=4, dropout=True), dict(input_size=3, hidden_size=4, proj_size=4),
    dict(input_size=3, hidden_size=4, proj_size=-1), dict(input_size=3, hidden_size=4, num_layers=1.0),
    dict(input_size=3, hidden_size=4, bias="yes"), dict(input_size=3, hidden_size=4, batch_first="yes"),
    dict(input_size=3.5, hidden_size=4), dict(input_size="3", hidden_size=4),
    dict(input_size=3, hidden_size=4, dropout=-0.1),
])
def test_constructor_errors_match_torch(kwargs):
    raises_like_torch(lambda cls: lambda: cls(**kwargs))


def test_dropout_warning_matches_torch():
    with pytest.warns(UserWarning, match="dropout option adds dropout after all but last recurrent layer"):
        fused_lstm.LSTM(3, 4, dropout=0.5)


@pytest.mark.parametrize("args,kwargs", CONFIGS)
def test_state_dict_round_trips_strictly(args, kwargs):
    ref, ours = nn.LSTM(*args, **kwargs), fused_lstm.LSTM(*args, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    back = nn.LSTM(*args, **kwargs)
    back.load_state_dict(ours.state_dict(), strict=True)
    for a, b in zip(ref.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)


def _same_output(a, b, x):
    torch.testing.assert_close(a(x)[0], b(x)[0], atol=0, rtol=0)


def _round_trips(module):
    """The module back from pickle, deepcopy and torch.save / torch.load."""
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return [pickle.loads(pickle.dumps(module)), copy.deepcopy(module), torch.load(buffer, weights_only=False)]


def test_pickle_deepcopy_and_torch_save():
    _, ours = lstm_pair(3, 5, num_layers=2, bidirectional=True)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    for restored in _round_trips(ours):
        assert type(restored) is fused_lstm.LSTM and restored is not ours
        _same_output(ours, restored, x)


def test_cell_pickle_deepcopy_and_torch_save():
    _, ours = cell_pair(3, 5)
    x = torch.randn(2, 3, dtype=torch.float64)
    for restored in _round_trips(ours):
        assert type(restored) is fused_lstm.LSTMCell and restored is not ours
        for a, b in zip(ours(x), restored(x)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_functional_call_uses_the_given_parameters():
    ref, ours = lstm_pair(3, 5)
    other = {n: torch.randn_like(p) for n, p in ours.named_parameters()}
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    got = torch.func.functional_call(ours, other, (x,))[0]
    expected = torch.func.functional_call(ref, other, (x,))[0]
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, ours(x)[0])


def test_dtype_conversions_and_flatten_parameters():
    ref, ours = lstm_pair(3, 5, num_layers=2, dtype=torch.float32)
    ours.flatten_parameters()
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(ours.double()(x.double())[0], ref.double()(x.double())[0])
    assert all(p.dtype == torch.float64 for p in ours.parameters())
    assert all(p.dtype == torch.float32 for p in ours.to(torch.float32).parameters())
    half = copy.deepcopy(ours).half()
    assert all(p.dtype == torch.float16 for p in half.parameters())
    with torch.no_grad():
        out = half(x.half())[0]
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# ---- forward validation ---------------------------------------------------------------------------------

def _forward_error_case(x, hx=None, **kwargs):
    def make(cls):
        torch.manual_seed(0)
        module = cls(3, 4, **kwargs)
        return lambda: module(x, hx)
    return make


@pytest.mark.parametrize("name,x,hx", [
    ("4-D input", torch.randn(2, 2, 3, 1), None),
    ("1-D input", torch.randn(3), None),
    ("wrong input size", torch.randn(5, 2, 2), None),
    ("float64 input", torch.randn(5, 2, 3, dtype=torch.float64), None),
    ("integer input", torch.randint(0, 3, (5, 2, 3)), None),
    ("sequence length 0", torch.randn(0, 2, 3), None),
    ("h0 batch", torch.randn(5, 2, 3), (torch.randn(1, 3, 4), torch.randn(1, 2, 4))),
    ("c0 batch", torch.randn(5, 2, 3), (torch.randn(1, 2, 4), torch.randn(1, 3, 4))),
    ("h0 size", torch.randn(5, 2, 3), (torch.randn(1, 2, 5), torch.randn(1, 2, 4))),
    ("hx 2-D for batched", torch.randn(5, 2, 3), (torch.randn(2, 4), torch.randn(2, 4))),
    ("hx 3-D for unbatched", torch.randn(5, 3), (torch.randn(1, 1, 4), torch.randn(1, 1, 4))),
    ("hx of one tensor", torch.randn(5, 2, 3), (torch.randn(1, 2, 4),)),
    ("c0 size", torch.randn(5, 2, 3), (torch.randn(1, 2, 4), torch.randn(1, 2, 5))),
    ("hx layers", torch.randn(5, 2, 3), (torch.randn(2, 2, 4), torch.randn(2, 2, 4))),
])
def test_forward_errors_match_torch(name, x, hx):
    raises_like_torch(_forward_error_case(x, hx))


@pytest.mark.parametrize("kwargs", [dict(num_layers=2), dict(bidirectional=True), dict(proj_size=2)])
def test_hx_shape_errors_match_torch_for_stacks_directions_and_projections(kwargs):
    """hx sized for a plain one-layer LSTM, given to one with more layers, two directions or a projection."""
    x = torch.randn(5, 2, 3)
    raises_like_torch(_forward_error_case(x, (torch.randn(1, 2, 4), torch.randn(1, 2, 4)), **kwargs))


def test_forward_errors_match_torch_batch_first():
    raises_like_torch(_forward_error_case(torch.randn(2, 0, 3), batch_first=True))
    raises_like_torch(_forward_error_case(torch.randn(2, 5, 7), batch_first=True))


def test_packed_input_with_wrong_feature_size_is_a_clear_error():
    packed = pack_padded_sequence(torch.randn(5, 2, 2), torch.tensor([5, 3]))
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size. Expected 3, got 2"):
        fused_lstm.LSTM(3, 4)(packed)


def test_hidden_state_dtype_mismatch_is_a_clear_error():
    x = torch.randn(5, 2, 3)
    with pytest.raises(RuntimeError, match="Expected h_0 to have dtype torch.float32 like the input, got torch.float64"):
        fused_lstm.LSTM(3, 4)(x, (torch.randn(1, 2, 4, dtype=torch.float64), torch.randn(1, 2, 4)))


def test_cell_state_dtype_mismatch_is_a_clear_error():
    # torch.nn.LSTM fails here inside oneDNN ("get_mkldnn_dtype: unsupported data type").
    x = torch.randn(5, 2, 3)
    with pytest.raises(RuntimeError, match="Expected c_0 to have dtype torch.float32 like the input, got torch.float64"):
        fused_lstm.LSTM(3, 4)(x, (torch.randn(1, 2, 4), torch.randn(1, 2, 4, dtype=torch.float64)))


@pytest.mark.parametrize("name,hx", [
    ("h0 batch", (torch.randn(1, 3, 4), torch.randn(1, 3, 4))),
    ("h0 size", (torch.randn(1, 2, 5), torch.randn(1, 2, 4))),
    ("hx 2-D", (torch.randn(2, 2), torch.randn(2, 4))),
])
def test_packed_input_with_wrong_hx_shape_is_a_clear_error(name, hx):
    # torch.nn.LSTM's messages here come from deep inside (a broadcast, "an incorrect number of RNN
    # parameters", an IndexError); fused_lstm names the expected shape.
    packed = pack_padded_sequence(torch.randn(5, 2, 3), torch.tensor([5, 3]))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 2, 4\), got \["):
        fused_lstm.LSTM(3, 4)(packed, hx)


@pytest.mark.parametrize("which", ["h_0", "c_0"])
def test_hidden_state_on_another_device_is_a_clear_error(which):
    x = torch.randn(5, 2, 3)
    h0, c0 = torch.randn(1, 2, 4), torch.randn(1, 2, 4)
    hx = (h0.to("meta"), c0) if which == "h_0" else (h0, c0.to("meta"))
    with pytest.raises(RuntimeError, match=f"Input and hidden tensors are not at the same device, found input "
                       f"tensor at cpu and {which} at meta"):
        fused_lstm.LSTM(3, 4)(x, hx)


def test_input_on_another_device_is_a_clear_error():
    x = torch.randn(5, 2, 3, device="meta")
    with pytest.raises(RuntimeError, match="Input and parameter tensors are not at the same device"):
        fused_lstm.LSTM(3, 4)(x)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_batch_size_zero_works_like_torch(bidirectional):
    ref, ours = lstm_pair(3, 4, bidirectional=bidirectional, proj_size=2)
    x = torch.randn(5, 0, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for module in (ref, ours):
        out, (h, c) = module(x)
        loss = out.sum() + h.sum() + c.sum()
        grads = torch.autograd.grad(loss, [x, *module.parameters()], allow_unused=True, materialize_grads=True)
        results.append((out, h, c, *grads))
    for got, expected in zip(results[1], results[0]):
        assert got.shape == expected.shape and got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


# ---- LSTMCell ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_hx", [True, False])
def test_cell_parity(bias, batched, with_hx):
    ref, ours = cell_pair(7, 5, bias=bias)
    x = torch.randn(*((3,) if batched else ()), 7, dtype=torch.float64, requires_grad=True)
    hx = None
    if with_hx:
        hx = tuple(torch.randn(*((3,) if batched else ()), 5, dtype=torch.float64, requires_grad=True) for _ in "hc")
    h_ref, c_ref = ref(x, hx)
    h, c = ours(x, hx)
    tolerance = TOLERANCE[torch.float64]
    torch.testing.assert_close(h, h_ref, **tolerance)
    torch.testing.assert_close(c, c_ref, **tolerance)
    leaves = [x, *(hx or ()), *ref.parameters()]
    g_ref = torch.autograd.grad(h_ref.sum() + 2 * c_ref.sum(), leaves)
    g = torch.autograd.grad(h.sum() + 2 * c.sum(), [x, *(hx or ()), *ours.parameters()])
    assert len(g) == len(g_ref) == len(leaves)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize("x,hx", [
    (torch.randn(2, 3, 1), None),
    (torch.randn(2, 2), None),
    (torch.randn(2, 3), (torch.randn(2, 5), torch.randn(2, 4))),
    (torch.randn(2, 3), (torch.randn(3, 4), torch.randn(2, 4))),
    (torch.randn(2, 3), (torch.randn(2, 4), torch.randn(2, 5))),
    (torch.randn(2, 3), (torch.randn(2, 4, 1), torch.randn(2, 4))),
    (torch.randn(2, 3, dtype=torch.float64), None),
])
def test_cell_errors_match_torch(x, hx):
    with pytest.raises(Exception) as expected:
        nn.LSTMCell(3, 4)(x, hx)
    with pytest.raises(type(expected.value)) as got:
        fused_lstm.LSTMCell(3, 4)(x, hx)
    assert str(got.value) == str(expected.value)


def test_cell_state_dict_and_init_match_torch():
    torch.manual_seed(7)
    ref = nn.LSTMCell(3, 4)
    torch.manual_seed(7)
    ours = fused_lstm.LSTMCell(3, 4)
    for a, b in zip(ref.state_dict().items(), ours.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1])
    nn.LSTMCell(3, 4).load_state_dict(ours.state_dict(), strict=True)
    assert repr(ours) == "fused_lstm." + repr(ref)  # says whose module it is
