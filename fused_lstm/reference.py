"""Pure PyTorch LSTM layer: the test oracle and the double-backward path.

Same contract as the ``fused_lstm::lstm_layer`` op (shapes in ``csrc/lstm_layer.h``) without the
workspace outputs: written with plain differentiable tensor ops and a Python loop over time steps, so it
is slow but obviously right, and autograd can differentiate it any number of times.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def _direction_weights(weights: Sequence[Tensor], d: int, has_biases: bool, has_projections: bool):
    k = 2 + 2 * has_biases + has_projections
    w = list(weights[d * k : (d + 1) * k])
    w_ih, w_hh = w[0], w[1]
    b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
    w_hr = w[-1] if has_projections else None
    return w_ih, w_hh, b_ih, b_hh, w_hr


def lstm_cell_step(
    gates_pre: Tensor, c: Tensor
) -> tuple[Tensor, Tensor]:
    """One cell update. gates_pre: [B, 4H] pre-activations in order i, f, g, o; c: [B, H].
    Returns (h' before any projection, c')."""
    i, f, g, o = gates_pre.chunk(4, dim=1)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_next), c_next


def lstm_layer(
    input: Tensor,
    batch_sizes: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    weights: Sequence[Tensor],
    has_biases: bool,
    has_projections: bool,
    bidirectional: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer, one or two directions.

    input: dense [T, N, I] (batch_sizes None) or packed [R, I] with batch_sizes [T] (int64, CPU);
    h0: [D, N, Hout]; c0: [D, N, H]; weights: per direction w_ih [4H, I], w_hh [4H, Hout],
    (b_ih [4H], b_hh [4H]), (w_hr [Hout, H]). Returns output (dense [T, N, D*Hout] or packed
    [R, D*Hout]), h_n [D, N, Hout], c_n [D, N, H].
    """
    dense = batch_sizes is None
    if dense:
        steps, batch = input.shape[0], input.shape[1]
        rows_per_step = [batch] * steps
        flat = input.reshape(steps * batch, input.shape[2])
    else:
        rows_per_step = [int(b) for b in batch_sizes.tolist()]
        steps = len(rows_per_step)
        flat = input
    offsets = [0]
    for rows in rows_per_step:
        offsets.append(offsets[-1] + rows)
    directions = 2 if bidirectional else 1

    outputs, h_n, c_n = [], [], []
    for d in range(directions):
        w_ih, w_hh, b_ih, b_hh, w_hr = _direction_weights(weights, d, has_biases, has_projections)
        projected = flat @ w_ih.t()
        if has_biases:
            projected = projected + b_ih + b_hh
        h, c = h0[d], c0[d]
        out_rows: list[Tensor] = [None] * steps  # type: ignore[list-item]
        order = range(steps - 1, -1, -1) if d == 1 else range(steps)
        for t in order:
            rows = rows_per_step[t]
            gates_pre = projected[offsets[t] : offsets[t + 1]] + h[:rows] @ w_hh.t()
            h_new, c_new = lstm_cell_step(gates_pre, c[:rows])
            if has_projections:
                h_new = h_new @ w_hr.t()
            # Rows of finished sequences keep their state (that is what h_n reports for them).
            h = torch.cat([h_new, h[rows:]])
            c = torch.cat([c_new, c[rows:]])
            out_rows[t] = h_new
        outputs.append(torch.cat(out_rows) if steps else flat.new_empty(0, h0.shape[2]))
        h_n.append(h)
        c_n.append(c)
    output = torch.cat(outputs, dim=1)
    if dense:
        output = output.reshape(steps, input.shape[1], -1)
    return output, torch.stack(h_n), torch.stack(c_n)


def lstm_cell(
    input: Tensor,
    hx: Tensor,
    cx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """One LSTMCell step, the contract of the ``fused_lstm::lstm_cell`` op without the gates output.
    input [N, I], hx / cx [N, H], w_ih [4H, I], w_hh [4H, H], b_ih / b_hh [4H] or None; returns (h', c')."""
    gates_pre = input @ w_ih.t() + hx @ w_hh.t()
    if b_ih is not None:
        gates_pre = gates_pre + b_ih + b_hh
    return lstm_cell_step(gates_pre, cx)
