"""Python face of the fused_lstm custom ops: fake kernels, autograd and autocast registrations.

The ops themselves (schemas in ``csrc/ops.cpp``, kernels in ``csrc/cpu`` and ``csrc/cuda``) are loaded
by importing ``fused_lstm._C``. Shapes are documented in ``csrc/lstm_layer.h``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers torch.ops.fused_lstm.*)
from . import reference

__all__ = ["lstm_layer", "lstm_layer_backward"]


def lstm_layer(
    input: Tensor,
    batch_sizes: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    weights: Sequence[Tensor],
    has_biases: bool,
    has_projections: bool,
    bidirectional: bool,
    need_workspace: bool,
    recurrence: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One LSTM layer (both directions when ``bidirectional``), differentiable.

    input: dense ``[T, N, I]`` (``batch_sizes`` None) or packed ``[R, I]`` with ``batch_sizes`` ``[T]``
    (int64, CPU, non-increasing); h0 ``[D, N, Hout]``; c0 ``[D, N, H]``; weights per direction in
    ``torch.nn.LSTM`` order ``w_ih [4H, I], w_hh [4H, Hout], (b_ih [4H], b_hh [4H]), (w_hr [Hout, H])``.
    Returns ``(output, h_n, c_n, gates, c_prev, h_prev)``; the last three are the backward workspace
    (empty unless ``need_workspace``), needed when anything is to be differentiated. ``recurrence`` picks
    the forward path: ``"auto"``, ``"standard"`` (a GEMM and a pointwise step per time step) or
    ``"persistent"`` (the whole sequence in one go: the persistent CUDA kernel, the CPU's fused recurrence;
    an error when it cannot run this layer).
    """
    return torch.ops.fused_lstm.lstm_layer.default(
        input, batch_sizes, h0, c0, list(weights), has_biases, has_projections, bidirectional, need_workspace,
        recurrence,
    )


def lstm_layer_backward(
    grad_output: Tensor,
    grad_h_n: Tensor,
    grad_c_n: Tensor,
    input: Tensor,
    batch_sizes: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    weights: Sequence[Tensor],
    has_biases: bool,
    has_projections: bool,
    bidirectional: bool,
    gates: Tensor,
    c_prev: Tensor,
    h_prev: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, List[Tensor]]:
    """Gradients of :func:`lstm_layer`: ``(grad_input, grad_h0, grad_c0, grad_weights)``."""
    return torch.ops.fused_lstm.lstm_layer_backward.default(
        grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, list(weights),
        has_biases, has_projections, bidirectional, gates, c_prev, h_prev,
    )


def _layer_sizes(input: Tensor, batch_sizes: Optional[Tensor], weights: Sequence[Tensor], bidirectional: bool):
    directions = 2 if bidirectional else 1
    hidden = weights[0].shape[0] // 4
    out_hidden = weights[1].shape[1]
    rows = input.shape[0] * input.shape[1] if batch_sizes is None else input.shape[0]
    return directions, hidden, out_hidden, rows


@torch.library.register_fake("fused_lstm::lstm_layer")
def _lstm_layer_fake(input, batch_sizes, h0, c0, weights, has_biases, has_projections, bidirectional,
                     need_workspace, recurrence="auto"):
    directions, hidden, out_hidden, rows = _layer_sizes(input, batch_sizes, weights, bidirectional)
    torch._check(input.dim() == (3 if batch_sizes is None else 2), lambda: "fused_lstm: bad input rank")
    torch._check(h0.shape[0] == directions and c0.shape[0] == directions, lambda: "fused_lstm: bad h0/c0")
    torch._check(weights[0].shape[1] == input.shape[-1], lambda: "fused_lstm: input size does not match w_ih")
    if batch_sizes is None:
        output = input.new_empty(input.shape[0], input.shape[1], directions * out_hidden)
    else:
        output = input.new_empty(rows, directions * out_hidden)
    ws_rows = rows if need_workspace else 0

    def workspace(width: int) -> Tensor:
        return input.new_empty(directions, ws_rows, width) if need_workspace else input.new_empty(0)

    return (output, torch.empty_like(h0, memory_format=torch.contiguous_format),
            torch.empty_like(c0, memory_format=torch.contiguous_format),
            workspace(4 * hidden), workspace(hidden), workspace(out_hidden))


