"""The tools users reach for around an LSTM, as they work with torch.nn.LSTM: TorchScript (script and trace) and
torch.export (fused_lstm modules compile, save, load, run, and the results train whatever the grad mode was when
they were traced or exported: the workspace decision is not frozen into the graph); quantize_dynamic (a warning,
never silently nothing); a repr that says whose module it is; very long sequences; the error torch raises first
when an input has several faults."""

from __future__ import annotations

import io
import itertools
import warnings
from typing import Tuple

import pytest
import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fused_lstm
from conftest import assert_close, cell_pair, lstm_pair


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation, tracer warnings
        yield


def _round_trip(scripted):
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


class _Both(torch.nn.Module):
    """Calls the LSTM on a tensor (with and without hx) and on a PackedSequence: both overloads compiled."""

    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x: Tensor, hx: Tuple[Tensor, Tensor], packed: PackedSequence
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        out, (h, c) = self.lstm(x)
        out_hx, _ = self.lstm(x, hx)
        packed_out, (packed_h, _) = self.lstm(packed)
        return out, h, out_hx, packed_out.data, packed_h


def _inputs(ref, batch_first):
    x = torch.randn((3, 5, 4) if batch_first else (5, 3, 4), dtype=torch.float64)
    states = ref.num_layers * (2 if ref.bidirectional else 1)
    out_hidden = ref.proj_size or ref.hidden_size
    hx = (torch.randn(states, 3, out_hidden, dtype=torch.float64),
          torch.randn(states, 3, ref.hidden_size, dtype=torch.float64))
    padded = torch.randn((3, 5, 4) if batch_first else (5, 3, 4), dtype=torch.float64)
    packed = pack_padded_sequence(padded, torch.tensor([5, 2, 4]), batch_first=batch_first, enforce_sorted=False)
    return x, hx, packed


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(num_layers=2, bidirectional=True, batch_first=True),
    dict(proj_size=2, bias=False),
])
def test_script_with_both_overloads_save_load(kwargs):
    ref, ours = lstm_pair(4, 6, **kwargs)
    x, hx, packed = _inputs(ref, kwargs.get("batch_first", False))
    scripted = torch.jit.script(_Both(ours))
    expected = _Both(ref)(x, hx, packed)
    for model in (scripted, _round_trip(scripted)):
        for got, want, what in zip(model(x, hx, packed), expected, ("out", "h_n", "out with hx", "packed", "packed h")):
            assert_close(got, want, what=what)


def test_scripted_lstm_trains():
    ref, ours = lstm_pair(4, 6, num_layers=2)
    scripted = _round_trip(torch.jit.script(_Both(ours)))
    x, hx, packed = _inputs(ref, False)
    for model, module in ((scripted, scripted), (_Both(ref), ref)):
        sum(t.sin().sum() for t in model(x, hx, packed)).backward()
    for (name, p), q in zip(ref.named_parameters(), scripted.lstm.parameters()):
        assert_close(q.grad, p.grad, what=name)


class _CellLoop(torch.nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, xs: Tensor) -> Tuple[Tensor, Tensor]:
        h, c = self.cell(xs[0])
        for t in range(1, xs.size(0)):
            h, c = self.cell(xs[t], (h, c))
        return h, c


@pytest.mark.parametrize("bias", [True, False])
def test_script_cell_direct_and_in_a_loop(bias):
    ref, ours = cell_pair(4, 6, bias=bias)
    xs = torch.randn(4, 3, 4, dtype=torch.float64)
    direct = _round_trip(torch.jit.script(ours))
    for got, want in zip(direct(xs[0]), ref(xs[0])):
        assert_close(got, want, what="direct")
    for got, want in zip(direct(xs[0, 0]), ref(xs[0, 0])):  # 1-D input
        assert_close(got, want, what="1-D")
    loop = _round_trip(torch.jit.script(_CellLoop(ours)))
    for got, want in zip(loop(xs), _CellLoop(ref)(xs)):
        assert_close(got, want, what="loop")
    loop(xs)[0].sum().backward()
    _CellLoop(ref)(xs)[0].sum().backward()
    for (name, p), q in zip(ref.named_parameters(), loop.cell.parameters()):
        assert_close(q.grad, p.grad, what=name)


