"""ONNX export of ``fused_lstm::lstm_layer`` as the standard ONNX ``LSTM`` operator, for both exporters.

Importing fused_lstm registers both translations; neither needs onnx or onnxscript at import time:

- ``torch.onnx.export(..., dynamo=False)`` (TorchScript): a symbolic registered with
  ``torch.onnx.register_custom_op_symbolic`` (opset 9 and up).
- ``torch.onnx.export(..., dynamo=True)``: an onnxscript function added to the exporter's own list of
  translations the moment torch's exporter loads it (onnxscript is imported by torch then, not by us), so
  users pass nothing. ``custom_translation_table`` (below) is the same translation for an explicit
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

def _symbolic_lstm_layer(g, input, batch_sizes, h0, c0, weights, has_biases, has_projections, bidirectional,
                         need_workspace, recurrence=None):
    try:
        from torch.onnx._internal.torchscript_exporter import symbolic_helper
    except ImportError:  # older torch
        from torch.onnx import symbolic_helper  # type: ignore[no-redef]

    has_biases = bool(symbolic_helper._parse_arg(has_biases, "b"))
    has_projections = bool(symbolic_helper._parse_arg(has_projections, "b"))
    bidirectional = bool(symbolic_helper._parse_arg(bidirectional, "b"))
    if has_projections:
        raise torch.onnx.errors.OnnxExporterError(PROJ_SIZE_ERROR)
    if not symbolic_helper._is_none(batch_sizes):
        raise torch.onnx.errors.OnnxExporterError(PACKED_ERROR)
    weights = symbolic_helper._unpack_list(weights)
    directions = _direction_count(weights, has_biases, bidirectional)
    per_direction = 2 + 2 * has_biases

    hidden_size = symbolic_helper._get_tensor_dim_size(weights[1], 1)
    if hidden_size is None:
        raise torch.onnx.errors.OnnxExporterError("fused_lstm: ONNX export needs the static shape of w_hh")

    def onnx_gate_order(w):  # [4H, ...] rows i, f, g, o -> i, o, f, c (constant-folded for parameters)
        i, f, c, o = (symbolic_helper._slice_helper(g, w, axes=[0], starts=[k * hidden_size],
                                                    ends=[(k + 1) * hidden_size]) for k in range(4))
        return g.op("Concat", i, o, f, c, axis_i=0)

    def stacked(parts):  # each [...] -> [D, ...]
        parts = [symbolic_helper._unsqueeze_helper(g, p, [0]) for p in parts]
        return parts[0] if len(parts) == 1 else g.op("Concat", *parts, axis_i=0)

    ws, rs, bs = [], [], []
    for d in range(directions):
        w = weights[d * per_direction:(d + 1) * per_direction]
        ws.append(onnx_gate_order(w[0]))
        rs.append(onnx_gate_order(w[1]))
        if has_biases:
            bs.append(g.op("Concat", onnx_gate_order(w[2]), onnx_gate_order(w[3]), axis_i=0))
    bias = stacked(bs) if has_biases else symbolic_helper._optional_input_placeholder_tensor(g)
    no_lengths = symbolic_helper._optional_input_placeholder_tensor(g)
    y, y_h, y_c = g.op("LSTM", input, stacked(ws), stacked(rs), bias, no_lengths, h0, c0,
                       direction_s="bidirectional" if bidirectional else "forward", hidden_size_i=hidden_size,
                       outputs=3)
    # Y [T, D, N, H] -> [T, N, D*H]
    y = g.op("Transpose", y, perm_i=[0, 2, 1, 3])
    y = symbolic_helper._reshape_helper(g, y, g.op("Constant", value_t=torch.tensor([0, 0, -1])))
    flat = symbolic_helper._reshape_helper(g, input, g.op("Constant", value_t=torch.tensor([-1])))
    empty = symbolic_helper._slice_helper(g, flat, axes=[0], starts=[0], ends=[0])  # [0], the input's dtype
    return y, y_h, y_c, empty, empty, empty


def _register_torchscript() -> None:
    torch.onnx.register_custom_op_symbolic(_LAYER_OP, _symbolic_lstm_layer, 9)


# --- dynamo exporter (dynamo=True) ---------------------------------------------------------------------------

def _dynamo_translation():
    """The onnxscript function for ``fused_lstm::lstm_layer`` (built on first use: it imports onnxscript)."""
    from onnxscript import INT64
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.tensor_typing import TFloat

    def fused_lstm_layer(input: TFloat, batch_sizes: Optional[INT64], h0: TFloat, c0: TFloat,
                         weights: Sequence[TFloat], has_biases: bool, has_projections: bool, bidirectional: bool,
                         need_workspace: bool, recurrence: str = "auto"):
        if has_projections:
            raise RuntimeError(PROJ_SIZE_ERROR)
        if batch_sizes is not None:
            raise RuntimeError(PACKED_ERROR)
        directions = _direction_count(weights, has_biases, bidirectional)
        per_direction = 2 + 2 * has_biases

        hidden_size = weights[1].shape[1]
        if not isinstance(hidden_size, int):
            raise RuntimeError("fused_lstm: ONNX export needs the static shape of w_hh")

        def onnx_gate_order(w):  # [4H, ...] rows i, f, g, o -> i, o, f, c (constant-folded for parameters)
            i, f, c, o = (op.Slice(w, [k * hidden_size], [(k + 1) * hidden_size], [0]) for k in range(4))
            return op.Concat(i, o, f, c, axis=0)

        def stacked(parts):  # each [...] -> [D, ...]
            parts = [op.Unsqueeze(p, [0]) for p in parts]
            return parts[0] if len(parts) == 1 else op.Concat(*parts, axis=0)

        ws, rs, bs = [], [], []
        for d in range(directions):
            w = weights[d * per_direction:(d + 1) * per_direction]
            ws.append(onnx_gate_order(w[0]))
            rs.append(onnx_gate_order(w[1]))
            if has_biases:
                bs.append(op.Concat(onnx_gate_order(w[2]), onnx_gate_order(w[3]), axis=0))
        y, y_h, y_c = op.LSTM(input, stacked(ws), stacked(rs), stacked(bs) if has_biases else None,
                              initial_h=h0, initial_c=c0, direction="bidirectional" if bidirectional else "forward",
                              hidden_size=hidden_size)
        y = op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), [0, 0, -1])  # [T, D, N, H] -> [T, N, D*H]
        empty = op.Slice(op.Reshape(input, [-1]), [0], [0])  # [0], the input's dtype
        return y, y_h, y_c, op.Identity(empty), op.Identity(empty), op.Identity(empty)

    return fused_lstm_layer


_translation = None


def _translation_function():
    global _translation
    if _translation is None:
        _translation = _dynamo_translation()
    return _translation


def custom_translation_table() -> Dict[Any, Any]:
    """``{torch.ops.fused_lstm.lstm_layer.default: <onnxscript function>}`` for ``torch.onnx.export``'s
    ``custom_translation_table`` (not needed when fused_lstm was imported: the exporter finds it itself)."""
    return {torch.ops.fused_lstm.lstm_layer.default: _translation_function()}


_dynamo_meta = None


def _with_our_translation(get_torchlib_ops):
    """Wraps the function that torch's dynamo exporter builds every registry from (``ONNXRegistry.
    from_torchlib``), so that its list ends with our translation."""

    def get_torchlib_ops_and_fused_lstm():
        global _dynamo_meta
        found = tuple(get_torchlib_ops())
        try:
            if _dynamo_meta is None:
                from torch.onnx._internal.exporter import _registration

                _dynamo_meta = _registration.OnnxDecompMeta(
                    onnx_function=_translation_function(), fx_target=torch.ops.fused_lstm.lstm_layer.default,
                    signature=None, is_custom=True)
        except Exception as error:  # a torch or onnxscript whose internals moved: say what to do instead
            import warnings

            warnings.warn(f"fused_lstm: could not register the ONNX translation of {_LAYER_OP} with torch's "
                          f"dynamo exporter ({error!r}); pass custom_translation_table=fused_lstm.onnx."
                          "custom_translation_table() to torch.onnx.export", stacklevel=2)
            return found
        return found + (_dynamo_meta,)

    get_torchlib_ops_and_fused_lstm.__wrapped__ = get_torchlib_ops  # type: ignore[attr-defined]
    return get_torchlib_ops_and_fused_lstm


def _register_dynamo(registry_module) -> None:
    if not hasattr(registry_module.get_torchlib_ops, "__wrapped__"):
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
