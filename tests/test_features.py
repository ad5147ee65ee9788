"""What fused_lstm adds beyond cuDNN's LSTM, and module-level behaviour: torch.compile without graph
breaks, backward in eval mode, determinism, dropout between layers, convert()."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_lstm
from conftest import TOLERANCE, lstm_pair


class Tagger(nn.Module):
    """A small model with our LSTM inside, as users would write it."""

    def __init__(self, lstm: nn.Module):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.lstm = lstm
        self.head = nn.Linear(2 * 10, 3)

    def forward(self, x):
        out, (h, c) = self.lstm(torch.tanh(self.embed(x)))
        return self.head(out).sum(-1) + h.sum(0).mean(-1, keepdim=True) + c.mean()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    model = Tagger(fused_lstm.LSTM(8, 10, num_layers=2, bidirectional=True, batch_first=True))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(3, 7, 6, requires_grad=True)
    expected = model(x)
    got = compiled(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(expected)
    grads_expected = torch.autograd.grad(expected, [x, *model.parameters()], g)
    grads = torch.autograd.grad(got, [x, *model.parameters()], g)
    for a, b in zip(grads, grads_expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compile_has_no_graph_break_and_calls_our_op():
    torch._dynamo.reset()
    model = Tagger(fused_lstm.LSTM(8, 10, bidirectional=True, batch_first=True))
    explanation = torch._dynamo.explain(model)(torch.randn(2, 5, 6))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    graph_code = "\n".join(g.code for g in explanation.graphs)
    assert "fused_lstm.lstm_layer" in graph_code


def test_compile_packed_sequence_fullgraph():
    """Variable-length batches under torch.compile: the batch size comes from sorted_indices (static)."""
    torch._dynamo.reset()
    lstm = fused_lstm.LSTM(4, 5, bidirectional=True)
    x = torch.randn(6, 3, 4, requires_grad=True)
    lengths = torch.tensor([4, 6, 2])
    hx = (torch.randn(2, 3, 5), torch.randn(2, 3, 5))
    compiled = torch.compile(lstm, fullgraph=True, backend="aot_eager")
    for state in (None, hx):
        out, (h, c) = compiled(pack_padded_sequence(x, lengths, enforce_sorted=False), state)
        ref, (h_ref, c_ref) = lstm(pack_padded_sequence(x, lengths, enforce_sorted=False), state)
        torch.testing.assert_close(out.data, ref.data)
        torch.testing.assert_close(h, h_ref)
        torch.testing.assert_close(c, c_ref)
        (g,) = torch.autograd.grad(out.data.sum() + h.sum(), x)
        (g_ref,) = torch.autograd.grad(ref.data.sum() + h_ref.sum(), x)
        torch.testing.assert_close(g, g_ref)


def test_compile_lstm_cell():
    """A decoder-style loop of cell steps compiles whole, and its gradients match eager."""
    torch._dynamo.reset()
    cell = fused_lstm.LSTMCell(4, 5)

    def decode(x, hx):
        outputs = []
        for step in x.unbind(0):
            hx = cell(step, hx)
            outputs.append(hx[0])
        return torch.stack(outputs), hx[1]

    x = torch.randn(3, 2, 4, requires_grad=True)
    hx = (torch.randn(2, 5), torch.randn(2, 5))
    compiled = torch.compile(decode, fullgraph=True, backend="aot_eager")
    results = [fn(x, hx) for fn in (compiled, decode)]
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)
    grads = [torch.autograd.grad(out.sum() + c.sum(), [x, *cell.parameters()]) for out, c in results]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_lstm_cell_double_backward_matches_torch():
    """A gradient penalty through LSTMCell (create_graph=True), against torch.nn.LSTMCell's."""
    from conftest import cell_pair

    ref, ours = cell_pair(3, 4)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    hx = (torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64))
    penalties = []
    for module in (ref, ours):
        h, c = module(x, hx)
        (gx,) = torch.autograd.grad(h.pow(2).sum() + c.sum(), x, create_graph=True)
        penalties.append(torch.autograd.grad(gx.pow(2).sum(), [x, *module.parameters()]))
    for a, b in zip(*penalties):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-9)


