"""The harness shared by the GPU tests (test_cuda.py, test_persistent.py): a case of module arguments and input
presentation, fresh random inputs for it, forward + backward of a module on them, and the accuracy check.

Accuracy is judged against a float64 CPU ``torch.nn.LSTM`` with the same weights: our max abs error must stay
within twice the error of ``torch.nn.LSTM`` on the device (cuDNN) in the same dtype, plus a small per-dtype
floor scaled by the reference's magnitude. Nothing here needs a GPU: every function takes the device.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

# Floor of the tolerance, relative to max(1, max |reference|): room for rounding the two implementations
# do in different places (about two units in the last place of the storage dtype for fp16 / bf16).
FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,  # strict FP32 (the tests turn TF32 off for both implementations)
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One point of the feature product: module arguments plus how the input is presented."""

    name: str
    input_size: int = 7
    hidden_size: int = 33  # not a multiple of any slice or vector width
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = False
    bidirectional: bool = False
    proj_size: int = 0
    batch: int = 5
    steps: int = 6
    packed: bool = False  # PackedSequence of unsorted lengths, enforce_sorted=False
    unbatched: bool = False
    with_hx: bool = True
    noncontiguous: bool = False  # the input is a slice of a larger tensor

    def module_kwargs(self) -> dict:
        return dict(input_size=self.input_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
                    bias=self.bias, batch_first=self.batch_first, bidirectional=self.bidirectional,
                    proj_size=self.proj_size)

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def out_hidden(self) -> int:
        return self.proj_size or self.hidden_size


@dataclasses.dataclass
class Inputs:
    """Everything random about one run, in the storage dtype, on the CPU; moved per implementation."""

    state_dict: Dict[str, torch.Tensor]
    x: torch.Tensor  # padded input in the module's layout (unbatched: 2-D)
    lengths: Optional[torch.Tensor]  # [N] int64 CPU, unsorted, for packed cases
    h0: Optional[torch.Tensor]
    c0: Optional[torch.Tensor]
    grad_output: torch.Tensor
    grad_h_n: torch.Tensor
    grad_c_n: torch.Tensor


def make_inputs(case: Case, dtype: torch.dtype, seed: Optional[int] = None) -> Inputs:
    """Fresh inputs every run: the seed comes from the global generator, which conftest.py reseeds per test
    (and records in the test report), unless a test pins one."""
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    torch.manual_seed(seed)
    state_dict = {k: v.to(dtype) for k, v in nn.LSTM(**case.module_kwargs()).state_dict().items()}
    T, N, D = case.steps, case.batch, case.directions
    states = case.num_layers * D
    if case.unbatched:
        x = randn(T, case.input_size)
        out_shape = (T, D * case.out_hidden)
        h_shape, c_shape = (states, case.out_hidden), (states, case.hidden_size)
    else:
        x = randn(N, T, case.input_size) if case.batch_first else randn(T, N, case.input_size)
        out_shape = (N, T, D * case.out_hidden) if case.batch_first else (T, N, D * case.out_hidden)
        h_shape, c_shape = (states, N, case.out_hidden), (states, N, case.hidden_size)
    lengths = None
    if case.packed:
        lengths = torch.randint(1, T + 1, (N,), generator=gen)
        lengths[torch.randint(0, N, (1,), generator=gen)] = T
        if N > 1 and bool((lengths[1:] <= lengths[:-1]).all()):
            lengths = lengths.flip(0)  # make sure the lengths are not sorted
    grad_output = randn(*out_shape)
    if lengths is not None:  # padded positions of the output are not outputs
        steps = torch.arange(T).unsqueeze(1 if not case.batch_first else 0)
        valid = steps < (lengths.unsqueeze(0) if not case.batch_first else lengths.unsqueeze(1))
        grad_output = grad_output * valid.unsqueeze(-1).to(dtype)
    h0 = randn(*h_shape) if case.with_hx else None
    c0 = randn(*c_shape) if case.with_hx else None
    return Inputs(state_dict, x, lengths, h0, c0, grad_output, randn(*h_shape), randn(*c_shape))


def build(cls, case: Case, inputs: Inputs, device, dtype) -> nn.Module:
    """A `cls` module (torch.nn.LSTM or fused_lstm.LSTM) of `case` on (device, dtype) with the inputs' weights."""
    module = cls(**case.module_kwargs(), device=device, dtype=dtype)
    module.load_state_dict(inputs.state_dict)
    return module


