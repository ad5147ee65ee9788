"""Correctness gate: a shape is only timed if the candidate agrees with torch.

Each compared tensor passes when ``max|candidate - torch| <= atol + rtol * max|torch|``,
i.e. the tolerance scales with the tensor's magnitude (weight gradients summed over
many tokens are large; h is bounded by 1). Compared: ``output``, ``h_n``, ``c_n``
and, for modes that train, the input gradient and every weight gradient (matched
by parameter name).

In bf16 and fp16 torch itself can be far from the exact answer (torch.nn.LSTM's bf16
backward on the CPU at H=1024 is off by more than the gradient's own size), so a half-precision
tensor that misses torch's is judged against a float64 run of the same model and input: it
passes if it is within tolerance of float64 and no further from it than torch's, and the row
says so.

Under autocast (the ``autocast-*`` precisions) the two may return different dtypes: torch.nn.LSTMCell on the CPU
returns float32 from a float32 state (its decomposed step promotes), fused_lstm.LSTMCell the autocast dtype, as
torch.nn.LSTM and CUDA's LSTMCell do. There values are compared whatever their dtypes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from torch.nn.utils.rnn import PackedSequence

from .inputs import InputSet, as_data
from .shapes import compute_precision
from .workloads import Outputs, backward, forward


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Relative and absolute tolerance, both scaled as described in the module doc."""

    rtol: float
    atol: float


#: Default tolerances. ``tf32`` is used for fp32 on CUDA when cuDNN may use TF32.
TOLERANCES: Dict[str, Tolerance] = {
    "fp32": Tolerance(1e-4, 1e-4),
    "tf32": Tolerance(5e-3, 5e-3),
    "bf16": Tolerance(4e-2, 4e-2),
    "fp16": Tolerance(1e-2, 1e-2),
}


def cudnn_may_use_tf32() -> bool:
    """Whether torch's cuDNN RNN may run fp32 math in TF32 (the default on Ampere+)."""
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    precision = getattr(rnn, "fp32_precision", None)
    if precision is not None and precision != "none":
        return precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def tolerance_for(dtype_name: str, device: torch.device,
                  override: Optional[Tolerance] = None) -> Tolerance:
    """Tolerance for precision ``dtype_name`` on ``device`` (``override`` wins)."""
    if override is not None:
        return override
    if dtype_name == "fp32" and device.type == "cuda" and cudnn_may_use_tf32():
        return TOLERANCES["tf32"]
    return TOLERANCES[compute_precision(dtype_name)]


@dataclasses.dataclass(frozen=True)
class TensorCheck:
    """How far one candidate tensor is from torch's."""

    name: str
    max_abs: float
    limit: float
    note: str = ""

    @property
    def ok(self) -> bool:
        """Within tolerance."""
        return self.max_abs <= self.limit

    @property
    def ratio(self) -> float:
        """Error as a fraction of the allowed error (> 1 fails)."""
        if self.max_abs == 0:
            return 0.0
        return self.max_abs / self.limit if self.limit > 0 else math.inf


