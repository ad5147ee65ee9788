"""ONNX export of ``fused_lstm::lstm_layer`` (and ``lstm_cell``, as one step) as the standard ONNX ``LSTM``
operator, for both exporters.

Importing fused_lstm registers both translations; neither needs onnx or onnxscript at import time:

- ``torch.onnx.export(..., dynamo=False)`` (TorchScript): a symbolic registered with
  ``torch.onnx.register_custom_op_symbolic`` (opset 9 and up).
- ``torch.onnx.export(..., dynamo=True)``: onnxscript functions added to the exporter's own list of
  translations the moment torch's exporter loads it (onnxscript is imported by torch then, not by us), so
  users pass nothing. ``custom_translation_table`` (below) gives the same translations for an explicit
  ``torch.onnx.export(..., custom_translation_table=fused_lstm.onnx.custom_translation_table())``.

The ONNX operator: X ``[T, N, I]``; W ``[D, 4H, I]``, R ``[D, 4H, H]`` with the gates in ONNX order
``i, o, f, c`` (PyTorch's is ``i, f, g, o``); B ``[D, 8H]`` = ``W_b`` then ``R_b``; Y ``[T, D, N, H]``,
Y_h and Y_c ``[D, N, H]``. It has no projection (``proj_size``) and our packed layout has no ONNX form, so
both are export errors that say so. The workspace outputs of the op (only backward reads them) are
exported as empty tensors.
"""

import importlib.abc
import importlib.util
import sys
from typing import Any, Dict, Optional, Sequence

import torch

__all__ = ["custom_translation_table", "PROJ_SIZE_ERROR", "PACKED_ERROR"]

PROJ_SIZE_ERROR = ("fused_lstm: ONNX export of an LSTM with proj_size > 0 is not supported: the ONNX LSTM "
                   "operator has no projection (proj_size). Export a model with proj_size=0.")
PACKED_ERROR = ("fused_lstm: ONNX export of an LSTM called on a PackedSequence is not supported: pass a padded "
                "tensor instead.")

_LAYER_OP = "fused_lstm::lstm_layer"
_CELL_OP = "fused_lstm::lstm_cell"
# The module in which torch's dynamo exporter lists its translations (torch 2.6+); importing it imports
# onnxscript, so we wait for torch to import it.
_TORCHLIB_REGISTRY = "torch.onnx._internal.exporter._torchlib._torchlib_registry"


def _direction_count(weights, has_biases: bool, bidirectional: bool) -> int:
    directions = 2 if bidirectional else 1
    per_direction = 2 + 2 * has_biases
    if len(weights) != directions * per_direction:
        raise RuntimeError(f"fused_lstm: ONNX export expected {directions * per_direction} weights for this layer, "
                           f"got {len(weights)}")
    return directions


# --- TorchScript exporter (dynamo=False) ---------------------------------------------------------------------

def _symbolic_helper():
    try:
        from torch.onnx._internal.torchscript_exporter import symbolic_helper
    except ImportError:  # older torch
        from torch.onnx import symbolic_helper  # type: ignore[no-redef]
    return symbolic_helper


def _symbolic_onnx_lstm(g, x, direction_weights, has_biases: bool, h0, c0):
    """ONNX's LSTM over x [T, N, I] from each direction's (w_ih, w_hh[, b_ih, b_hh]) in PyTorch's layout;
    returns (Y [T, D, N, H], Y_h, Y_c)."""
    helper = _symbolic_helper()
    hidden_size = helper._get_tensor_dim_size(direction_weights[0][1], 1)
    if hidden_size is None:
        raise torch.onnx.errors.OnnxExporterError("fused_lstm: ONNX export needs the static shape of w_hh")

    def onnx_gate_order(w):  # [4H, ...] rows i, f, g, o -> i, o, f, c (constant-folded for parameters)
        i, f, c, o = (helper._slice_helper(g, w, axes=[0], starts=[k * hidden_size], ends=[(k + 1) * hidden_size])
                      for k in range(4))
        return g.op("Concat", i, o, f, c, axis_i=0)

    def stacked(parts):  # each [...] -> [D, ...]
        parts = [helper._unsqueeze_helper(g, p, [0]) for p in parts]
        return parts[0] if len(parts) == 1 else g.op("Concat", *parts, axis_i=0)

    w = stacked([onnx_gate_order(d[0]) for d in direction_weights])
    r = stacked([onnx_gate_order(d[1]) for d in direction_weights])
    if has_biases:
        b = stacked([g.op("Concat", onnx_gate_order(d[2]), onnx_gate_order(d[3]), axis_i=0) for d in direction_weights])
    else:
        b = helper._optional_input_placeholder_tensor(g)
    no_lengths = helper._optional_input_placeholder_tensor(g)
    return g.op("LSTM", x, w, r, b, no_lengths, h0, c0, hidden_size_i=hidden_size, outputs=3,
                direction_s="bidirectional" if len(direction_weights) == 2 else "forward")


