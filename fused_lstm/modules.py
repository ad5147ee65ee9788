"""Drop-in replacements for ``torch.nn.LSTM`` and ``torch.nn.LSTMCell`` on the fused_lstm custom ops."""

# No `from __future__ import annotations`: TorchScript resolves the overloads' annotations of _ScriptableLSTM
# eagerly.
import functools
import importlib
import warnings
from typing import List, Literal, Optional, Tuple, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import ops

__all__ = ["LSTM", "LSTMCell", "convert"]

_HiddenState = Tuple[Tensor, Tensor]
Recurrence = Literal["auto", "standard", "persistent"]
_RECURRENCES = ("auto", "standard", "persistent")


def _checked_recurrence(recurrence: str) -> str:
    if recurrence not in _RECURRENCES:
        raise ValueError(f"recurrence must be one of {_RECURRENCES}, got {recurrence!r}")
    return recurrence


def _check_state(input: Tensor, hx: _HiddenState, weight: Tensor) -> None:
    """Where torch.nn.LSTM crashes deep inside a kernel or is silent, raise a clear error instead."""
    if input.device != weight.device:
        raise RuntimeError(
            "Input and parameter tensors are not at the same device, found input tensor at "
            f"{input.device} and parameter tensor at {weight.device}"
        )
    for name, state in zip(("h_0", "c_0"), hx):
        if state.device != input.device:
            raise RuntimeError(f"Input and hidden tensors are not at the same device, found input tensor at "
                               f"{input.device} and {name} at {state.device}")
        if state.dtype != input.dtype and not _autocast_enabled(input):
            raise RuntimeError(f"Expected {name} to have dtype {input.dtype} like the input, got {state.dtype}")