def test_script_keeps_the_errors():
    ours = fused_lstm.LSTM(4, 6, dtype=torch.float64)
    scripted = torch.jit.script(_Both(ours))
    x, hx, packed = _inputs(ours, False)
    with pytest.raises(Exception, match="Expected hidden\\[0\\] size"):
        scripted(x, (hx[0][:, :2], hx[1]), packed)


@pytest.mark.parametrize("grad_when_traced", [True, False])
@pytest.mark.parametrize("module", ["lstm", "cell"])
def test_traced_module_trains(grad_when_traced, module):
    if module == "lstm":
        ref, ours = lstm_pair(4, 6, num_layers=2, bidirectional=True)
        x = torch.randn(5, 3, 4, dtype=torch.float64)
    else:
        ref, ours = cell_pair(4, 6)
        x = torch.randn(3, 4, dtype=torch.float64)
    with torch.set_grad_enabled(grad_when_traced):
        traced = torch.jit.trace(ours, (x,))
    traced = _round_trip(traced)
    x2 = torch.randn_like(x)  # other values, same shapes
    traced(x2)[0].sin().sum().backward()
    ref(x2)[0].sin().sum().backward()
    for (name, p), q in zip(ref.named_parameters(), traced.parameters()):
        assert_close(q.grad, p.grad, what=name)


@pytest.mark.parametrize("grad_when_exported", [True, False])
def test_export_round_trip_trains(grad_when_exported, tmp_path):
    ref, ours = lstm_pair(4, 6, num_layers=2, batch_first=True)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    with torch.set_grad_enabled(grad_when_exported):
        program = torch.export.export(ours, (x,))
    path = tmp_path / "lstm.pt2"
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    out, (h, c) = loaded(x)
    expected, (e_h, e_c) = ref(x)
    assert_close(out, expected, what="out")
    assert_close(c, e_c, what="c_n")
    out.sin().sum().backward()
    expected.sin().sum().backward()
    for (name, p), q in zip(ref.named_parameters(), loaded.parameters()):
        assert_close(q.grad, p.grad, what=name)


# --- quantization and repr --------------------------------------------------------------------------------------

def _quantize_dynamic(model, spec):
    import fused_lstm.modules as modules

    modules._quantization_warned = False  # warned once per process: reset for each test
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = torch.ao.quantization.quantize_dynamic(model, spec)
    return quantized, [str(w.message) for w in caught if "fused_lstm" in str(w.message)]


@pytest.mark.parametrize("spec", [{torch.nn.LSTM, torch.nn.Linear}, {torch.nn.LSTMCell}, None])
def test_quantize_dynamic_on_a_converted_model_warns(spec):
    model = torch.nn.Sequential(torch.nn.LSTM(3, 4), torch.nn.Linear(4, 4), torch.nn.LSTMCell(4, 4))
    fused_lstm.convert(model)
    quantized, messages = _quantize_dynamic(model, spec)
    assert len(messages) == 1, messages
    assert "convert(model, back=True)" in messages[0] and "fused_lstm.LSTM" in messages[0]
    assert isinstance(quantized[0], fused_lstm.LSTM)  # left in float, as the warning says
    # What the warning says to do quantizes it.
    back, messages = _quantize_dynamic(fused_lstm.convert(model, back=True), spec)
    assert messages == []
    dynamic = torch.ao.nn.quantized.dynamic
    if spec is None or torch.nn.LSTM in spec:
        assert isinstance(back[0], dynamic.LSTM)
    if spec is None or torch.nn.LSTMCell in spec:
        assert isinstance(back[2], dynamic.LSTMCell)


