"""Python face of the fused_lstm custom ops: fake kernels and autograd registrations (autocast: csrc/autocast.cpp).

The ops themselves (schemas in ``csrc/ops.cpp``, kernels in ``csrc/cpu`` and ``csrc/cuda``) are loaded
by importing ``fused_lstm._C``. Shapes are documented in ``csrc/lstm_layer.h``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers torch.ops.fused_lstm.*)
from . import reference

__all__ = ["lstm_layer", "lstm_layer_backward", "lstm_cell", "lstm_cell_backward"]


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
    if _transforms_active():
        return _LayerFunction.apply(input, batch_sizes, h0, c0, has_biases, has_projections, bidirectional, recurrence,
                                    *weights)
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
    need_input_grad: bool = True,
    need_weight_grads: bool = True,
    need_h0_grad: bool = True,
    recurrence: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor, List[Tensor]]:
    """Gradients of :func:`lstm_layer`: ``(grad_input, grad_h0, grad_c0, grad_weights)``. Without
    ``need_input_grad`` (``need_weight_grads``, ``need_h0_grad``) grad_input (every weight gradient,
    grad_h0) is an empty ``[0]`` tensor and is not computed. ``recurrence`` is the forward call's: the
    backward walks the steps for ``"standard"`` and must run the persistent CUDA kernel for
    ``"persistent"``."""
    return torch.ops.fused_lstm.lstm_layer_backward.default(
        grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, list(weights),
        has_biases, has_projections, bidirectional, gates, c_prev, h_prev, need_input_grad, need_weight_grads,
        need_h0_grad, recurrence,
    )


def lstm_cell(
    input: Tensor,
    hx: Tensor,
    cx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTMCell step, differentiable: input ``[N, I]``, hx and cx ``[N, H]``, w_ih ``[4H, I]``,
    w_hh ``[4H, H]``, b_ih and b_hh ``[4H]`` (both or neither). Returns ``(h', c', gates)``; gates
    ``[N, 4H]``, the post-activation gates, is what the backward needs (not differentiable)."""
    if _transforms_active():
        return _CellFunction.apply(input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    return torch.ops.fused_lstm.lstm_cell.default(input, hx, cx, w_ih, w_hh, b_ih, b_hh)


def lstm_cell_backward(
    grad_h: Optional[Tensor],
    grad_c: Optional[Tensor],
    input: Tensor,
    hx: Tensor,
    cx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    gates: Tensor,
    has_biases: bool,
    need_input_grad: bool = True,
    need_weight_grads: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`lstm_cell`: ``(grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b_ih,
    grad_b_hh)``, the bias gradients empty ``[0]`` tensors when ``has_biases`` is false, grad_input (the
    weight and bias gradients) empty and not computed without ``need_input_grad`` (``need_weight_grads``).
    ``grad_h`` / ``grad_c`` may be None when no gradient reaches that output."""
    return torch.ops.fused_lstm.lstm_cell_backward.default(grad_h, grad_c, input, hx, cx, w_ih, w_hh, gates,
                                                           has_biases, need_input_grad, need_weight_grads)


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
                              has_projections, bidirectional, gates, c_prev, h_prev, need_input_grad=True,
                              need_weight_grads=True, need_h0_grad=True, recurrence="auto"):
    contiguous = torch.contiguous_format
    return (
        torch.empty_like(input, memory_format=contiguous) if need_input_grad else input.new_empty(0),
        torch.empty_like(h0, memory_format=contiguous) if need_h0_grad else h0.new_empty(0),
        torch.empty_like(c0, memory_format=contiguous),
        [torch.empty_like(w, memory_format=contiguous) if need_weight_grads else w.new_empty(0) for w in weights],
    )


def _setup_context(ctx, inputs, output) -> None:
    input, batch_sizes, h0, c0, weights, has_biases, has_projections, bidirectional, _, recurrence = inputs
    _, _, _, gates, c_prev, h_prev = output
    ctx.mark_non_differentiable(gates, c_prev, h_prev)
    ctx.set_materialize_grads(False)  # unused outputs would otherwise get zero-filled gradients
    ctx.flags = (has_biases, has_projections, bidirectional)
    ctx.recurrence = recurrence
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
        if gates.dim() == 1:
            # The forward kept no workspace: a graph traced (torch.jit.trace) or exported under no_grad, which
            # froze need_workspace=False into it, is being trained. Run the forward again to get it.
            with torch.no_grad():
                _, _, _, gates, c_prev, h_prev = torch.ops.fused_lstm.lstm_layer.default(
                    input, batch_sizes, h0, c0, weights, has_biases, has_projections, bidirectional, True,
                    ctx.recurrence)
        # Only the gradients asked for: the first layer's input is usually data, frozen weights need none,
        # and h0 is usually zeros or a detached state.
        need_input_grad, need_h0_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        need_weight_grads = any(ctx.needs_input_grad[4])
        grad_input, grad_h0, grad_c0, grad_weights = lstm_layer_backward(
            grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, weights, has_biases, has_projections,
            bidirectional, gates, c_prev, h_prev, need_input_grad, need_weight_grads, need_h0_grad, ctx.recurrence,
        )
        grad_weights = grad_weights if need_weight_grads else [None] * len(weights)
        grads = [grad_input if need_input_grad else None, grad_h0 if need_h0_grad else None, grad_c0,
                 *grad_weights]
    grad_input, grad_h0, grad_c0, *grad_weights = grads
    return grad_input, None, grad_h0, grad_c0, list(grad_weights), None, None, None, None, None


def _reference_backward(ctx, grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, weights):
    has_biases, has_projections, bidirectional = ctx.flags

    def layer(input, h0, c0, *weights):
        return reference.lstm_layer(input, batch_sizes, h0, c0, weights, has_biases, has_projections, bidirectional)

    return _differentiable_gradients(layer, [input, h0, c0, *weights], (grad_output, grad_h_n, grad_c_n))


def _differentiable_gradients(fn, primals, grad_outputs):
    """The gradients of fn(*primals) for grad_outputs (None where no gradient reaches an output), themselves
    differentiable (create_graph=True): the double-backward path. The primals are the caller's saved
    tensors, so the graph hangs off the caller's. Each argument slot is differentiated through its own
    view: a tensor passed in two slots (h0 is c0, tied weights) then gets each slot's share, which autograd
    sums, instead of the whole gradient twice."""
    with torch.enable_grad():
        slots = [p.view_as(p) if p is not None and p.requires_grad else p for p in primals]
        outputs = fn(*slots)
    used = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
    targets = [i for i, p in enumerate(slots) if p is not None and p.requires_grad]
    found = torch.autograd.grad([o for o, _ in used], [slots[i] for i in targets], [g for _, g in used],
                                create_graph=True, allow_unused=True)
    grads: list = [None] * len(primals)
    for i, g in zip(targets, found):
        grads[i] = torch.zeros_like(primals[i]) if g is None else g
    return grads


torch.library.register_autograd("fused_lstm::lstm_layer", _backward, setup_context=_setup_context)


@torch.library.register_fake("fused_lstm::lstm_cell")
def _lstm_cell_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    torch._check(input.dim() == 2, lambda: "fused_lstm: expected cell input [N, I]")
    torch._check(w_ih.dim() == 2 and w_ih.shape[0] % 4 == 0, lambda: "fused_lstm: w_ih must be [4H, I]")
    rows, hidden = input.shape[0], w_ih.shape[0] // 4
    for name, t, shape in (("w_ih", w_ih, (4 * hidden, input.shape[1])), ("w_hh", w_hh, (4 * hidden, hidden)),
                           ("hx", hx, (rows, hidden)), ("cx", cx, (rows, hidden))):
        torch._check(tuple(t.shape) == shape, lambda: f"fused_lstm: expected {name} of shape {list(shape)}")
    torch._check((b_ih is None) == (b_hh is None), lambda: "fused_lstm: b_ih and b_hh must be given together")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        torch._check(b is None or tuple(b.shape) == (4 * hidden,),
                     lambda: f"fused_lstm: expected {name} of shape [{4 * hidden}]")
    return input.new_empty(rows, hidden), input.new_empty(rows, hidden), input.new_empty(rows, 4 * hidden)


@torch.library.register_fake("fused_lstm::lstm_cell_backward")
def _lstm_cell_backward_fake(grad_h, grad_c, input, hx, cx, w_ih, w_hh, gates, has_biases, need_input_grad=True,
                             need_weight_grads=True):
    contiguous = torch.contiguous_format

    def like(t: Tensor, needed: bool) -> Tensor:
        return torch.empty_like(t, memory_format=contiguous) if needed else t.new_empty(0)

    bias_size = w_ih.shape[0] if has_biases and need_weight_grads else 0
    return (
        like(input, need_input_grad),
        like(hx, True),
        like(cx, True),
        like(w_ih, need_weight_grads),
        like(w_hh, need_weight_grads),
        input.new_empty(bias_size),
        input.new_empty(bias_size),
    )


def _cell_setup_context(ctx, inputs, output) -> None:
    input, hx, cx, w_ih, w_hh, b_ih, b_hh = inputs
    gates = output[2]
    ctx.mark_non_differentiable(gates)
    ctx.set_materialize_grads(False)
    ctx.has_biases = b_ih is not None
    ctx.save_for_backward(input, hx, cx, w_ih, w_hh, gates, b_ih, b_hh)


def _cell_backward(ctx, grad_h, grad_c, _grad_gates):
    input, hx, cx, w_ih, w_hh, gates, b_ih, b_hh = ctx.saved_tensors
    if grad_h is None and grad_c is None:
        return None, None, None, None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True: differentiate the pure PyTorch cell instead
        return tuple(_differentiable_gradients(reference.lstm_cell, [input, hx, cx, w_ih, w_hh, b_ih, b_hh],
                                               (grad_h, grad_c)))
    need_input_grad, need_weight_grads = ctx.needs_input_grad[0], any(ctx.needs_input_grad[3:])
    grad_input, grad_hx, grad_cx, *grad_weights = lstm_cell_backward(
        grad_h, grad_c, input, hx, cx, w_ih, w_hh, gates, ctx.has_biases, need_input_grad, need_weight_grads)
    if not need_weight_grads:
        grad_weights = [None] * 4
    elif not ctx.has_biases:
        grad_weights[2:] = [None, None]
    return grad_input if need_input_grad else None, grad_hx, grad_cx, *grad_weights


torch.library.register_autograd("fused_lstm::lstm_cell", _cell_backward, setup_context=_cell_setup_context)

# --- torch.func (grad, vjp, jacrev, vmap, jvp, jacfwd) and forward-mode AD ----------------------------------
# The autograd.Function that torch.library.register_autograd generates has no setup_context staticmethod, so
# functorch refuses it, and under forward-mode AD it has no jvp. While a functorch transform or a forward-AD
# level is active, the wrappers above call these Functions instead: the same op forward, a vmap rule that
# folds the vmapped dimension into the batch (one fused call), forward-mode tangents through the
# differentiable reference (reference.py), and a backward that is itself a Function (the fused backward op,
# differentiable through the reference: nested transforms, hessians; one fused backward per sample under
# vmap). Everything else (eager, compile, export, script) calls the op as registered above.

_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_forward_ad = torch.autograd.forward_ad


def _transforms_active() -> bool:
    # is_compiling first: under torch.compile (which handles torch.func itself) the rest is never traced.
    return not _is_compiling() and (_functorch_active() or _forward_ad._current_level >= 0)


def _zeros_for_none(values, like):
    return [torch.zeros_like(p) if v is None else v for v, p in zip(values, like)]


def _jvp(fn, primals, tangents):
    """fn's forward-mode tangents at primals, by the transpose of its vjp (two reverse passes through fn, the
    differentiable reference): works inside torch.autograd.forward_ad's dual level too, where a nested
    torch.func.jvp may not enter another."""
    outputs, pullback = torch.func.vjp(fn, *primals)
    _, transposed = torch.func.vjp(pullback, tuple(torch.zeros_like(o) for o in outputs))
    return transposed(tuple(tangents))[0]


def _moved_batch(t: Optional[Tensor], dim: Optional[int], size: int, batch_axis: int) -> Tensor:
    """t with vmap's dimension (dim, or a broadcast one when None) folded into its batch axis."""
    if dim is None:
        t = t.unsqueeze(batch_axis).expand(*t.shape[:batch_axis], size, *t.shape[batch_axis:])
    else:
        t = t.movedim(dim, batch_axis)
    return t.reshape(*t.shape[:batch_axis], -1, *t.shape[batch_axis + 2:])


class _LayerFunction(torch.autograd.Function):
    """lstm_layer for torch.func. Arguments: (input, batch_sizes, h0, c0, has_biases, has_projections,
    bidirectional, recurrence, *weights)."""

    @staticmethod
    def forward(input, batch_sizes, h0, c0, has_biases, has_projections, bidirectional, recurrence, *weights):
        return torch.ops.fused_lstm.lstm_layer.default(input, batch_sizes, h0, c0, list(weights), has_biases,
                                                       has_projections, bidirectional, True, recurrence)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, batch_sizes, h0, c0, has_biases, has_projections, bidirectional, _, *weights = inputs
        ctx.mark_non_differentiable(*output[3:])
        ctx.set_materialize_grads(False)
        ctx.flags = (has_biases, has_projections, bidirectional)
        ctx.recurrence = inputs[7]
        ctx.batch_sizes = batch_sizes
        ctx.save_for_backward(input, h0, c0, *output[3:], *weights)
        ctx.save_for_forward(input, h0, c0, *weights)

    @staticmethod
    def _reference(ctx):
        def layer(input, h0, c0, *weights):
            return reference.lstm_layer(input, ctx.batch_sizes, h0, c0, weights, *ctx.flags)
        return layer

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n, *_):
        input, h0, c0, gates, c_prev, h_prev, *weights = ctx.saved_tensors
        if grad_output is None and grad_h_n is None and grad_c_n is None:
            return (None,) * (8 + len(weights))
        if grad_output is None:
            out_hidden = weights[1].shape[1] * (2 if ctx.flags[2] else 1)
            grad_output = input.new_zeros(*input.shape[:-1], out_hidden)
        grad_h_n, grad_c_n = _zeros_for_none((grad_h_n, grad_c_n), (h0, c0))
        grad_input, grad_h0, grad_c0, *grad_weights = _LayerBackwardFunction.apply(
            (*ctx.flags, ctx.recurrence), ctx.batch_sizes, grad_output, grad_h_n, grad_c_n, input, h0, c0, gates,
            c_prev, h_prev, *weights)
        needs = ctx.needs_input_grad
        grad_weights = [g if needs[8 + i] else None for i, g in enumerate(grad_weights)]
        return (grad_input if needs[0] else None, None, grad_h0 if needs[2] else None,
                grad_c0 if needs[3] else None, None, None, None, None, *grad_weights)

    @staticmethod
    def jvp(ctx, input_t, _batch_sizes_t, h0_t, c0_t, *rest):
        input, h0, c0, *weights = ctx.saved_tensors
        weight_tangents = rest[4:]
        primals = (input, h0, c0, *weights)
        tangents = _zeros_for_none((input_t, h0_t, c0_t, *weight_tangents), primals)
        output_t, h_n_t, c_n_t = _jvp(_LayerFunction._reference(ctx), primals, tangents)
        return output_t, h_n_t, c_n_t, None, None, None

    @staticmethod
    def vmap(info, in_dims, input, batch_sizes, h0, c0, has_biases, has_projections, bidirectional, recurrence,
             *weights):
        size = info.batch_size
        flags = (has_biases, has_projections, bidirectional, recurrence)
        input_dim, _, h0_dim, c0_dim = in_dims[:4]
        if batch_sizes is not None or any(d is not None for d in in_dims[8:]):
            # Packed input or batched weights (an ensemble): one call per sample.
            def take(t, d, b):
                return t if d is None else t.select(d, b)
            results = [_LayerFunction.apply(take(input, input_dim, b), batch_sizes, take(h0, h0_dim, b),
                                            take(c0, c0_dim, b), *flags,
                                            *[take(w, d, b) for w, d in zip(weights, in_dims[8:])])
                       for b in range(size)]
            return tuple(torch.stack(r) for r in zip(*results)), (0,) * 6
        # Dense, shared weights: the vmapped dimension joins the batch (dim 1 of input, h0, c0): one fused call.
        per_sample = [n for i, n in enumerate(input.shape) if i != input_dim]  # [T, N, I]
        steps, batch = per_sample[0], per_sample[1]
        output, h_n, c_n, *_ = _LayerFunction.apply(
            _moved_batch(input, input_dim, size, 1), None, _moved_batch(h0, h0_dim, size, 1),
            _moved_batch(c0, c0_dim, size, 1), *flags, *weights)
        output = output.reshape(steps, size, batch, -1)
        h_n = h_n.reshape(h_n.shape[0], size, batch, -1)
        c_n = c_n.reshape(c_n.shape[0], size, batch, -1)
        empty = input.new_empty(size, 0)  # no workspace per sample: the backward recomputes under vmap
        return (output, h_n, c_n, empty, empty, empty), (1, 1, 1, 0, 0, 0)