def run(module: nn.Module, case: Case, inputs: Inputs, device, dtype,
        backward: bool = True) -> Dict[str, torch.Tensor]:
    """Forward (and backward) of `module` on `inputs` moved to (device, dtype); returns outputs (and grads)."""

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype, copy=True).requires_grad_(backward)

    if case.noncontiguous:
        # The same values, stored as a strided slice of a larger tensor: padding on every side.
        big = torch.full([s + 3 for s in inputs.x.shape], float("nan"), device=device, dtype=dtype)
        view = big[tuple(slice(1, 1 + s) for s in inputs.x.shape)]
        view.copy_(inputs.x.to(device=device, dtype=dtype))
        x = view.requires_grad_(backward)
        assert not x.is_contiguous()
    else:
        x = leaf(inputs.x)
    hx = (leaf(inputs.h0), leaf(inputs.c0)) if case.with_hx else None
    module_input = x
    if case.packed:
        module_input = pack_padded_sequence(x, inputs.lengths, batch_first=case.batch_first, enforce_sorted=False)
    with torch.set_grad_enabled(backward):
        output, (h_n, c_n) = module(module_input, hx)
    if case.packed:
        output, _ = pad_packed_sequence(output, batch_first=case.batch_first, total_length=case.steps)
    result = {"output": output, "h_n": h_n, "c_n": c_n}
    if backward:
        targets = (inputs.grad_output, inputs.grad_h_n, inputs.grad_c_n)
        loss = sum((t.double() * g.to(device=device, dtype=torch.float64)).sum()
                   for t, g in zip((output, h_n, c_n), targets))
        loss.backward()
        result["grad_input"] = x.grad
        if case.with_hx:
            result.update(grad_h0=hx[0].grad, grad_c0=hx[1].grad)
        for name, p in getattr(module, "_orig_mod", module).named_parameters():  # torch.compile'd: the original
            result[f"grad_{name}"] = p.grad
    return {k: v.detach() for k, v in result.items()}


def build_and_run(cls, case: Case, inputs: Inputs, device, dtype, backward: bool = True) -> Dict[str, torch.Tensor]:
    """`run` on a fresh `build` of `cls`."""
    return run(build(cls, case, inputs, device, dtype), case, inputs, device, dtype, backward)


def max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    if reference.numel() == 0:
        return 0.0
    return (value.detach().double().cpu() - reference).abs().max().item()


def check_against_reference(ours: Dict[str, torch.Tensor], theirs: Dict[str, torch.Tensor],
                            reference: Dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Our error vs the float64 reference <= 2 x torch's (cuDNN's) error + floor, for every output and gradient."""
    assert ours.keys() == reference.keys() == theirs.keys()
    failures = []
    for name, ref in reference.items():
        ref = ref.double().cpu()
        assert ours[name].shape == ref.shape, name
        assert ours[name].dtype == dtype, name
        err_ours, err_theirs = max_error(ours[name], ref), max_error(theirs[name], ref)
        scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
        bound = 2 * err_theirs + FLOOR[dtype] * scale
        if not err_ours <= bound:  # also catches NaN
            failures.append(f"{name}: error {err_ours:.3g} > bound {bound:.3g} (torch.nn.LSTM: {err_theirs:.3g})")
    assert not failures, "\n".join(failures)


class fp32_precision:
    """Sets whether cuDNN RNNs (and so fused_lstm's cuBLAS calls and the persistent kernels' float32 tensor-core
    variant, which follow the same switch) may use TF32."""

    def __init__(self, allow_tf32: bool) -> None:
        self.allow_tf32 = allow_tf32

    def __enter__(self) -> None:
        rnn = getattr(torch.backends.cudnn, "rnn", None)
        if rnn is not None and hasattr(rnn, "fp32_precision"):
            self.saved = ("rnn", rnn.fp32_precision)
            rnn.fp32_precision = "tf32" if self.allow_tf32 else "ieee"
        else:
            self.saved = ("legacy", torch.backends.cudnn.allow_tf32)
            torch.backends.cudnn.allow_tf32 = self.allow_tf32

    def __exit__(self, *exc) -> None:
        kind, value = self.saved
        if kind == "rnn":
            torch.backends.cudnn.rnn.fp32_precision = value
        else:
            torch.backends.cudnn.allow_tf32 = value


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of `t` stored another way: "transposed_view" (a 2-D tensor as the transpose of its
    contiguous transpose: column-major) or "strided_slice" (every other element of a NaN-padded larger
    tensor along the last dimension)."""
    if layout == "transposed_view":
        out = t.t().contiguous().t() if t.dim() == 2 else t
    else:
        assert layout == "strided_slice", layout
        big = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), device=t.device, dtype=t.dtype)
        big[..., ::2] = t
        out = big[..., ::2]
    assert torch.equal(out, t) and (t.dim() == 1 and layout == "transposed_view" or not out.is_contiguous())
    return out