def test_backward_in_eval_mode():
    ref, ours = lstm_pair(4, 5, num_layers=2, dropout=0.5)
    ref.eval()
    ours.eval()
    x = torch.randn(6, 2, 4, dtype=torch.float64, requires_grad=True)
    grads = []
    for module in (ref, ours):
        out, (h, c) = module(x)
        assert not module.training
        grads.append(torch.autograd.grad((out * out.detach().sin()).sum() + c.sum(), [x, *module.parameters()]))
    for g, g_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g, g_ref, **TOLERANCE[torch.float64])


def test_no_grad_keeps_no_workspace_and_matches():
    _, ours = lstm_pair(4, 5)
    x = torch.randn(6, 2, 4, dtype=torch.float64)
    with torch.no_grad():
        out_inference = ours(x)[0]
    out_training = ours(x)[0]
    assert out_inference.grad_fn is None and out_training.grad_fn is not None
    assert torch.equal(out_inference, out_training.detach())


@pytest.mark.parametrize("packed", [False, True])
def test_bitwise_deterministic(packed):
    _, ours = lstm_pair(16, 32, num_layers=2, bidirectional=True, dtype=torch.float32, init_scale=None)
    x = torch.randn(12, 9, 16)
    lengths = torch.randint(1, 13, (9,))
    lengths[0] = 12

    def run():
        inp = x.clone().requires_grad_()
        feed = pack_padded_sequence(inp, lengths, enforce_sorted=False) if packed else inp
        out, (h, c) = ours(feed)
        out = out.data if packed else out
        grads = torch.autograd.grad((out * out).sum() + h.sum() + c.sum(), [inp, *ours.parameters()])
        return [out, h, c, *grads]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_dropout_only_between_layers_and_only_in_training():
    p = 0.4
    _, ours = lstm_pair(8, 400, num_layers=2, dropout=p, dtype=torch.float32, init_scale=None)
    _, single = lstm_pair(8, 400, num_layers=2, dropout=0.0, dtype=torch.float32, init_scale=None)
    single.load_state_dict(ours.state_dict())
    x = torch.randn(3, 2, 8)
    ours.eval()
    single.eval()
    with torch.no_grad():
        assert torch.equal(ours(x)[0], single(x)[0])  # eval: no dropout at all
        ours.train()
        a, b = ours(x)[0], ours(x)[0]
        assert not torch.equal(a, b)  # training: fresh masks each call
        # One layer has nothing to drop between: dropout must not touch its output.
        one = fused_lstm.LSTM(8, 16, num_layers=1)
        with pytest.warns(UserWarning):
            one_dropout = fused_lstm.LSTM(8, 16, num_layers=1, dropout=p)
        one_dropout.load_state_dict(one.state_dict())
        assert torch.equal(one(x)[0], one_dropout.train()(x)[0])