def _batched_state(hx: Tuple[Tensor, Tensor], is_batched: bool) -> Tuple[Tensor, Tensor]:
    """A given (h_0, c_0) checked against the input's form, as torch.nn.LSTM checks it, with the batch dimension
    added for unbatched input. Shared by LSTM.forward and its scriptable twin."""
    if is_batched:
        if hx[0].dim() != 3 or hx[1].dim() != 3:
            raise RuntimeError("For batched 3-D input, hx and cx should also be 3-D but got "
                               f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
        return hx
    if hx[0].dim() != 2 or hx[1].dim() != 2:
        raise RuntimeError("For unbatched 2-D input, hx and cx should also be 2-D but got "
                           f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
    return (hx[0].unsqueeze(1), hx[1].unsqueeze(1))


def _autocast_enabled(input: Tensor) -> bool:
    if torch.jit.is_scripting():
        return torch.is_autocast_enabled()  # TorchScript's takes no device type: CUDA's
    return torch.is_autocast_enabled(input.device.type)


def _c10_name(dtype: torch.dtype) -> str:
    """The C++ name torch's own messages use for a dtype ("Float", "Double", "BFloat16")."""
    if torch.jit.is_scripting():
        names = {"torch.float32": "Float", "torch.float64": "Double", "torch.float16": "Half",
                 "torch.bfloat16": "BFloat16"}
        return names.get(str(dtype), str(dtype))
    return torch.empty(0, dtype=dtype).type().removeprefix("torch.").removesuffix("Tensor")


def _needs_workspace(tensors: List[Tensor]) -> bool:
    """Whether the layer op keeps its backward workspace. Never while torch.jit.trace records: the traced graph
    would freeze this decision (and differ between grad modes); its backward then recomputes the forward once
    to get the workspace (ops._backward)."""
    if torch.jit.is_tracing():
        return False
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class LSTM(nn.RNNBase):
    r"""A drop-in replacement for :class:`torch.nn.LSTM`.

    Same constructor, parameters (names, shapes, order, initialisation), ``state_dict``, inputs and
    outputs as ``torch.nn.LSTM``; the computation runs in fused C++/CUDA kernels (``torch.ops.fused_lstm``).
    Beyond cuDNN it supports double backward, backward in eval mode, bitwise deterministic results and
    ``torch.compile(fullgraph=True)``.

    It subclasses :class:`torch.nn.RNNBase` (mode ``"LSTM"``), not ``torch.nn.LSTM``: Dynamo refuses to
    trace any ``nn.LSTM`` instance, so ``isinstance(m, torch.nn.LSTM)`` is ``False`` by design.

    Args: ``input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, proj_size=0, device=None, dtype=None`` — exactly as ``torch.nn.LSTM`` — plus the
    keyword-only ``recurrence``: ``"auto"`` (default), ``"standard"`` (a GEMM and a fused pointwise step per
    time step) or ``"persistent"`` (the whole sequence in one kernel: the persistent CUDA kernel, the CPU's
    fused recurrence; an error where it cannot run). It is not part of the state_dict.
    """

    @overload
    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *, recurrence: Recurrence = "auto") -> None: ...

    @overload
    def __init__(self, *args, **kwargs) -> None: ...

    def __init__(self, *args, recurrence: Recurrence = "auto", **kwargs):
        super().__init__("LSTM", *args, **kwargs)
        self.recurrence = _checked_recurrence(recurrence)

    def _get_name(self) -> str:
        """The repr says whose LSTM it is: ``fused_lstm.LSTM(512, 512, num_layers=2)``."""
        return "fused_lstm.LSTM" if type(self) is LSTM else super()._get_name()

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        return extra if self.recurrence == "auto" else f"{extra}, recurrence={self.recurrence!r}"

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script compiles this module's scriptable twin: the same attributes and parameters (shared,
        not copied), a forward in the subset of Python TorchScript compiles, with nn.LSTM's PackedSequence
        overload."""
        return _scriptable_twin(self, _ScriptableLSTM)

    # Shape checks and hidden-state permutation are torch.nn.LSTM's own, so errors read the same.
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def _zero_state(self, input: Tensor, batch: int) -> _HiddenState:
        layers = self.num_layers * (2 if self.bidirectional else 1)
        out_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        h = torch.zeros(layers, batch, out_hidden, dtype=input.dtype, device=input.device)
        c = torch.zeros(layers, batch, self.hidden_size, dtype=input.dtype, device=input.device)
        return h, c

    @overload
    def forward(self, input: Tensor, hx: Optional[_HiddenState] = None) -> Tuple[Tensor, _HiddenState]: ...

    @overload
    def forward(self, input: PackedSequence,
                hx: Optional[_HiddenState] = None) -> Tuple[PackedSequence, _HiddenState]: ...

    def forward(self, input, hx=None):
        """input: ``(L, N, H_in)``, ``(N, L, H_in)`` with ``batch_first``, ``(L, H_in)`` unbatched, or a
        ``PackedSequence``; hx: optional ``(h_0, c_0)``. Returns ``output, (h_n, c_n)`` as torch.nn.LSTM."""
        self._update_flat_weights()
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            # The batch size is the length of sorted_indices when there is one: a static size under
            # torch.compile, where batch_sizes[0] would be data-dependent.
            batch = sorted_indices.numel() if sorted_indices is not None else int(batch_sizes[0])
            if hx is None:
                hx = self._zero_state(data, batch)
            else:
                hx = self.permute_hidden(hx, sorted_indices)
            # torch.nn.LSTM skips these checks for packed input and fails inside its kernel; we check.
            self._check_packed_args(data, batch_sizes, batch, hx)
            output, hidden = self._run(data, batch_sizes, hx)
            return (PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices),
                    self.permute_hidden(hidden, unsorted_indices))

        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
        if hx is None:
            hx = self._zero_state(input, input.size(batch_dim))
        else:
            hx = _batched_state(hx, is_batched)
        self.check_forward_args(input, hx, None)
        if input.size(0 if not self.batch_first else 1) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        time_major = input.transpose(0, 1) if self.batch_first else input
        output, hidden = self._run(time_major, None, hx)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return output, hidden

    def _check_packed_args(self, data: Tensor, batch_sizes: Tensor, batch: int, hx: _HiddenState) -> None:
        """torch's check_forward_args for packed input, with the batch size given rather than read from
        batch_sizes (same messages)."""
        self.check_input(data, batch_sizes)
        layers = self.num_layers * (2 if self.bidirectional else 1)
        out_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        self.check_hidden_size(hx[0], (layers, batch, out_hidden), "Expected hidden[0] size {}, got {}")
        self.check_hidden_size(hx[1], (layers, batch, self.hidden_size), "Expected hidden[1] size {}, got {}")

    def _run(self, input: Tensor, batch_sizes: Optional[Tensor], hx: _HiddenState) -> Tuple[Tensor, _HiddenState]:
        """All layers. input: time-major [T, N, I] or packed [R, I]; hx: ([L*D, N, Hout], [L*D, N, H])."""
        weights: List[Tensor] = self._flat_weights  # type: ignore[assignment]
        _check_state(input, hx, weights[0])
        directions = 2 if self.bidirectional else 1
        per_layer = len(weights) // self.num_layers
        need_workspace = _needs_workspace([input, hx[0], hx[1], *weights])
        h_n, c_n = [], []
        layer_input = input
        for layer in range(self.num_layers):
            states = slice(layer * directions, (layer + 1) * directions)
            output, h, c, *_ = ops.lstm_layer(
                layer_input, batch_sizes, hx[0][states], hx[1][states],
                weights[layer * per_layer:(layer + 1) * per_layer],
                self.bias, self.proj_size > 0, self.bidirectional, need_workspace,
                self.recurrence,
            )
            h_n.append(h)
            c_n.append(c)
            if self.dropout > 0 and self.training and layer + 1 < self.num_layers:
                output = F.dropout(output, self.dropout, training=True)
            layer_input = output
        return layer_input, (torch.cat(h_n), torch.cat(c_n))


class LSTMCell(nn.RNNCellBase):
    r"""A drop-in replacement for :class:`torch.nn.LSTMCell`: same constructor
    (``input_size, hidden_size, bias=True, device=None, dtype=None``, plus the keyword-only ``recurrence``
    of :class:`LSTM`), parameters, inputs ((N, H_in) or (H_in)), optional ``(h_0, c_0)`` and outputs
    ``(h_1, c_1)``. One call of the ``fused_lstm::lstm_cell`` op (with ``recurrence="standard"`` or
    ``"persistent"``, a one-step call of the layer op on that path)."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 recurrence: Recurrence = "auto") -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)
        self.recurrence = _checked_recurrence(recurrence)

    def _get_name(self) -> str:
        return "fused_lstm.LSTMCell" if type(self) is LSTMCell else super()._get_name()

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script compiles this module's scriptable twin (see LSTM.__prepare_scriptable__)."""
        return _scriptable_twin(self, _ScriptableLSTMCell)

    def forward(self, input: Tensor, hx: Optional[_HiddenState] = None) -> _HiddenState:
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            hx = (zeros, zeros)
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        # Parameters straight from _parameters: Module.__getattr__ costs ~0.4 us each, a visible share of
        # a small cell's step.
        params = self._parameters
        w_ih, w_hh, b_ih, b_hh = params["weight_ih"], params["weight_hh"], params["bias_ih"], params["bias_hh"]
        self._check_forward(input, hx, w_ih)
        recurrence = self.recurrence
        if recurrence == "auto":
            h, c, _ = ops.lstm_cell(input, hx[0], hx[1], w_ih, w_hh, b_ih, b_hh)
        else:  # a path asked for by name: a one-step layer call, which honours it
            weights = [w_ih, w_hh, b_ih, b_hh] if self.bias else [w_ih, w_hh]
            need_workspace = _needs_workspace([input, hx[0], hx[1], *weights])
            _, h, c, *_ = ops.lstm_layer(input.unsqueeze(0), None, hx[0].unsqueeze(0), hx[1].unsqueeze(0), weights,
                                         self.bias, False, False, need_workspace, recurrence)
            h, c = h[0], c[0]
        if not is_batched:
            h, c = h.squeeze(0), c.squeeze(0)
        return h, c

    def _check_forward(self, input: Tensor, hx: _HiddenState, weight_ih: Tensor) -> None:
        """torch's own cell checks (same messages, in torch's order: shapes before dtypes), plus dtype and device."""
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}")
        expected = (input.size(0), self.hidden_size)
        if hx[0].shape != expected or hx[1].shape != expected:  # the common case skips the loop
            for label, state in enumerate(hx):
                if input.size(0) != state.size(0):
                    raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{label} batch size "
                                       f"{state.size(0)}")
                if state.size(1) != self.hidden_size:
                    raise RuntimeError(f"hidden{label} has inconsistent hidden_size: got {state.size(1)}, expected "
                                       f"{self.hidden_size}")
        if input.dtype != weight_ih.dtype and not _autocast_enabled(input):
            raise RuntimeError(f"mat1 and mat2 must have the same dtype, but got {_c10_name(input.dtype)} and "
                               f"{_c10_name(weight_ih.dtype)}")
        _check_state(input, hx, weight_ih)