def test_quantize_dynamic_warns_once_and_not_for_other_modules():
    model = fused_lstm.convert(torch.nn.Sequential(torch.nn.LSTM(3, 4), torch.nn.Linear(4, 4)))
    _, messages = _quantize_dynamic(model, {torch.nn.Linear})
    assert messages == []  # LSTMs not asked for: nothing left out
    _, messages = _quantize_dynamic(model, {torch.nn.LSTM})
    assert len(messages) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.ao.quantization.quantize_dynamic(model, {torch.nn.LSTM})
    assert not [w for w in caught if "fused_lstm" in str(w.message)]


def test_repr_says_whose_module_it_is():
    assert repr(fused_lstm.LSTM(512, 512, num_layers=2)) == "fused_lstm.LSTM(512, 512, num_layers=2)"
    assert repr(fused_lstm.LSTMCell(3, 4, bias=False)) == "fused_lstm.LSTMCell(3, 4, bias=False)"
    model = fused_lstm.convert(torch.nn.Sequential(torch.nn.LSTM(3, 4, batch_first=True)))
    assert "(0): fused_lstm.LSTM(3, 4, batch_first=True)" in repr(model)
    assert repr(fused_lstm.convert(model, back=True)[0]) == "LSTM(3, 4, batch_first=True)"


# --- sequences longer than 65,535 steps (cuDNN: CUDNN_STATUS_NOT_SUPPORTED, pytorch#133751) ----------------------

LONG = 70_000


def test_long_sequence_matches_torch():
    ref, ours = lstm_pair(1, 2, dtype=torch.float32)
    x = torch.randn(LONG, 1, 1)
    with torch.no_grad():
        expected, (e_h, e_c) = ref(x)
        out, (h, c) = ours(x)
    assert out.shape == (LONG, 1, 2)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(c, e_c, atol=2e-5, rtol=1e-4)


