"""The CPU path for CPUs without AVX-512 (csrc/cpu/cpu_features.h): ATen's GEMMs and the per-step loop in
place of fused_lstm's register-tiled float32 kernels, whose 16-float vectors have no register outside
AVX-512. This machine has AVX-512, so the tests switch the kernels off and check the same things the
kernel tests check: agreement with torch.nn.LSTM in outputs and every gradient, the path taken, and a
clear error where only the kernels can serve (a forced persistent recurrence)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fused_lstm
from conftest import assert_close, cell_pair, lstm_pair


@pytest.fixture
def aten_kernels():
    previous = fused_lstm._C._set_cpu_vector_kernels(False)
    yield
    fused_lstm._C._set_cpu_vector_kernels(previous)


def test_build_info_reports_the_cpu_kernels(aten_kernels):
    assert fused_lstm.build_info()["cpu_kernels"] == "aten"
    fused_lstm._C._set_cpu_vector_kernels(True)
    assert fused_lstm.build_info()["cpu_kernels"] == "avx512"


@pytest.mark.parametrize("num_layers,bidirectional,proj_size,packed", [
    (1, False, 0, False), (2, True, 0, False), (1, True, 7, False), (2, False, 0, True)])
def test_lstm_matches_torch_without_the_vector_kernels(aten_kernels, num_layers, bidirectional, proj_size, packed):
    # Batch 64, H = 40: sizes where the kernels would run the fused float32 recurrence.
    steps, batch, input_size, hidden = 12, 64, 24, 40
    ref, ours = lstm_pair(input_size, hidden, num_layers=num_layers, bidirectional=bidirectional,
                          proj_size=proj_size, dtype=torch.float32)
    x = torch.randn(steps, batch, input_size, requires_grad=True)
    lengths = torch.randint(1, steps + 1, (batch,))
    lengths[0] = steps
    prepare = (lambda t: pack_padded_sequence(t, lengths, enforce_sorted=False)) if packed else (lambda t: t)
    out_ref, (h_ref, c_ref) = ref(prepare(x))
    out, (h, c) = ours(prepare(x))
    assert fused_lstm.last_path() == "cpu:per-step"
    data = (lambda o: o.data) if packed else (lambda o: o)
    for name, mine, theirs in (("output", data(out), data(out_ref)), ("h_n", h, h_ref), ("c_n", c, c_ref)):
        assert_close(mine, theirs, torch.float32, name)
    g = torch.randn_like(data(out))
    grads_ref = torch.autograd.grad((data(out_ref) * g).sum() + h_ref.sum() + c_ref.sum(), [x, *ref.parameters()])
    grads = torch.autograd.grad((data(out) * g).sum() + h.sum() + c.sum(), [x, *ours.parameters()])
    for name, mine, theirs in zip(["input", *dict(ours.named_parameters())], grads, grads_ref):
        assert_close(mine, theirs, torch.float32, f"grad {name}")


def test_lstm_cell_matches_torch_without_the_vector_kernels(aten_kernels):
    ref, ours = cell_pair(24, 40, dtype=torch.float32)
    x = torch.randn(32, 24, requires_grad=True)
    hx = (torch.randn(32, 40), torch.randn(32, 40))
    h_ref, c_ref = ref(x, hx)
    h, c = ours(x, hx)
    assert_close(h, h_ref, torch.float32, "h")
    assert_close(c, c_ref, torch.float32, "c")
    grads_ref = torch.autograd.grad(h_ref.sum() + 2 * c_ref.sum(), [x, *ref.parameters()])
    grads = torch.autograd.grad(h.sum() + 2 * c.sum(), [x, *ours.parameters()])
    for name, mine, theirs in zip(["input", *dict(ours.named_parameters())], grads, grads_ref):
        assert_close(mine, theirs, torch.float32, f"grad {name}")


def test_a_forced_persistent_recurrence_says_what_it_needs(aten_kernels):
    _, ours = lstm_pair(24, 40, dtype=torch.float32)
    ours.recurrence = "persistent"
    with pytest.raises(RuntimeError, match="needs a CPU with AVX-512"):
        ours(torch.randn(5, 64, 24))


def test_both_kernel_settings_agree(aten_kernels):
    """The same model through ATen's GEMMs and through the vector kernels (on this AVX-512 machine):
    float32 results within rounding of each other."""
    _, ours = lstm_pair(24, 40, num_layers=2, dtype=torch.float32)
    x = torch.randn(20, 64, 24)
    with torch.no_grad():
        out_aten, _ = ours(x)
        fused_lstm._C._set_cpu_vector_kernels(True)
        out_kernels, _ = ours(x)
    assert fused_lstm.last_path() == "cpu:fused-recurrence"
    assert_close(out_aten, out_kernels, torch.float32, "output")