def _scriptable_twin(module: nn.Module, twin_class: type) -> nn.Module:
    twin = twin_class.__new__(twin_class)
    twin.__dict__.update(module.__dict__)
    return twin


def _scripted_need_workspace(input: Tensor, hx: _HiddenState, weights: List[Tensor]) -> bool:
    if not torch.is_grad_enabled():
        return False
    need = input.requires_grad or hx[0].requires_grad or hx[1].requires_grad
    for w in weights:
        need = need or w.requires_grad
    return need


class _ScriptableLSTM(LSTM):
    """What ``torch.jit.script(fused_lstm.LSTM(...))`` compiles (LSTM.__prepare_scriptable__): LSTM.forward in
    the subset TorchScript compiles, calling the layer op directly, with nn.LSTM's two overloads (a tensor or a
    PackedSequence). Never instantiated by users."""

    @torch._jit_internal._overload_method  # noqa: F811
    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None  # noqa: F811
                ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        pass

    @torch._jit_internal._overload_method  # noqa: F811
    def forward(self, input: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]] = None  # noqa: F811
                ) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
        pass

    def forward(self, input, hx=None):  # noqa: F811
        self._update_flat_weights()
        orig_input = input
        # isinstance checks stay in conditionals so that TorchScript compiles each overload on its own.
        batch_sizes: Optional[Tensor] = None
        sorted_indices: Optional[Tensor] = None
        unsorted_indices: Optional[Tensor] = None
        is_batched = True
        batch_dim = 0 if self.batch_first else 1
        if isinstance(orig_input, PackedSequence):
            input, packed_sizes, sorted_indices, unsorted_indices = input
            batch_sizes = packed_sizes
            batch = sorted_indices.numel() if sorted_indices is not None else int(packed_sizes[0])
            if hx is None:
                hx = self._zero_state(input, batch)
            else:
                hx = self.permute_hidden(hx, sorted_indices)
            self._check_packed_args(input, packed_sizes, batch, hx)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            if hx is None:
                hx = self._zero_state(input, input.size(batch_dim))
            else:
                hx = _batched_state(hx, is_batched)
            self.check_forward_args(input, hx, None)
            if input.size(0 if not self.batch_first else 1) == 0:
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
            if self.batch_first:
                input = input.transpose(0, 1)
        output, hidden = self._run_layers(input, batch_sizes, hx)
        if isinstance(orig_input, PackedSequence):
            assert batch_sizes is not None
            return (PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices),
                    self.permute_hidden(hidden, unsorted_indices))
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return output, hidden

    def _run_layers(self, input: Tensor, batch_sizes: Optional[Tensor],
                    hx: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """LSTM._run: input time-major [T, N, I] or packed [R, I]."""
        weights: List[Tensor] = self._flat_weights
        _check_state(input, hx, weights[0])
        directions = 2 if self.bidirectional else 1
        per_layer = len(weights) // self.num_layers
        need_workspace = _scripted_need_workspace(input, hx, weights)
        h_n: List[Tensor] = []
        c_n: List[Tensor] = []
        layer_input = input
        for layer in range(self.num_layers):
            start = layer * directions
            output, h, c, _, _, _ = torch.ops.fused_lstm.lstm_layer(
                layer_input, batch_sizes, hx[0][start:start + directions], hx[1][start:start + directions],
                weights[layer * per_layer:(layer + 1) * per_layer], self.bias, self.proj_size > 0,
                self.bidirectional, need_workspace, self.recurrence)
            h_n.append(h)
            c_n.append(c)
            if self.dropout > 0 and self.training and layer + 1 < self.num_layers:
                output = F.dropout(output, self.dropout, training=True)
            layer_input = output
        return layer_input, (torch.cat(h_n), torch.cat(c_n))


class _ScriptableLSTMCell(LSTMCell):
    """What ``torch.jit.script(fused_lstm.LSTMCell(...))`` compiles (LSTMCell.__prepare_scriptable__)."""

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            hx = (zeros, zeros)
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        self._check_forward(input, hx, self.weight_ih)
        if self.recurrence == "auto":
            h, c, _ = torch.ops.fused_lstm.lstm_cell(input, hx[0], hx[1], self.weight_ih, self.weight_hh,
                                                     self.bias_ih, self.bias_hh)
        else:
            weights = [self.weight_ih, self.weight_hh]
            b_ih, b_hh = self.bias_ih, self.bias_hh
            if b_ih is not None and b_hh is not None:
                weights = [self.weight_ih, self.weight_hh, b_ih, b_hh]
            _, h, c, _, _, _ = torch.ops.fused_lstm.lstm_layer(
                input.unsqueeze(0), None, hx[0].unsqueeze(0), hx[1].unsqueeze(0), weights, self.bias, False, False,
                _scripted_need_workspace(input, hx, weights), self.recurrence)
            h, c = h[0], c[0]
        if not is_batched:
            h, c = h.squeeze(0), c.squeeze(0)
        return h, c


_TORCH_TO_FUSED = {nn.LSTM: LSTM, nn.LSTMCell: LSTMCell}
_FUSED_TO_TORCH = {LSTM: nn.LSTM, LSTMCell: nn.LSTMCell}


def _constructor_args(module: nn.Module) -> dict:
    if isinstance(module, (nn.LSTM, LSTM)):
        return dict(input_size=module.input_size, hidden_size=module.hidden_size, num_layers=module.num_layers,
                    bias=module.bias, batch_first=module.batch_first, dropout=module.dropout,
                    bidirectional=module.bidirectional, proj_size=module.proj_size)
    return dict(input_size=module.input_size, hidden_size=module.hidden_size, bias=module.bias)


def _swap(module: nn.Module, target: type) -> nn.Module:
    param = next(module.parameters())
    new = target(**_constructor_args(module), device=param.device, dtype=param.dtype)
    new.load_state_dict(module.state_dict(), strict=True)
    for (_, p_new), (_, p_old) in zip(new.named_parameters(), module.named_parameters()):
        p_new.requires_grad_(p_old.requires_grad)
    new.train(module.training)
    return new


def convert(module: nn.Module, back: bool = False) -> nn.Module:
    """Replace every ``torch.nn.LSTM`` / ``torch.nn.LSTMCell`` inside ``module`` (or ``module`` itself)
    with ``fused_lstm.LSTM`` / ``fused_lstm.LSTMCell`` — weights, device, dtype, ``requires_grad`` and
    train/eval mode included — and return the model. ``back=True`` does the reverse. Children are
    replaced in place; hooks registered on the replaced modules are not carried over."""
    mapping = _FUSED_TO_TORCH if back else _TORCH_TO_FUSED
    target = mapping.get(type(module))
    if target is not None:
        return _swap(module, target)
    for name, child in module.named_children():
        converted = convert(child, back=back)
        if converted is not child:
            setattr(module, name, converted)
    return module


# --- torch.ao.quantization --------------------------------------------------------------------------------------
# quantize_dynamic(model, {nn.LSTM}) quantizes torch.nn.LSTM / nn.LSTMCell by exact type, so it would silently
# leave fused_lstm's modules in float. It hands its qconfig to propagate_qconfig_ (looked up in its module at call
# time, however quantize_dynamic itself was imported), which we wrap to warn once.
_quantization_warned = False


def _warn_if_left_unquantized(module: nn.Module, qconfig_dict) -> None:
    global _quantization_warned
    if _quantization_warned or not isinstance(qconfig_dict, dict):
        return
    if all(qconfig_dict.get(t) is None for t in (nn.LSTM, nn.LSTMCell)):
        return
    left = [f"{name or '<model>'}: fused_lstm.{type(m).__name__}" for name, m in module.named_modules()
            if type(m) in (LSTM, LSTMCell) and type(m) not in qconfig_dict and name not in qconfig_dict]
    if left:
        _quantization_warned = True
        shown = ", ".join(left[:4]) + (", ..." if len(left) > 4 else "")
        plural = "s" if len(left) > 1 else ""
        warnings.warn(f"fused_lstm: this quantization leaves {len(left)} fused_lstm module{plural} in float "
                      f"({shown}): torch.ao.quantization quantizes torch.nn.LSTM / nn.LSTMCell only. Call "
                      "fused_lstm.convert(model, back=True) first to quantize them.", UserWarning, stacklevel=5)


def _install_quantization_warning() -> None:
    try:
        quantize = importlib.import_module("torch.ao.quantization.quantize")
        original = quantize.propagate_qconfig_
    except (ImportError, AttributeError):  # a torch without it: nothing to warn about
        return
    if getattr(original, "_fused_lstm_wrapped", False):
        return

    @functools.wraps(original)
    def propagate_qconfig_(module, qconfig_dict=None, *args, **kwargs):
        _warn_if_left_unquantized(module, qconfig_dict)
        return original(module, qconfig_dict, *args, **kwargs)

    propagate_qconfig_._fused_lstm_wrapped = True  # type: ignore[attr-defined]
    quantize.propagate_qconfig_ = propagate_qconfig_


_install_quantization_warning()