def _symbolic_empty(g, like):
    """An empty [0] tensor of like's dtype: the exported workspace outputs, which only backward reads."""
    helper = _symbolic_helper()
    flat = helper._reshape_helper(g, like, g.op("Constant", value_t=torch.tensor([-1])))
    return helper._slice_helper(g, flat, axes=[0], starts=[0], ends=[0])


def _symbolic_lstm_layer(g, input, batch_sizes, h0, c0, weights, has_biases, has_projections, bidirectional,
                         need_workspace, recurrence=None):
    helper = _symbolic_helper()
    has_biases = bool(helper._parse_arg(has_biases, "b"))
    if helper._parse_arg(has_projections, "b"):
        raise torch.onnx.errors.OnnxExporterError(PROJ_SIZE_ERROR)
    if not helper._is_none(batch_sizes):
        raise torch.onnx.errors.OnnxExporterError(PACKED_ERROR)
    weights = helper._unpack_list(weights)
    directions = _direction_count(weights, has_biases, bool(helper._parse_arg(bidirectional, "b")))
    per_direction = len(weights) // directions
    y, y_h, y_c = _symbolic_onnx_lstm(
        g, input, [weights[d * per_direction:(d + 1) * per_direction] for d in range(directions)], has_biases, h0, c0)
    y = g.op("Transpose", y, perm_i=[0, 2, 1, 3])  # [T, D, N, H] -> [T, N, D*H]
    y = helper._reshape_helper(g, y, g.op("Constant", value_t=torch.tensor([0, 0, -1])))
    empty = _symbolic_empty(g, input)
    return y, y_h, y_c, empty, empty, empty


def _symbolic_lstm_cell(g, input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    """One step of ONNX's LSTM: input [N, I] as a sequence of length 1."""
    helper = _symbolic_helper()
    has_biases = not helper._is_none(b_ih)
    weights = [w_ih, w_hh, b_ih, b_hh] if has_biases else [w_ih, w_hh]
    unsqueezed = [helper._unsqueeze_helper(g, t, [0]) for t in (input, hx, cx)]
    _, y_h, y_c = _symbolic_onnx_lstm(g, unsqueezed[0], [weights], has_biases, *unsqueezed[1:])
    h, c = (helper._squeeze_helper(g, t, [0]) for t in (y_h, y_c))
    return h, c, _symbolic_empty(g, input)


def _register_torchscript() -> None:
    torch.onnx.register_custom_op_symbolic(_LAYER_OP, _symbolic_lstm_layer, 9)
    torch.onnx.register_custom_op_symbolic(_CELL_OP, _symbolic_lstm_cell, 9)


# --- dynamo exporter (dynamo=True) ---------------------------------------------------------------------------

def _dynamo_translations():
    """The onnxscript functions for ``fused_lstm::lstm_layer`` and ``lstm_cell`` (built on first use: they
    import onnxscript)."""
    from onnxscript import INT64
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.tensor_typing import TFloat

    def onnx_lstm(x, direction_weights, has_biases, h0, c0):
        """As _symbolic_onnx_lstm."""
        hidden_size = direction_weights[0][1].shape[1]
        if not isinstance(hidden_size, int):
            raise RuntimeError("fused_lstm: ONNX export needs the static shape of w_hh")

        def onnx_gate_order(w):  # [4H, ...] rows i, f, g, o -> i, o, f, c (constant-folded for parameters)
            i, f, c, o = (op.Slice(w, [k * hidden_size], [(k + 1) * hidden_size], [0]) for k in range(4))
            return op.Concat(i, o, f, c, axis=0)

        def stacked(parts):  # each [...] -> [D, ...]
            parts = [op.Unsqueeze(p, [0]) for p in parts]
            return parts[0] if len(parts) == 1 else op.Concat(*parts, axis=0)

        w = stacked([onnx_gate_order(d[0]) for d in direction_weights])
        r = stacked([onnx_gate_order(d[1]) for d in direction_weights])
        b = None
        if has_biases:
            b = stacked([op.Concat(onnx_gate_order(d[2]), onnx_gate_order(d[3]), axis=0) for d in direction_weights])
        return op.LSTM(x, w, r, b, initial_h=h0, initial_c=c0, hidden_size=hidden_size,
                       direction="bidirectional" if len(direction_weights) == 2 else "forward")

    def empty(like):  # [0], like's dtype: the workspace outputs, which only backward reads
        return op.Slice(op.Reshape(like, [-1]), [0], [0])

    def fused_lstm_layer(input: TFloat, batch_sizes: Optional[INT64], h0: TFloat, c0: TFloat,
                         weights: Sequence[TFloat], has_biases: bool, has_projections: bool, bidirectional: bool,
                         need_workspace: bool, recurrence: str = "auto"):
        if has_projections:
            raise RuntimeError(PROJ_SIZE_ERROR)
        if batch_sizes is not None:
            raise RuntimeError(PACKED_ERROR)
        directions = _direction_count(weights, has_biases, bidirectional)
        per_direction = len(weights) // directions
        y, y_h, y_c = onnx_lstm(input, [weights[d * per_direction:(d + 1) * per_direction] for d in range(directions)],
                                has_biases, h0, c0)
        y = op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), [0, 0, -1])  # [T, D, N, H] -> [T, N, D*H]
        return y, y_h, y_c, empty(input), empty(input), empty(input)

    def fused_lstm_cell(input: TFloat, hx: TFloat, cx: TFloat, w_ih: TFloat, w_hh: TFloat, b_ih: Optional[TFloat],
                        b_hh: Optional[TFloat]):
        has_biases = b_ih is not None
        weights = [w_ih, w_hh, b_ih, b_hh] if has_biases else [w_ih, w_hh]
        _, y_h, y_c = onnx_lstm(op.Unsqueeze(input, [0]), [weights], has_biases, op.Unsqueeze(hx, [0]),
                                op.Unsqueeze(cx, [0]))
        return op.Squeeze(y_h, [0]), op.Squeeze(y_c, [0]), empty(input)

    return {torch.ops.fused_lstm.lstm_layer.default: fused_lstm_layer,
            torch.ops.fused_lstm.lstm_cell.default: fused_lstm_cell}