def test_long_sequence_gradients_equal_two_chunks():
    """Forward and backward over 70,000 steps at once equal the same computation in two chunks of 35,000, each
    below 65,536 steps, the second starting from the first's state (float64: equal to rounding)."""
    _, ours = lstm_pair(1, 2)
    x = torch.randn(LONG, 2, 1, dtype=torch.float64, requires_grad=True)
    results = []
    for chunks in ((x,), x.split(LONG // 2)):
        hx, outputs = None, []
        for part in chunks:
            out, hx = ours(part, hx)
            outputs.append(out)
        loss = torch.cat(outputs).sin().sum() + hx[1].sum()
        results.append(torch.autograd.grad(loss, [x, *ours.parameters()]) + (torch.cat(outputs),))
    for whole, split in zip(*results):
        assert_close(whole, split, what="70,000 steps against two chunks")


def test_long_bidirectional_sequence_reverse_direction():
    """The reverse direction over 70,000 steps is the forward direction of the flipped sequence."""
    _, ours = lstm_pair(1, 2, bidirectional=True, dtype=torch.float32)
    _, single = lstm_pair(1, 2, dtype=torch.float32)
    single.load_state_dict({k.removesuffix("_reverse"): v for k, v in ours.state_dict().items()
                            if k.endswith("_reverse")})
    x = torch.randn(LONG, 2, 1)
    with torch.no_grad():
        out, (h, _) = ours(x)
        reverse, (h_reverse, _) = single(x.flip(0))
    torch.testing.assert_close(out[..., 2:], reverse.flip(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h[1], h_reverse[0], atol=1e-6, rtol=1e-5)


# --- error precedence: with several faults at once, the error torch raises first ------------------------------

def _faults(cell: bool):
    """Each fault turns valid arguments (x, h, c) into invalid ones; torch.nn.LSTM's (nn.LSTMCell's) error for
    each pair must be ours."""
    lead = () if cell else (1,)  # hx: (N, H) for the cell, (L*D, N, H) for the layer
    rows = (3, 4) if cell else (5, 3, 4)  # the modules take 5 features
    return {
        "input feature size": lambda a: a.update(x=torch.randn(*rows, dtype=a["x"].dtype)),
        "input dtype": lambda a: a.update(x=a["x"].float()),
        "hx batch": lambda a: a.update(h=torch.randn(*lead, 2, 6, dtype=a["h"].dtype)),
        "cx hidden size": lambda a: a.update(c=torch.randn(*lead, 3, 7, dtype=a["c"].dtype)),
        "input rank": lambda a: a.update(x=a["x"].unsqueeze(0)),
        "hx rank": lambda a: a.update(h=a["h"].unsqueeze(0) if cell else a["h"][0]),
        "no hx, input dtype": lambda a: a.update(x=a["x"].float(), h=None, c=None),
        "empty": lambda a: a.update(x=a["x"][:0]),  # no steps (the layer), no rows (the cell)
        "unbatched, feature size": lambda a: a.update(x=torch.randn(*rows[1:], dtype=a["x"].dtype), h=None, c=None),
    }


def _first_error(module, args):
    try:
        module(args["x"]) if args["h"] is None else module(args["x"], (args["h"], args["c"]))
    except Exception as error:  # noqa: BLE001 (the type is what is compared)
        return type(error), str(error)
    return None


_DROP_HX = {"no hx, input dtype", "unbatched, feature size"}
_NEED_HX = {"hx batch", "cx hidden size", "hx rank"}


def _pairs(cell: bool):
    """Every pair of faults that can coexist (a fault of hx cannot go with one that omits hx)."""
    return [(cell, pair) for pair in itertools.combinations(_faults(cell), 2)
            if not (set(pair) & _DROP_HX and set(pair) & _NEED_HX)]


@pytest.mark.parametrize("cell,pair", _pairs(True) + _pairs(False),
                         ids=lambda v: " + ".join(v) if isinstance(v, tuple) else ("cell" if v else "lstm"))
def test_several_faults_raise_what_torch_raises_first(cell, pair):
    if cell:
        ref, ours = cell_pair(5, 6)
    else:
        ref, ours = lstm_pair(5, 6)
    faults = _faults(cell)
    for order in (pair, pair[::-1]):
        shape = (3,) if cell else (1, 3)
        args = dict(x=torch.randn(*((3, 5) if cell else (5, 3, 5)), dtype=torch.float64),
                    h=torch.randn(*shape, 6, dtype=torch.float64), c=torch.randn(*shape, 6, dtype=torch.float64))
        for fault in order:
            faults[fault](args)
        expected = _first_error(ref, args)
        assert expected is not None, order
        assert _first_error(ours, args) == expected, order


def test_cell_input_of_the_wrong_size_and_dtype():
    """The issue's case: torch's input_size error, not a matmul dtype error."""
    ours = fused_lstm.LSTMCell(4, 6)
    with pytest.raises(RuntimeError, match="^input has inconsistent input_size: got 5 expected 4$"):
        ours(torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="^input has inconsistent input_size: got 5 expected 4$"):
        torch.nn.LSTMCell(4, 6)(torch.randn(3, 5, dtype=torch.float64))


@pytest.mark.parametrize("cell", [True, False])
def test_state_of_another_dtype_is_our_clear_error(cell):
    """Where torch fails inside a matmul (h_0) or says nothing (c_0), ours names the state (README: stricter
    checks); every other fault raises torch's error first."""
    ours = fused_lstm.LSTMCell(5, 6, dtype=torch.float64) if cell else fused_lstm.LSTM(5, 6, dtype=torch.float64)
    x = torch.randn(*((3, 5) if cell else (4, 3, 5)), dtype=torch.float64)
    state = torch.randn(*((3, 6) if cell else (1, 3, 6)), dtype=torch.float64)
    with pytest.raises(RuntimeError, match="Expected c_0 to have dtype torch.float64 like the input"):
        ours(x, (state, state.float()))
    with pytest.raises(RuntimeError, match="input has inconsistent input_size" if cell else "input.size\\(-1\\)"):
        ours(torch.randn(*x.shape[:-1], 4, dtype=torch.float64), (state, state.float()))
