"""``fused_lstm.explain(module, input)``: which CPU path and kernels a call would run, layer by layer and direction
by direction, and why.

It walks a layer as the driver does (``csrc/lstm_layer.cpp``: the fused recurrence if the backend takes it, else
the input projection, the recurrence hook again, else the per-step loop; backward likewise) and asks the CPU
planner (``csrc/cpu/cpu_plan.h``, through ``fused_lstm._C.cpu_plan_*``) at each decision, with the operand
strides the driver passes. Nothing is computed: the plan is that of a call made now, on this machine, with
this thread count (or for the ``machine`` given).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from . import _C

__all__ = ["explain", "Plan"]


class Plan(dict):
    """The plan as a dict (``machine``, ``layers``: one entry per layer with ``forward`` and ``backward`` per
    direction); ``str()`` gives it as readable text."""

    def __str__(self) -> str:
        m = self["machine"]
        lines = [f"fused_lstm CPU plan: {m['kernels']} kernels (bfloat16: {m.get('bf16_kernels', 'aten')}), "
                 f"{m['threads']} threads, L2 {m['l2_bytes'] >> 10} KiB "
                 f"({m['l2_source']}), L3 {m['l3_bytes'] >> 10} KiB ({m['l3_source']}); {self['shape']}"]
        for layer in self["layers"]:
            lines.append(f"layer {layer['layer']}: {layer['shape']}")
            for d, direction in enumerate(layer["directions"]):
                for phase in ("forward", "backward"):
                    step = direction.get(phase)
                    if step is None:
                        continue
                    lines.append(f"  direction {d} {phase}: {step['path']} ({step['reason']})")
                    for product in step["products"]:
                        lines.append(f"    {_describe(product)}")
        return "\n".join(lines)


def _describe(product: Dict[str, Any]) -> str:
    kernels = ", ".join(f"{kernel} x{count}" for kernel, count in product["kernels"].items())
    schedule = f"; {product['schedule']}" if product.get("schedule") else ""
    return f"{product['name']} [{product['shape']}]: {kernels}{schedule} ({product['reason']})"


class _Products:
    """The backend's per-call memory (which right operands it packed or read in place, csrc/cpu/lstm_cpu.cpp)
    and the products planned so far, merged by name."""

    def __init__(self, vector_kernels: bool, machine: Optional[Dict[str, int]], bf16_kernels: Optional[str] = None):
        self.vector_kernels = vector_kernels
        # bfloat16 products on a CPU with a bfloat16 kernel (csrc/cpu/bf16_dot_gemm.h); None: not bfloat16
        self.bf16_dot = bf16_kernels not in (None, "aten")
        self.bf16_amx = bf16_kernels == "amx"  # ... whose kernel is AMX
        self.machine = machine
        self.packed: set = set()
        self.in_place: set = set()

    def plan(self, out: List[Dict[str, Any]], name: str, key: Any, rows: int, depth: int, cols: int,
             a_strides: Sequence[int], b_strides: Sequence[int], out_unit_stride: bool = True) -> None:
        if rows == 0:
            return
        vector = self.vector_kernels and out_unit_stride
        plan = _C.cpu_plan_product(
            rows, depth, cols, vector_kernels=vector, a_rows_contiguous=a_strides[1] == 1,
            a_transposed=a_strides[0] == 1, b_is_w_transposed=b_strides[0] == 1, b_rows_contiguous=b_strides[1] == 1,
            b_packed_before=vector and key in self.packed, b_in_place_before=vector and key in self.in_place,
            bf16_dot_kernels=self.bf16_dot and out_unit_stride, bf16_amx=self.bf16_amx and out_unit_stride,
            machine=self.machine)
        if plan["first_in_place_use"]:
            self.in_place.add(key)
        if plan["kernel"] == "packed":
            self.packed.add(key)
        entry = next((p for p in out if p["name"] == name), None)
        if entry is None:
            entry = {"name": name, "shape": f"{rows} x {depth} @ {depth} x {cols}", "kernels": {}, "reason": "",
                     "schedule": ""}
            out.append(entry)
        entry["kernels"][plan["kernel"]] = entry["kernels"].get(plan["kernel"], 0) + 1
        entry["reason"] = plan["reason"]
        if plan.get("schedule"):
            entry["schedule"] = f"{plan['schedule']}, {plan['tasks']} tasks"


def _carried_rows(step_rows: List[int], t: int, reverse: bool, need_h0_grad: bool) -> int:
    # csrc/lstm_layer.h, carried_rows: the rows whose dh the step's product passes on.
    if need_h0_grad:
        return step_rows[t]
    if not reverse:
        return step_rows[t] if t > 0 else 0
    return step_rows[t + 1] if t + 1 < len(step_rows) else 0


def _layer_plan(step_rows: List[int], I: int, H: int, Hout: int, D: int, dtype: torch.dtype, projection: bool,
                recurrence: str, training: bool, need_input_grad: bool, need_weight_grads: bool,
                need_h0_grad: bool, vector_kernels: bool, machine: Optional[Dict[str, int]]) -> Dict[str, Any]:
    N, R, T = step_rows[0], sum(step_rows), len(step_rows)
    float32 = dtype == torch.float32
    bf16_kernels = (machine or {}).get("bf16_kernels") or _C.cpu_machine()["bf16_kernels"]
    bf16_products = bf16_kernels if dtype == torch.bfloat16 and vector_kernels else None
    products = _Products(vector_kernels and float32, machine, bf16_products)
    directions: List[Dict[str, Any]] = []
    for d in range(D):
        reverse = d == 1
        order = list(range(T - 1, -1, -1)) if reverse else list(range(T))
        fwd: Dict[str, Any] = {"products": []}
        plan = None
        if recurrence != "standard" and dtype == torch.bfloat16:
            # csrc/cpu/bf16_recurrence.h: after the driver's input projection, W_hh packed into VNNI pairs.
            plan = _C.cpu_plan_bf16_forward(N, H, I, R, out_hidden=Hout, projection=projection,
                                            required=recurrence == "persistent", machine=machine)
            fwd["recurrence"] = plan
            if plan["fused"]:
                products.plan(fwd["products"], "input projection x @ W_ih^T", ("w_ih^T", d), R, I, 4 * H, (I, 1),
                              (1, I))
                fwd["path"] = f"fused recurrence, bfloat16 {plan['kernel']}"
                fwd["reason"] = (f"{plan['reason']}; {plan['threads']} threads, input projection in chunks of "
                                 f"{plan['chunk_steps']} steps")
                directions.append({"forward": fwd})
                continue
        elif recurrence != "standard":
            plan = _C.cpu_plan_forward(N, H, I, R, out_hidden=Hout, float32=float32, projection=projection,
                                       vector_kernels=vector_kernels, required=recurrence == "persistent",
                                       machine=machine)
            fwd["recurrence"] = plan
        if plan is not None and plan["fused"] and not plan["in_place"]:
            fwd["path"] = "fused recurrence, weights packed"
            reason = plan["reason"].replace("chunks of steps", f"chunks of {plan['chunk_steps']} steps")
            fwd["reason"] = f"{reason}; {plan['threads']} threads"
        else:
            # The driver's input projection: gates [R, 4H] = input [R, I] @ W_ih^T.
            products.plan(fwd["products"], "input projection x @ W_ih^T", ("w_ih^T", d), R, I, 4 * H, (I, 1), (1, I))
            if plan is not None and plan["fused"]:
                fwd["path"] = "fused recurrence, W_hh read in place"
                fwd["reason"] = f"{plan['reason']}; {plan['threads']} threads"
            else:
                fwd["path"] = "per-step loop"
                fwd["reason"] = plan["reason"] if plan is not None else "recurrence='standard'"
                for t in order:
                    rows = step_rows[t]
                    products.plan(fwd["products"], "recurrent product h @ W_hh^T per step", ("w_hh^T", d), rows,
                                  Hout, 4 * H, (Hout, 1), (1, Hout))
                    if projection and rows:
                        products.plan(fwd["products"], "projection h' @ W_hr^T per step", ("w_hr^T", d), rows, H,
                                      Hout, (H, 1), (1, H))
        directions.append({"forward": fwd})
    if not training:
        return {"directions": directions}
    # The backward (one op call, its own backend: a fresh memory of operands).
    products = _Products(vector_kernels and float32, machine, bf16_products)
    for d in range(D):
        reverse = d == 1
        bwd: Dict[str, Any] = {"products": []}
        if dtype == torch.bfloat16:  # csrc/cpu/bf16_recurrence.h
            plan = _C.cpu_plan_bf16_backward(N, H, R, projection=projection, machine=machine)
        else:
            plan = _C.cpu_plan_backward(N, H, R, float32=float32, projection=projection,
                                        vector_kernels=vector_kernels, machine=machine)
        bwd["recurrence"] = plan
        if plan["fused"] and dtype == torch.bfloat16:
            bwd["path"] = f"fused backward recurrence, bfloat16 {plan['kernel']}"
            bwd["reason"] = f"{plan['reason']}; {plan['threads']} threads"
        elif plan["fused"]:
            bwd["path"] = "fused backward recurrence"
            bwd["reason"] = f"{plan['reason']}; {plan['threads']} threads, {plan['k_chunks']} k chunks"
        else:
            bwd["path"] = "per-step loop"
            bwd["reason"] = plan["reason"]
            for step in range(T):
                t = step if reverse else T - 1 - step
                rows = step_rows[t]
                if rows == 0:
                    continue
                if projection:
                    products.plan(bwd["products"], "dh through W_hr per step", ("w_hr", d), rows, Hout, H, (Hout, 1),
                                  (H, 1))
                carried = _carried_rows(step_rows, t, reverse, need_h0_grad)
                if carried:
                    products.plan(bwd["products"], "d_gates @ W_hh per step", ("w_hh", d), carried, 4 * H, Hout,
                                  (4 * H, 1), (Hout, 1))
        if need_weight_grads:
            wplan = _C.cpu_plan_weight_gradients(H, R, I, out_hidden=Hout, vector_kernels=vector_kernels and float32,
                                                 machine=machine)
            if wplan["packed"]:
                products.packed.update({("input",), ("h_prev", d)})
                bwd["products"].append({"name": "weight gradients d_gates^T @ [x, h_prev]",
                                        "shape": f"{4 * H} x {R} @ {R} x [{I}, {Hout}]",
                                        "kernels": {"packed": 1},
                                        "schedule": f"gather_rows, {wplan['passes']} pass(es)",
                                        "reason": wplan["reason"]})
            else:
                products.plan(bwd["products"], "weight gradient d_gates^T @ x", ("input",), 4 * H, R, I, (1, 4 * H),
                              (I, 1))
                products.plan(bwd["products"], "weight gradient d_gates^T @ h_prev", ("h_prev", d), 4 * H, R, Hout,
                              (1, 4 * H), (Hout, 1))
            if projection:
                products.plan(bwd["products"], "weight gradient dh^T @ h'", ("h_next", d), Hout, R, H, (1, Hout),
                              (H, 1))
        directions[d]["backward"] = bwd
    if need_input_grad:
        for d in range(D):
            products.plan(directions[d]["backward"]["products"], "input gradient d_gates @ W_ih", ("w_ih", d), R,
                          4 * H, I, (4 * H, 1), (I, 1))
    return {"directions": directions}


def _needs_grad(tensors: Sequence[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def explain(module: torch.nn.Module, input, hx=None, *, machine: Optional[Dict[str, int]] = None) -> Plan:
    """What ``module(input, hx)`` would run on the CPU: per layer and direction, the forward path (fused
    recurrence, packed or with W_hh read in place, and its thread split and projection schedule; or the
    per-step loop), the backward path when the call would keep a workspace for training, and each matrix
    product's kernel (``dot``, ``rowmajor``, ``packed`` with its schedule, ``bf16_amx``, ``bf16_amx_rowmajor``,
    ``bf16_dot``, ``bf16_rowmajor``, ``aten``) with counts and the planner's reason.

    module: a ``fused_lstm.LSTM`` (or ``torch.nn.LSTM``, planned as fused_lstm would run it); input as the
    module takes it (dense, batch_first or not, unbatched, or a ``PackedSequence``). ``machine`` (a dict of
    ``threads``, ``row_tile``, ``l2_bytes``, ``l3_bytes``) plans for another CPU. Returns a :class:`Plan`;
    ``print()`` it to read it."""
    if not (isinstance(module, torch.nn.RNNBase) and module.mode == "LSTM"):
        raise TypeError(f"fused_lstm.explain: expected an LSTM module, got {type(module).__name__}")
    if isinstance(input, PackedSequence):
        data, batch_sizes = input.data, input.batch_sizes
        step_rows = [int(b) for b in batch_sizes]
    else:
        data = input
        batched = input.dim() == 3
        T = input.size(1 if batched and module.batch_first else 0)
        N = input.size(0 if module.batch_first else 1) if batched else 1
        step_rows = [N] * T
    device_type = data.device.type
    info = dict(_C.cpu_machine())
    if machine:
        info.update(machine)
    plan = Plan(machine=info, layers=[])
    D = 2 if module.bidirectional else 1
    H = module.hidden_size
    Hout = module.proj_size or H
    # Under autocast the module's float32 weights and input reach the op in the autocast dtype.
    dtype = data.dtype
    if device_type == "cpu" and dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
    recurrence = getattr(module, "recurrence", "auto")
    weights = list(module._flat_weights)
    per_layer = len(weights) // module.num_layers
    states = [t for t in (hx or ()) if isinstance(t, Tensor)]
    training = _needs_grad([data, *states, *weights])
    plan["shape"] = (f"T={len(step_rows)}, N={step_rows[0] if step_rows else 0}, rows={sum(step_rows)}, "
                     f"{dtype}, {'training' if training else 'inference'}, recurrence={recurrence!r}")
    if device_type != "cpu":
        plan["note"] = f"input on {device_type}: explain covers the CPU planner only"
        return plan
    vector_kernels = info["kernels"] != "aten"
    input_grad = data.requires_grad
    for layer in range(module.num_layers):
        I = module.input_size if layer == 0 else D * Hout
        layer_weights = weights[layer * per_layer:(layer + 1) * per_layer]
        need_weight_grads = _needs_grad(layer_weights)
        entry = _layer_plan(step_rows, I, H, Hout, D, dtype, module.proj_size > 0, recurrence, training,
                            need_input_grad=input_grad, need_weight_grads=need_weight_grads,
                            need_h0_grad=_needs_grad(states), vector_kernels=vector_kernels, machine=machine)
        entry["layer"] = layer
        entry["shape"] = f"I={I}, H={H}" + (f", proj_size={Hout}" if module.proj_size else "") + f", {D} direction(s)"
        plan["layers"].append(entry)
        input_grad = input_grad or need_weight_grads
    return plan
