"""The CPU path for CPUs with neither AVX2 nor AVX-512 (csrc/cpu/cpu_features.h): ATen's GEMMs and the
per-step loop in place of fused_lstm's register-tiled float32 kernels. The tests select it on this machine
and check the same things the kernel tests check: agreement with torch.nn.LSTM in outputs and every
gradient, the path taken, and a clear error where only the kernels can serve (a forced persistent
recurrence); and how kernel sets are selected and refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fused_lstm
from conftest import VECTOR_KERNELS, assert_close, cell_pair, lstm_pair, selected_cpu_kernels


SUPPORTED = fused_lstm._C._supported_cpu_kernels()


@pytest.fixture
def aten_kernels():
    with selected_cpu_kernels(float32="aten"):
        yield


def test_build_info_reports_the_cpu_kernels(aten_kernels):
    info = fused_lstm.build_info()
    assert info["cpu_kernels"] == "aten"
    assert info["cpu_kernels_supported"] == SUPPORTED[-1]
    assert SUPPORTED[0] == "aten" and SUPPORTED == ["aten", "avx2", "avx512"][:len(SUPPORTED)]
    for kernels in SUPPORTED:
        assert fused_lstm._C._set_cpu_kernels(kernels) in SUPPORTED
        assert fused_lstm.build_info()["cpu_kernels"] == kernels


def test_unknown_or_unsupported_kernels_are_refused(aten_kernels):
    with pytest.raises(ValueError, match="unknown CPU kernels 'sse'; expected 'aten', 'avx2' or 'avx512'"):
        fused_lstm._C._set_cpu_kernels("sse")
    for kernels in ("avx2", "avx512"):
        if kernels not in SUPPORTED:
            with pytest.raises(RuntimeError, match=f"this CPU cannot run the '{kernels}' kernels"):
                fused_lstm._C._set_cpu_kernels(kernels)
    assert fused_lstm.build_info()["cpu_kernels"] == "aten"


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["aten", "avx2", "avx512", "sse"])
def test_the_environment_variable_selects_the_kernels_at_import(kernels):
    """FUSED_LSTM_CPU_KERNELS, read when fused_lstm is imported (a fresh interpreter here)."""
    env = dict(os.environ, FUSED_LSTM_CPU_KERNELS=kernels)
    code = "import fused_lstm; print(fused_lstm.build_info()['cpu_kernels'])"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if kernels in SUPPORTED:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == kernels
    else:
        assert result.returncode != 0
        expected = "unknown CPU kernels" if kernels == "sse" else f"this CPU cannot run the '{kernels}' kernels"
        assert expected in result.stderr


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
    with pytest.raises(RuntimeError, match=r"needs a CPU with AVX2 and FMA \(x86-64-v3\) or AVX-512"):
        ours(torch.randn(5, 64, 24))


@pytest.mark.parametrize("kernels", VECTOR_KERNELS or [pytest.param("none", marks=pytest.mark.skip(
    reason="this CPU runs no fused_lstm kernels"))])
def test_every_kernel_set_agrees_with_aten(aten_kernels, kernels):
    """The same model through ATen's GEMMs and through each kernel build: float32 results within rounding of
    each other."""
    _, ours = lstm_pair(24, 40, num_layers=2, dtype=torch.float32)
    x = torch.randn(20, 64, 24)
    with torch.no_grad():
        out_aten, _ = ours(x)
        fused_lstm._C._set_cpu_kernels(kernels)
        out_kernels, _ = ours(x)
    assert fused_lstm.last_path() == "cpu:fused-recurrence"
    assert_close(out_aten, out_kernels, torch.float32, "output")