@torch.library.register_fake("fused_lstm::lstm_layer_backward")
def _lstm_layer_backward_fake(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, weights, has_biases,
                              has_projections, bidirectional, gates, c_prev, h_prev):
    contiguous = torch.contiguous_format
    return (
        torch.empty_like(input, memory_format=contiguous),
        torch.empty_like(h0, memory_format=contiguous),
        torch.empty_like(c0, memory_format=contiguous),
        [torch.empty_like(w, memory_format=contiguous) for w in weights],
    )


def _setup_context(ctx, inputs, output) -> None:
    input, batch_sizes, h0, c0, weights, has_biases, has_projections, bidirectional, _, _ = inputs
    _, _, _, gates, c_prev, h_prev = output
    ctx.mark_non_differentiable(gates, c_prev, h_prev)
    ctx.set_materialize_grads(False)  # unused outputs would otherwise get zero-filled gradients
    ctx.flags = (has_biases, has_projections, bidirectional)
    ctx.num_weights = len(weights)
    ctx.save_for_backward(input, batch_sizes, h0, c0, gates, c_prev, h_prev, *weights)


def _backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_c_prev, _grad_h_prev):
    input, batch_sizes, h0, c0, gates, c_prev, h_prev, *weights = ctx.saved_tensors
    has_biases, has_projections, bidirectional = ctx.flags
    if grad_output is None and grad_h_n is None and grad_c_n is None:
        return None, None, None, None, [None] * len(weights), None, None, None, None, None
    # Gradients are not materialised (set_materialize_grads(False)): only the used outputs' are zeroed here.
    if grad_output is None:
        out_hidden = weights[1].shape[1] * (2 if bidirectional else 1)
        grad_output = input.new_zeros(*input.shape[:-1], out_hidden)
    grad_h_n = torch.zeros_like(h0) if grad_h_n is None else grad_h_n
    grad_c_n = torch.zeros_like(c0) if grad_c_n is None else grad_c_n
    if torch.is_grad_enabled():
        # create_graph=True: differentiate the pure PyTorch layer instead, so the gradients are themselves
        # differentiable (double backward, gradgradcheck).
        grads = _reference_backward(ctx, grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, weights)
    else:
        grad_input, grad_h0, grad_c0, grad_weights = lstm_layer_backward(
            grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, weights, has_biases, has_projections,
            bidirectional, gates, c_prev, h_prev,
        )
        grads = [grad_input, grad_h0, grad_c0, *grad_weights]
    grad_input, grad_h0, grad_c0, *grad_weights = grads
    return grad_input, None, grad_h0, grad_c0, list(grad_weights), None, None, None, None, None


def _reference_backward(ctx, grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, weights):
    has_biases, has_projections, bidirectional = ctx.flags
    primals = [input, h0, c0, *weights]
    with torch.enable_grad():
        outputs = reference.lstm_layer(input, batch_sizes, h0, c0, weights, has_biases, has_projections,
                                       bidirectional)
    # The saved tensors are the caller's own, so the reference graph hangs off the caller's graph.
    targets = [i for i, p in enumerate(primals) if p.requires_grad]
    found = torch.autograd.grad(outputs, [primals[i] for i in targets], (grad_output, grad_h_n, grad_c_n),
                                create_graph=True, allow_unused=True)
    grads: list = [None] * len(primals)
    for i, g in zip(targets, found):
        grads[i] = torch.zeros_like(primals[i]) if g is None else g
    return grads


torch.library.register_autograd("fused_lstm::lstm_layer", _backward, setup_context=_setup_context)

# Under torch.autocast("cuda") the layer runs in fp16, like torch.nn.LSTM (which autocast lists as fp16).
torch.library.register_autocast("fused_lstm::lstm_layer", "cuda", torch.float16)
