"""FLOP counts used to turn times into achieved TFLOP/s (matmul FLOPs only)."""

from __future__ import annotations

from typing import Dict, Optional

from .shapes import Shape

#: The counting rule, printed under tables and stored in results.json.
FLOP_FORMULA = (
    "forward FLOPs = sum over layers and directions of 8*H*H_out*tokens (recurrent) "
    "+ 8*I_l*H*tokens (input projection) [+ 2*H*H_out*tokens when proj_size > 0], "
    "with H_out = proj_size or H, I_l = I for layer 0 else H_out*directions, "
    "tokens = N*T (sum of lengths when packed); fwd/infer = 1x, bwd = 2x, train = 3x forward, "
    "train_weights = train less the first layer's input gradient (8*I*H*tokens per direction); "
    "elementwise gate math not counted"
)

#: Multiple of the forward FLOPs each mode performs (train_weights: see mode_flops).
MODE_FLOP_FACTOR: Dict[str, int] = {"infer": 1, "fwd": 1, "bwd": 2, "train": 3, "train_weights": 3}


def forward_flops(shape: Shape) -> int:
    """Matmul FLOPs of one forward pass over all layers and directions."""
    tokens = shape.tokens()
    h, h_out = shape.H, shape.h_out
    total = 0
    for layer in range(shape.layers):
        i_l = shape.I if layer == 0 else h_out * shape.directions
        per_direction = 8 * h * h_out * tokens + 8 * i_l * h * tokens
        if shape.proj_size:
            per_direction += 2 * h * h_out * tokens
        total += per_direction * shape.directions
    return total


def mode_flops(shape: Shape, mode: str) -> int:
    """FLOPs of one timed call in ``mode``."""
    flops = forward_flops(shape) * MODE_FLOP_FACTOR[mode]
    if mode == "train_weights":  # no gradient for the data input: the first layer skips that product
        flops -= 8 * shape.I * shape.H * shape.tokens() * shape.directions
    return flops


def tflops(flops: int, ms: Optional[float]) -> Optional[float]:
    """Achieved TFLOP/s for ``flops`` done in ``ms`` milliseconds (None when unknown)."""
    if ms is None or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12
