"""Shape formulas and option limits that several layers need, defined once: the conv output and pooled sizes, and
the options the conv family's kernels take (the op's argument checks, ``pydlx.nn.ConvReLUPool2d`` and what
``optimize`` fuses all read them here)."""
from __future__ import annotations

from typing import Tuple

# The conv family's options (inclusive ranges): square kernels, strides and zero paddings of the convolution; max
# pools of size POOL (1: no pool) with strides POOL_STRIDE and padding at most half the window (max_pool2d's rule).
KERNEL = (1, 11)
STRIDE = (1, 4)
PADDING = (0, 5)
POOL = (1, 3)
POOL_STRIDE = (1, 3)


def within(value: int, limits: Tuple[int, int]) -> bool:
    return limits[0] <= value <= limits[1]


def conv_size(size: int, R: int, stride: int, padding: int) -> int:
    """A convolution's output size along one dimension (dilation 1)."""
    return (size + 2 * padding - R) // stride + 1


def pooled_size(size: int, P: int, Q: int, pad: int, ceil_mode: bool) -> int:
    """max_pool2d's output size along one dimension (dilation 1): floor or ceil of (size + 2 pad - P) / Q, plus 1;
    in ceil mode the last window must start inside the input or its left padding (torch's rule)."""
    out = (size + 2 * pad - P + ((Q - 1) if ceil_mode else 0)) // Q + 1
    if ceil_mode and (out - 1) * Q >= size + pad:
        out -= 1
    return out


def out_shape(H: int, W: int, R: int, stride: int, padding: int, P: int, Q: int, pool_padding: int = 0,
              ceil_mode: bool = False) -> Tuple[int, int, int, int]:
    """(HO, WO, HP, WP): the conv output and pooled sizes (P = 1, no pool: HP, WP = HO, WO)."""
    HO, WO = conv_size(H, R, stride, padding), conv_size(W, R, stride, padding)
    return HO, WO, pooled_size(HO, P, Q, pool_padding, ceil_mode), pooled_size(WO, P, Q, pool_padding, ceil_mode)


def window_fits(P: int, PP: int) -> bool:
    """max_pool2d's rule: padding at most half the window."""
    return 0 <= PP <= P // 2