class _LayerBackwardFunction(torch.autograd.Function):
    """The layer's backward for torch.func, itself differentiable: forward, the fused backward op (run on plain
    tensors, as functorch hands them to a Function); its own backward and jvp through the reference (double
    backward, hessians); under vmap one fused backward per sample (per-sample gradients need per-sample weight
    gradients). Arguments: ((has_biases, has_projections, bidirectional, recurrence), batch_sizes, grad_output,
    grad_h_n, grad_c_n, input, h0, c0, gates, c_prev, h_prev, *weights); returns (grad_input, grad_h0, grad_c0,
    *grad_weights)."""

    @staticmethod
    def forward(spec, batch_sizes, grad_output, grad_h_n, grad_c_n, input, h0, c0, gates, c_prev, h_prev, *weights):
        has_biases, has_projections, bidirectional, recurrence = spec
        if gates.dim() == 1:  # the forward kept no workspace (a vmapped forward): compute it again
            _, _, _, gates, c_prev, h_prev = torch.ops.fused_lstm.lstm_layer.default(
                input, batch_sizes, h0, c0, list(weights), has_biases, has_projections, bidirectional, True,
                recurrence)
        grad_input, grad_h0, grad_c0, grad_weights = lstm_layer_backward(
            grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, weights, has_biases, has_projections,
            bidirectional, gates, c_prev, h_prev, recurrence=recurrence)
        return (grad_input, grad_h0, grad_c0, *grad_weights)

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, batch_sizes, grad_output, grad_h_n, grad_c_n, input, h0, c0, _, _, _, *weights = inputs
        ctx.flags = spec[:3]
        ctx.batch_sizes = batch_sizes
        ctx.save_for_backward(grad_output, grad_h_n, grad_c_n, input, h0, c0, *weights)
        ctx.save_for_forward(grad_output, grad_h_n, grad_c_n, input, h0, c0, *weights)

    @staticmethod
    def _first_order(ctx):
        """(grad_output, grad_h_n, grad_c_n, input, h0, c0, *weights) -> the gradients, differentiably."""
        def layer(input, h0, c0, *weights):
            return reference.lstm_layer(input, ctx.batch_sizes, h0, c0, weights, *ctx.flags)

        def gradients(grad_output, grad_h_n, grad_c_n, input, h0, c0, *weights):
            _, pullback = torch.func.vjp(layer, input, h0, c0, *weights)
            return pullback((grad_output, grad_h_n, grad_c_n))
        return gradients

    @staticmethod
    def backward(ctx, *grad_grads):
        primals = ctx.saved_tensors
        gradients, pullback = torch.func.vjp(_LayerBackwardFunction._first_order(ctx), *primals)
        found = pullback(tuple(_zeros_for_none(grad_grads, gradients)))
        return (None, None, *found[:6], None, None, None, *found[6:])

    @staticmethod
    def jvp(ctx, _spec_t, _batch_sizes_t, *tangents):
        primals = ctx.saved_tensors
        tangents = tangents[:6] + tangents[9:]  # not the workspace's
        return tuple(_jvp(_LayerBackwardFunction._first_order(ctx), primals, _zeros_for_none(tangents, primals)))

    @staticmethod
    def vmap(info, in_dims, spec, batch_sizes, *tensors):
        dims = in_dims[2:]
        results = [_LayerBackwardFunction.apply(spec, batch_sizes, *[t if d is None else t.select(d, b)
                                                                     for t, d in zip(tensors, dims)])
                   for b in range(info.batch_size)]
        stacked = tuple(torch.stack(r) for r in zip(*results))
        return stacked, (0,) * len(stacked)