def test_dropout_is_applied_between_layers_at_rate_p():
    """Layer 2 sees layer 1's output with each element zeroed with probability p and the rest scaled by
    1/(1-p): rebuild that by hand from two one-layer LSTMs and the same random stream."""
    p = 0.3
    lstm = fused_lstm.LSTM(4, 300, num_layers=2, dropout=p, dtype=torch.float64)
    first = fused_lstm.LSTM(4, 300, dtype=torch.float64)
    second = fused_lstm.LSTM(300, 300, dtype=torch.float64)
    state = lstm.state_dict()
    first.load_state_dict({k: v for k, v in state.items() if k.endswith("_l0")})
    second.load_state_dict({k.replace("_l1", "_l0"): v for k, v in state.items() if k.endswith("_l1")})
    x = torch.randn(20, 10, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(99)
        out = lstm(x)[0]
        torch.manual_seed(99)
        hidden = first(x)[0]
        mask = torch.nn.functional.dropout(torch.ones_like(hidden), p, training=True)
        torch.manual_seed(99)
        first(x)
        expected = second(torch.nn.functional.dropout(hidden, p, training=True))[0]
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    zero_fraction = (mask == 0).double().mean().item()
    assert abs(zero_fraction - p) < 0.01, zero_fraction
    assert torch.allclose(mask[mask != 0], torch.tensor(1 / (1 - p), dtype=torch.float64))


class Nested(nn.Module):
    """LSTMs at several depths, in a ModuleList and a Sequential, plus an LSTMCell."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.LSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.Tanh()),
                                     nn.ModuleDict({"rnn": nn.LSTM(16, 5, proj_size=3)})])
        self.cell = nn.LSTMCell(3, 4)

    def forward(self, x):
        out, _ = self.encoder(x)
        out = self.blocks[0](out)
        out, (h, c) = self.blocks[1]["rnn"](out.transpose(0, 1))
        h1, c1 = self.cell(out[-1])
        return out.sum() + h.sum() + c.sum() + h1.sum() + c1.sum()


def test_convert_nested_model_and_back():
    torch.manual_seed(3)
    model = Nested().double()
    model.blocks[1]["rnn"].weight_hh_l0.requires_grad_(False)
    model.eval()
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    converted = fused_lstm.convert(model)
    assert converted is model
    assert isinstance(model.encoder, fused_lstm.LSTM) and isinstance(model.blocks[1]["rnn"], fused_lstm.LSTM)
    assert isinstance(model.cell, fused_lstm.LSTMCell)
    assert not any(isinstance(m, (nn.LSTM, nn.LSTMCell)) for m in model.modules())
    assert model.encoder.batch_first and model.encoder.bidirectional and model.encoder.num_layers == 2
    assert model.blocks[1]["rnn"].proj_size == 3
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert not model.blocks[1]["rnn"].weight_hh_l0.requires_grad and model.encoder.weight_hh_l0.requires_grad
    assert not model.encoder.training and not model.cell.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(x), expected)

    back = fused_lstm.convert(model, back=True)
    assert type(back.encoder) is nn.LSTM and type(back.cell) is nn.LSTMCell
    assert type(back.blocks[1]["rnn"]) is nn.LSTM and back.blocks[1]["rnn"].proj_size == 3
    assert not any(isinstance(m, (fused_lstm.LSTM, fused_lstm.LSTMCell)) for m in back.modules())
    assert not back.blocks[1]["rnn"].weight_hh_l0.requires_grad and not back.encoder.training
    torch.testing.assert_close(back(x), expected)


def test_convert_a_bare_lstm_returns_the_new_module():
    lstm = nn.LSTM(3, 4).train(False)
    ours = fused_lstm.convert(lstm)
    assert isinstance(ours, fused_lstm.LSTM) and not ours.training
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(ours(x)[0], lstm(x)[0])
    assert type(fused_lstm.convert(ours, back=True)) is nn.LSTM


def test_last_path_names_the_kernel_path(cpu_kernels):
    lstm = fused_lstm.LSTM(8, 16)
    with torch.no_grad():
        lstm(torch.randn(5, 4, 8))
        assert fused_lstm.last_path() == "cpu:fused-recurrence"  # float32: the fused recurrence
        lstm.double()(torch.randn(5, 4, 8, dtype=torch.float64))
        assert fused_lstm.last_path() == "cpu:per-step"
        fused_lstm.LSTM(8, 16, proj_size=4)(torch.randn(5, 4, 8))
        assert fused_lstm.last_path() == "cpu:per-step"  # projections take the per-step loop


@pytest.mark.parametrize("recurrence,path", [("auto", "cpu:fused-recurrence"), ("standard", "cpu:per-step"),
                                             ("persistent", "cpu:fused-recurrence")])
def test_recurrence_argument_picks_the_path(recurrence, path, cpu_kernels):
    """recurrence= forces the per-step loop or the whole-sequence path; results agree across paths."""
    ref, _ = lstm_pair(6, 40, num_layers=2, bidirectional=True, dtype=torch.float32, init_scale=None)
    ours = fused_lstm.LSTM(6, 40, num_layers=2, bidirectional=True, recurrence=recurrence)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(9, 5, 6, requires_grad=True)
    out, (h, c) = ours(x)
    assert fused_lstm.last_path() == path
    out_ref, (h_ref, c_ref) = ref(x)
    torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(c, c_ref, atol=2e-5, rtol=1e-4)
    (g,) = torch.autograd.grad(out.sum() + h.sum(), x)
    (g_ref,) = torch.autograd.grad(out_ref.sum() + h_ref.sum(), x)
    torch.testing.assert_close(g, g_ref, atol=2e-5, rtol=1e-4)


def test_recurrence_persistent_runs_even_tiny_layers_and_cells(cpu_kernels):
    with torch.no_grad():
        fused_lstm.LSTM(3, 4, recurrence="persistent")(torch.randn(1, 1, 3))  # below the auto threshold
        assert fused_lstm.last_path() == "cpu:fused-recurrence"
        fused_lstm.LSTMCell(3, 4, recurrence="standard")(torch.randn(2, 3))
        assert fused_lstm.last_path() == "cpu:per-step"


@pytest.mark.parametrize("kwargs,dtype", [(dict(), torch.float64), (dict(proj_size=2), torch.float32)])
def test_recurrence_persistent_says_why_it_cannot_run(kwargs, dtype, cpu_kernels):
    lstm = fused_lstm.LSTM(3, 4, recurrence="persistent", dtype=dtype, **kwargs)
    with pytest.raises(RuntimeError, match="recurrence='persistent' on the CPU needs float32 and no proj_size"):
        lstm(torch.randn(5, 2, 3, dtype=dtype))


def test_recurrence_argument_validation_repr_and_state_dict():
    with pytest.raises(ValueError, match="recurrence must be one of"):
        fused_lstm.LSTM(3, 4, recurrence="fast")
    lstm = fused_lstm.LSTM(3, 4, recurrence="standard")
    assert repr(lstm) == "fused_lstm.LSTM(3, 4, recurrence='standard')"
    assert repr(fused_lstm.LSTM(3, 4)) == "fused_lstm." + repr(nn.LSTM(3, 4))
    nn.LSTM(3, 4).load_state_dict(lstm.state_dict(), strict=True)
    assert copy.deepcopy(lstm).recurrence == "standard"


def test_double_backward_with_one_tensor_in_two_slots():
    """One tensor as both hx and cx of a cell (and as both h0 and c0 of the layer op): with
    create_graph=True each slot's share of the gradient, summed by autograd, as torch gives it — not the
    whole gradient once per slot."""
    from conftest import cell_pair
    from fused_lstm import ops, reference

    ref, ours = cell_pair(3, 4)
    x = torch.randn(2, 3, dtype=torch.float64)
    state = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    results = []
    for module in (ref, ours):
        (g,) = torch.autograd.grad(module(x, (state, state))[0].pow(2).sum(), state, create_graph=True)
        results.append((g, *torch.autograd.grad(g.pow(2).sum(), state)))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)

    weights = [w.detach() for w in lstm_pair(3, 4)[1]._flat_weights]
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    state = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    results = []
    for layer in (lambda: reference.lstm_layer(x, None, state, state, weights, True, False, False)[0],
                  lambda: ops.lstm_layer(x, None, state, state, weights, True, False, False, True)[0]):
        (g,) = torch.autograd.grad(layer().pow(2).sum(), state, create_graph=True)
        results.append((g, *torch.autograd.grad(g.pow(2).sum(), state)))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