_translations: Optional[Dict[Any, Any]] = None


def custom_translation_table() -> Dict[Any, Any]:
    """``{torch.ops.fused_lstm.lstm_layer.default: <onnxscript function>, ...lstm_cell...}`` for
    ``torch.onnx.export``'s ``custom_translation_table`` (not needed when fused_lstm was imported: the exporter
    finds them itself)."""
    global _translations
    if _translations is None:
        _translations = _dynamo_translations()
    return dict(_translations)


_dynamo_metas: Optional[tuple] = None


def _with_our_translation(get_torchlib_ops):
    """Wraps the function that torch's dynamo exporter builds every registry from (``ONNXRegistry.
    from_torchlib``), so that its list ends with our translation."""

    def get_torchlib_ops_and_fused_lstm():
        global _dynamo_metas
        found = tuple(get_torchlib_ops())
        try:
            if _dynamo_metas is None:
                from torch.onnx._internal.exporter import _registration

                _dynamo_metas = tuple(
                    _registration.OnnxDecompMeta(onnx_function=function, fx_target=target, signature=None,
                                                 is_custom=True)
                    for target, function in custom_translation_table().items())
        except Exception as error:  # a torch or onnxscript whose internals moved: say what to do instead
            import warnings

            warnings.warn(f"fused_lstm: could not register the ONNX translations of fused_lstm's ops with torch's "
                          f"dynamo exporter ({error!r}); pass custom_translation_table=fused_lstm.onnx."
                          "custom_translation_table() to torch.onnx.export", stacklevel=2)
            return found
        return found + _dynamo_metas

    get_torchlib_ops_and_fused_lstm._fused_lstm = True  # type: ignore[attr-defined]
    return get_torchlib_ops_and_fused_lstm


def _register_dynamo(registry_module) -> None:
    if not getattr(registry_module.get_torchlib_ops, "_fused_lstm", False):
        registry_module.get_torchlib_ops = _with_our_translation(registry_module.get_torchlib_ops)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs _register_dynamo once torch's exporter has imported its translation list: we never import
    onnxscript ourselves (a second of import time, and an optional dependency)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TORCHLIB_REGISTRY:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_dynamo(module)

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def register() -> None:
    """Register both translations (done once at ``import fused_lstm``)."""
    _register_torchscript()
    if _TORCHLIB_REGISTRY in sys.modules:
        _register_dynamo(sys.modules[_TORCHLIB_REGISTRY])
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