class _CellBackwardFunction(torch.autograd.Function):
    """The cell's backward for torch.func, as _LayerBackwardFunction: arguments (grad_h, grad_c, input, hx, cx,
    w_ih, w_hh, gates, *biases), biases (b_ih, b_hh) or none; returns (grad_input, grad_hx, grad_cx, grad_w_ih,
    grad_w_hh, *grad_biases)."""

    @staticmethod
    def forward(grad_h, grad_c, input, hx, cx, w_ih, w_hh, gates, *biases):
        grads = lstm_cell_backward(grad_h, grad_c, input, hx, cx, w_ih, w_hh, gates, bool(biases))
        return tuple(grads[:5]) + (tuple(grads[5:]) if biases else ())

    @staticmethod
    def setup_context(ctx, inputs, output):
        primals = inputs[:7] + inputs[8:]  # all but the gates
        ctx.save_for_backward(*primals)
        ctx.save_for_forward(*primals)

    @staticmethod
    def _first_order(grad_h, grad_c, input, hx, cx, w_ih, w_hh, *biases):
        def cell(*args):
            b_ih, b_hh = args[5:] if biases else (None, None)
            return reference.lstm_cell(*args[:5], b_ih, b_hh)

        _, pullback = torch.func.vjp(cell, input, hx, cx, w_ih, w_hh, *biases)
        return pullback((grad_h, grad_c))

    @staticmethod
    def backward(ctx, *grad_grads):
        primals = ctx.saved_tensors
        gradients, pullback = torch.func.vjp(_CellBackwardFunction._first_order, *primals)
        found = pullback(tuple(_zeros_for_none(grad_grads, gradients)))
        return (*found[:7], None, *found[7:])

    @staticmethod
    def jvp(ctx, *tangents):
        primals = ctx.saved_tensors
        tangents = tangents[:7] + tangents[8:]  # not the gates'
        return tuple(_jvp(_CellBackwardFunction._first_order, primals, _zeros_for_none(tangents, primals)))

    @staticmethod
    def vmap(info, in_dims, *tensors):
        results = [_CellBackwardFunction.apply(*[t if d is None else t.select(d, b) for t, d in zip(tensors, in_dims)])
                   for b in range(info.batch_size)]
        stacked = tuple(torch.stack(r) for r in zip(*results))
        return stacked, (0,) * len(stacked)