@dataclasses.dataclass(frozen=True)
class GateResult:
    """Outcome of comparing candidate and torch on one input set."""

    checks: Tuple[TensorCheck, ...]

    @property
    def ok(self) -> bool:
        """All tensors within tolerance."""
        return all(c.ok for c in self.checks)

    @property
    def worst(self) -> TensorCheck:
        """The tensor closest to (or furthest past) its limit."""
        return max(self.checks, key=lambda c: c.ratio)

    @property
    def arbitrated(self) -> str:
        """For a passing gate whose tensors were judged against float64: which, and how far torch was."""
        off = [f"{c.name} {c.note}" for c in self.checks if c.ok and c.note]
        return f"judged vs float64; torch.nn.LSTM off it by {', '.join(off)}" if off else ""

    def summary(self) -> str:
        """One line: worst tensor, its error and its limit."""
        w = self.worst
        note = f" ({w.note})" if w.note else ""
        return f"{w.name} max|err|={w.max_abs:.3g} limit={w.limit:.3g}{note}"


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance,
            same_dtype: bool = True) -> TensorCheck:
    """Scaled max-error check of ``actual`` against ``expected`` (same shape, and same dtype unless not
    ``same_dtype``)."""
    work = torch.promote_types(expected.dtype, torch.float32)
    ref = expected.detach().to(work)
    limit = tol.atol + tol.rtol * (float(ref.abs().max()) if ref.numel() else 0.0)
    if actual.shape != expected.shape:
        return TensorCheck(name, math.inf, limit, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if same_dtype and actual.dtype != expected.dtype:
        return TensorCheck(name, math.inf, limit, f"dtype {actual.dtype} != {expected.dtype}")
    if not ref.numel():
        return TensorCheck(name, 0.0, limit)
    err = float((actual.detach().to(work) - ref).abs().max())
    return TensorCheck(name, math.inf if math.isnan(err) else err, limit)


def _compare_all(names: Sequence[str], actual: Sequence[torch.Tensor],
                 expected: Sequence[torch.Tensor], tol: Tolerance, same_dtype: bool = True) -> List[TensorCheck]:
    return [compare(n, a, e, tol, same_dtype) for n, a, e in zip(names, actual, expected)]


_OUTPUT_NAMES = ("output", "h_n", "c_n")


def _run(model: torch.nn.Module, inp: InputSet, grads: bool,
         names: Sequence[str]) -> Tuple[Outputs, Tuple[torch.Tensor, ...]]:
    """Outputs, and with ``grads`` the gradients of the input (unless it is data) and of ``names``."""
    model.train(grads)
    if not grads:
        with torch.no_grad():
            return forward(model, inp), ()
    params = dict(model.named_parameters())
    outputs = forward(model, inp)
    return outputs, backward(outputs, inp, [params[n] for n in names])


def check_pair(reference: torch.nn.Module, candidate: torch.nn.Module, inp: InputSet,
               grads: bool, tol: Tolerance, data_input: bool = False, autocast: bool = False) -> GateResult:
    """Compare ``candidate`` with ``reference`` on ``inp``.

    With ``grads=False`` both run as in ``infer`` (eval, no_grad); with ``grads=True``
    as in training, and the input and weight gradients are compared too (only the weight
    gradients with ``data_input``, which runs the input as data, as ``train_weights`` does).
    ``autocast``: the modules run under autocast, and their output dtypes may differ (module doc).
    """
    if data_input:
        inp = as_data(inp)
    names = [n for n, _ in reference.named_parameters()]
    cand_names = {n for n, _ in candidate.named_parameters()}
    if grads and set(names) != cand_names:
        missing = sorted(set(names) ^ cand_names)
        return GateResult((TensorCheck("parameters", math.inf, 0.0, f"names differ: {missing}"),))
    ref_out, ref_grads = _run(reference, inp, grads, names)
    cand_out, cand_grads = _run(candidate, inp, grads, names)
    checks = _compare_all(_OUTPUT_NAMES, cand_out, ref_out, tol, same_dtype=not autocast)
    grad_names = ([] if data_input else ["grad_input"]) + [f"grad_{n}" for n in names]
    checks += _compare_all(grad_names, cand_grads, ref_grads, tol)
    if all(c.ok for c in checks) or (not autocast and ref_out[0].dtype not in (torch.bfloat16, torch.float16)):
        return GateResult(tuple(checks))
    exact_out, exact_grads = _run(copy.deepcopy(reference).double(), _in_float64(inp), grads, names)
    exact = [*exact_out, *exact_grads]
    refs, cands = [*ref_out, *ref_grads], [*cand_out, *cand_grads]
    return GateResult(tuple(c if c.ok else _against_float64(c, a, r, e, tol)
                            for c, a, r, e in zip(checks, cands, refs, exact)))


def _in_float64(inp: InputSet) -> InputSet:
    """The same call in float64 (the input gradient taken, or not, as in ``inp``)."""
    leaf = inp.leaf.detach().double().requires_grad_(inp.leaf.requires_grad)
    x = inp.x._replace(data=leaf) if isinstance(inp.x, PackedSequence) else leaf
    hx = (inp.hx[0].double(), inp.hx[1].double())
    grad_outputs = tuple(g.double() for g in inp.grad_outputs)
    return InputSet(x, leaf, hx, grad_outputs)  # type: ignore[arg-type]


def _against_float64(check: TensorCheck, actual: torch.Tensor, reference: torch.Tensor, exact: torch.Tensor,
                     tol: Tolerance) -> TensorCheck:
    """``check`` (candidate vs torch, failed) judged against the float64 result instead."""
    fused_err = compare(check.name, actual.double(), exact, tol)
    torch_err = float((reference.detach().double() - exact).abs().max())
    if fused_err.ok and fused_err.max_abs <= torch_err:
        return TensorCheck(check.name, fused_err.max_abs, fused_err.limit, f"{torch_err:.3g}")
    return check
