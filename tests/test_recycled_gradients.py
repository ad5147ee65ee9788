"""The CPU keeps the freed weight gradients of per-step backward calls for the next step of the same backward
pass (csrc/cpu/recycled_gradients.h): an LSTMCell loop, or an LSTM called one step at a time.

What a user relies on: the gradients are torch.nn.LSTMCell's whatever the recycling did (pass after pass, with
.grad kept or set to None, from several threads at once), the kept blocks are freed when the pass ends or
fails, and the tensors it hands out are ordinary CPU tensors.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

import fused_lstm
from conftest import assert_close, cell_loop, cell_pair

kept_blocks = fused_lstm._C._kept_gradient_blocks


def cells():
    """(torch.nn.LSTMCell, ours) with the same float32 weights."""
    return cell_pair(24, 20, dtype=torch.float32)


def loop_backward(cell, x, h, c, on_first_h_grad=None):
    """Runs the cell over x [T, N, I] from (h, c) and back from the sum of every h; returns the first h."""
    hs = cell_loop(cell, x, h, c)
    if on_first_h_grad is not None:
        hs[0].register_hook(on_first_h_grad)  # runs in the last step of the backward pass
    torch.stack(hs).sum().backward()
    return hs[0]


def test_blocks_kept_during_the_pass_and_freed_after():
    _, ours = cells()
    x, h, c = torch.randn(6, 3, 24), torch.randn(3, 20), torch.randn(3, 20)
    seen = []
    loop_backward(ours, x, h, c, on_first_h_grad=lambda grad: seen.append(kept_blocks()))
    # The last step's two gradients became .grad; every later step's two came back freed after autograd
    # added them in, and the next step took them again.
    assert seen == [2]
    assert kept_blocks() == 0


@pytest.mark.parametrize("set_to_none", [True, False])
def test_gradients_match_torch_over_several_passes(set_to_none):
    torch.manual_seed(0)
    theirs, ours = cells()
    for _ in range(3):
        x, h, c = torch.randn(5, 4, 24), torch.randn(4, 20), torch.randn(4, 20)
        for cell in (ours, theirs):
            cell.zero_grad(set_to_none=set_to_none)
            loop_backward(cell, x, h, c)
        for p, q in zip(ours.parameters(), theirs.parameters()):
            assert_close(p.grad, q.grad, torch.float32, "weight gradient")
    assert kept_blocks() == 0


def test_a_failed_pass_frees_its_blocks():
    _, ours = cells()
    x, h, c = torch.randn(6, 3, 24), torch.randn(3, 20), torch.randn(3, 20)

    def fail(grad):
        assert kept_blocks() == 2
        raise RuntimeError("a hook failed")

    with pytest.raises(RuntimeError, match="a hook failed"):
        loop_backward(ours, x, h, c, on_first_h_grad=fail)
    assert kept_blocks() == 0


def test_no_blocks_kept_outside_a_backward_pass():
    _, ours = cells()
    args = [torch.randn(3, 24), torch.randn(3, 20), torch.randn(3, 20), *ours.parameters()]
    h, c, gates = torch.ops.fused_lstm.lstm_cell(*args)
    for _ in range(3):
        grads = torch.ops.fused_lstm.lstm_cell_backward(torch.randn(3, 20), None, *args[:5], gates, True)
        del grads
    assert kept_blocks() == 0


def test_concurrent_passes_on_threads_match_one_thread():
    torch.manual_seed(0)
    modules = [cells()[1] for _ in range(4)]
    inputs = [(torch.randn(8, 2, 24), torch.randn(2, 20), torch.randn(2, 20)) for _ in modules]
    for cell, args in zip(modules, inputs):
        loop_backward(cell, *args)
    expected = [[p.grad.clone() for p in cell.parameters()] for cell in modules]
    for cell in modules:
        cell.zero_grad(set_to_none=True)
    errors = []

    def run(cell, args):
        try:
            for _ in range(5):
                cell.zero_grad(set_to_none=True)
                loop_backward(cell, *args)
        except Exception as e:  # surfaced below: pytest does not see a thread's exception
            errors.append(e)

    threads = [threading.Thread(target=run, args=pair) for pair in zip(modules, inputs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for cell, grads in zip(modules, expected):
        for p, g in zip(cell.parameters(), grads):
            assert torch.equal(p.grad, g)
    assert kept_blocks() == 0


def test_recycled_gradients_are_ordinary_tensors():
    theirs, ours = cells()
    x, h, c = torch.randn(4, 3, 24), torch.randn(3, 20), torch.randn(3, 20)
    for cell in (ours, theirs):
        loop_backward(cell, x, h, c)
    grad = ours.weight_ih.grad  # the last step's gradient, from the recycler, kept as .grad
    expected = theirs.weight_ih.grad
    assert_close(grad, expected, torch.float32)
    grad.share_memory_()
    assert grad.is_shared()
    assert_close(grad, expected, torch.float32)
    grad.resize_(7)
    assert grad.shape == (7,)


FORK_SCRIPT = """
import os, sys, torch, fused_lstm
kept = fused_lstm._C._kept_gradient_blocks
cell = fused_lstm.LSTMCell(24, 20)
def loop():
    h = c = torch.zeros(3, 20); total = 0
    for step in torch.randn(5, 3, 24):
        h, c = cell(step, (h, c)); total = total + h.sum()
    total.backward()
loop()
pid = os.fork()
if pid == 0:
    torch.set_num_threads(1)
    loop()
    os._exit(0 if kept() == 0 and all(torch.isfinite(p.grad).all() for p in cell.parameters()) else 3)
_, status = os.waitpid(pid, 0)
loop()
sys.exit(os.waitstatus_to_exitcode(status) or kept())
"""


def test_a_forked_child_trains_with_its_own_recycler():
    # A fresh process: the child of a fork must not inherit the parent's recycler state (its lock, its passes).
    result = subprocess.run([sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