class _CellFunction(torch.autograd.Function):
    """lstm_cell for torch.func. Arguments: (input, hx, cx, w_ih, w_hh, b_ih, b_hh)."""

    @staticmethod
    def forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
        return torch.ops.fused_lstm.lstm_cell.default(input, hx, cx, w_ih, w_hh, b_ih, b_hh)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[2])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs[:5], output[2], *inputs[5:])
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad_h, grad_c, _grad_gates):
        input, hx, cx, w_ih, w_hh, gates, b_ih, b_hh = ctx.saved_tensors
        if grad_h is None and grad_c is None:
            return (None,) * 7
        grad_h, grad_c = _zeros_for_none((grad_h, grad_c), (hx, cx))
        biases = () if b_ih is None else (b_ih, b_hh)
        grads = list(_CellBackwardFunction.apply(grad_h, grad_c, input, hx, cx, w_ih, w_hh, gates, *biases))
        grads += [None] * (7 - len(grads))
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))

    @staticmethod
    def jvp(ctx, *tangents):
        primals = ctx.saved_tensors
        present = [i for i, p in enumerate(primals) if p is not None]

        def cell(*args):
            full = list(primals)
            for i, a in zip(present, args):
                full[i] = a
            return reference.lstm_cell(*full)

        chosen = [primals[i] for i in present]
        h_t, c_t = _jvp(cell, chosen, _zeros_for_none([tangents[i] for i in present], chosen))
        return h_t, c_t, None

    @staticmethod
    def vmap(info, in_dims, input, hx, cx, w_ih, w_hh, b_ih, b_hh):
        size = info.batch_size
        if any(d is not None for d in in_dims[3:]):  # batched weights: one call per sample
            def take(t, d, b):
                return t if d is None or t is None else t.select(d, b)
            args = (input, hx, cx, w_ih, w_hh, b_ih, b_hh)
            results = [_CellFunction.apply(*[take(t, d, b) for t, d in zip(args, in_dims)]) for b in range(size)]
            return tuple(torch.stack(r) for r in zip(*results)), (0, 0, 0)
        rows = [n for i, n in enumerate(input.shape) if i != in_dims[0]][0]  # per sample [N, I]
        h, c, gates = _CellFunction.apply(
            _moved_batch(input, in_dims[0], size, 0), _moved_batch(hx, in_dims[1], size, 0),
            _moved_batch(cx, in_dims[2], size, 0), w_ih, w_hh, b_ih, b_hh)
        return (h.reshape(size, rows, -1), c.reshape(size, rows, -1), gates.reshape(size, rows, -1)), (0, 0, 0)


# Under torch.autocast (CUDA or CPU) the layer and the cell run in the autocast dtype, float16 or bfloat16, as
# torch.nn.LSTM does: the ops' autocast kernels are C++ (csrc/autocast.cpp, through torch's autocast weight cache),
# and compile and export trace them too.

# ONNX export of the layer op as ONNX's LSTM, for both exporters (fused_lstm/onnx.py; imports neither onnx nor
# onnxscript).
from . import onnx as _onnx  # noqa: E402

_onnx.register()
