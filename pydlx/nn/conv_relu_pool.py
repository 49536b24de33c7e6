"""``pydlx.nn.ConvReLUPool2d``: Conv2d -> ReLU -> MaxPool2d as one module; ``weight``/``bias`` exactly nn.Conv2d's."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from .._geometry import KERNEL, PADDING, POOL, POOL_STRIDE, STRIDE, window_fits, within
from ..ops.conv_relu_pool import check_conv_relu_pool_args, conv_relu_pool2d


class ConvReLUPool2d(nn.Module):
    """``MaxPool2d(pool_size, pool_stride, pool_padding, ceil_mode=ceil_mode)(ReLU(Conv2d(in_channels,
    out_channels, kernel_size, stride, padding, bias=bias)(x)))``: square kernels 1..11, stride 1..4, padding 0..5,
    groups 1, dilation 1, zero padding; pools 2 or 3 (stride 1..3, default pool_size, padding up to half the window,
    floor or ceil mode). Parameters are nn.Conv2d's (same names, init, state_dict).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True, pool_size: int = 2, pool_stride: Optional[int] = None, device=None,
                 dtype=None, *, pool_padding: int = 0, ceil_mode: bool = False) -> None:
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias,
                         device=device, dtype=dtype)
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding = stride, padding
        self.pool_size, self.pool_stride = pool_size, pool_stride if pool_stride is not None else pool_size
        self.pool_padding, self.ceil_mode = pool_padding, ceil_mode
        if pool_size < 2:
            raise ValueError(f"pydlx.nn.ConvReLUPool2d: pool_size must be 2 or 3, got {pool_size}")
        probe = torch.empty((in_channels, 64, 64), device="meta", dtype=self.weight.dtype)  # checks the options
        check_conv_relu_pool_args(probe, self.weight.to("meta"), None, stride, padding, pool_size, pool_stride,
                                  pool_padding, ceil_mode, name="pydlx.nn.ConvReLUPool2d")

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, pool: nn.MaxPool2d) -> "ConvReLUPool2d":
        """The fused module over ``conv``'s own parameters (no copy); raises for what it does not support."""
        if not isinstance(conv, nn.Conv2d) or not isinstance(pool, nn.MaxPool2d):
            raise TypeError("pydlx.nn.ConvReLUPool2d.from_modules: expected (nn.Conv2d, nn.MaxPool2d), got "
                            f"({type(conv).__name__}, {type(pool).__name__})")
        why = unsupported(conv, pool)
        if why:
            raise ValueError(f"pydlx.nn.ConvReLUPool2d.from_modules: {why}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.weight, new.bias = conv.weight, conv.bias
        new.pool_padding, new.ceil_mode = 0, False
        for name, value in fused_args(conv, pool).items():
            setattr(new, name, value)
        new.train(conv.training)
        return new

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return conv_relu_pool2d(input, self.weight, self.bias, self.stride, self.padding, self.pool_size,
                                self.pool_stride, self.pool_padding, self.ceil_mode)

    def extra_repr(self) -> str:
        k, c = self.weight.shape[0], self.weight.shape[1]
        return (f"{c}, {k}, kernel_size={self.weight.shape[-1]}, stride={self.stride}, padding={self.padding}, "
                f"bias={self.bias is not None}, pool_size={self.pool_size}, pool_stride={self.pool_stride}"
                + (f", pool_padding={self.pool_padding}" if self.pool_padding else "")
                + (", ceil_mode=True" if self.ceil_mode else ""))


def _square(v) -> Optional[int]:
    """The one value of an int or a pair of equal ints (module attributes hold either), else None."""
    v = _pair(v)
    return v[0] if len(v) == 2 and v[0] == v[1] else None


def fused_args(conv: nn.Conv2d, pool: Optional[nn.MaxPool2d]) -> dict:
    """pydlx.ops.conv_act_pool2d's options (stride, padding, pool_size, pool_stride, pool_padding, ceil_mode) for a
    conv (and pool, or None) that ``unsupported`` accepts."""
    args = dict(stride=_square(conv.stride), padding=_square(conv.padding))
    if pool is None:
        return args
    size = _square(pool.kernel_size)
    args.update(pool_size=size, pool_stride=_square(pool.stride) if pool.stride is not None else size)
    if _square(pool.padding):
        args["pool_padding"] = _square(pool.padding)
    if pool.ceil_mode:
        args["ceil_mode"] = True
    return args


def unsupported(conv: nn.Conv2d, pool: Optional[nn.MaxPool2d] = None) -> Optional[str]:
    """None if the conv (and pool) is fusable, else why not (used by from_modules, optimize and explain). Never
    raises for a Conv2d / MaxPool2d however their options are spelled (ints or pairs)."""
    if conv.groups != 1:
        return f"groups={conv.groups} (only 1)"
    if _pair(conv.dilation) != (1, 1):
        return f"dilation={conv.dilation} (only 1)"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"padding {conv.padding!r} / padding_mode {conv.padding_mode!r} (only int zero padding)"
    if _square(conv.kernel_size) is None or _square(conv.stride) is None or _square(conv.padding) is None:
        return "non-square kernel, stride or padding"
    k, s, p = _square(conv.kernel_size), _square(conv.stride), _square(conv.padding)
    if not (within(k, KERNEL) and within(s, STRIDE) and within(p, PADDING)):
        return (f"kernel {k}, stride {s}, padding {p} (kernels {KERNEL[0]}..{KERNEL[1]}, strides "
                f"{STRIDE[0]}..{STRIDE[1]}, paddings {PADDING[0]}..{PADDING[1]})")
    if pool is None:
        return None
    if pool.return_indices:
        return "return_indices=True"
    if _pair(pool.dilation) != (1, 1):
        return f"pool dilation={pool.dilation} (only 1)"
    if _square(pool.kernel_size) is None or (pool.stride is not None and _square(pool.stride) is None) \
            or _square(pool.padding) is None:
        return "non-square pool"
    size, stride = _square(pool.kernel_size), _square(pool.stride) if pool.stride is not None else None
    if not (size > 1 and within(size, POOL)) or not within(stride or size, POOL_STRIDE):
        return (f"pool {size} stride {stride or size} (pools 2..{POOL[1]}, strides "
                f"{POOL_STRIDE[0]}..{POOL_STRIDE[1]})")
    if not window_fits(size, _square(pool.padding)):
        return f"pool padding={pool.padding} (at most half the window)"
    return None
