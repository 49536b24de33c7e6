"""``pydlx.ops.conv_relu_pool2d``: MaxPool2d(ReLU(Conv2d(x))) in one kernel that writes only the pooled map.

Ops (schemas defined once, here):
  pydlx::conv_relu_pool2d_fwd(input, weight, bias, stride, padding, pool_size, pool_stride, backend) -> (y, idx)
      y: the pooled output [N, K, HP, WP]; idx: int8, each max's position in its pool window (non-differentiable).
  pydlx::conv_relu_pool2d_bwd(grad, input, weight, y, idx, has_bias, stride, padding, pool_size, pool_stride,
      need_input, need_weight) -> (dx, dw, db)
Saved for backward: x, w, the pooled y and the int8 idx — against eager's x, w, the full conv output, the full
ReLU output and int64 pool indices. The forced ``cuda`` backend runs csrc/conv_relu_pool.cu's direct convolution
(first layers: at most 8 input channels). Backward routes dy through idx and the ReLU mask (y > 0) into the conv
output's gradient and runs the convolution backward (cuDNN on GPUs); a fused backward is not written yet.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from ._common import ArgumentError, DtypeError, FLOAT_DTYPES, autocast_cast, why_not_kernel_dtype
from .._policy import size_of
from ..reference.conv_relu_pool import conv_relu_pool2d as reference_conv_relu_pool2d, conv_relu_pool_bwd, out_shape

NAME = "pydlx.ops.conv_relu_pool2d"


def _impl(backend: str):
    return _backend.implementation("conv_relu_pool", backend)


def choose(x: Tensor, weight: Tensor, stride: int, padding: int, P: int, Q: int, training: bool) -> str:
    """The backend for one call (pydlx/_backend.py). Without a measured policy, auto on GPUs runs the eager
    forward (cuDNN) inside the op -- which still saves only the pooled map and int8 indices for backward -- and
    the Triton and C++/CUDA kernels run when forced or when the GPU's policy measured them faster."""
    HO, WO, HP, WP = out_shape(*x.shape[-2:], weight.shape[-1], stride, padding, P, Q)
    call = _backend.CallKey(x.dtype, "training" if training else "inference", size_of(
        "conv_relu_pool", N=x.shape[0], K=weight.shape[0], C=x.shape[1], R=weight.shape[-1], HO=HO, WO=WO))
    return _backend.choose("conv_relu_pool", x, NAME[len("pydlx."):], checks={
        "triton": lambda: why_not_kernel_dtype(x) or _impl("triton").why_too_large(
            x.shape, x.stride(), weight.shape[0], weight.shape[-1], HP, WP),
        "cuda": lambda: _impl("cuda").why_cannot(x.shape[1]) or why_not_kernel_dtype(x)}, call=call)


@torch.library.custom_op("pydlx::conv_relu_pool2d_fwd", mutates_args=())
def conv_relu_pool2d_fwd(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int,
                         pool_size: int, pool_stride: int, backend: str) -> Tuple[Tensor, Tensor]:
    return _impl(backend).conv_relu_pool_fwd(input, weight, bias, stride, padding, pool_size, pool_stride)


@conv_relu_pool2d_fwd.register_fake
def _(input, weight, bias, stride, padding, pool_size, pool_stride, backend):
    _, _, HP, WP = out_shape(*input.shape[-2:], weight.shape[-1], stride, padding, pool_size, pool_stride)
    shape = (input.shape[0], weight.shape[0], HP, WP)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int8)


@torch.library.custom_op("pydlx::conv_relu_pool2d_bwd", mutates_args=())
def conv_relu_pool2d_bwd(grad: Tensor, input: Tensor, weight: Tensor, y: Tensor, idx: Tensor, has_bias: bool,
                         stride: int, padding: int, pool_size: int, pool_stride: int, need_input: bool,
                         need_weight: bool) -> Tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = conv_relu_pool_bwd(grad, input, weight, y, idx, has_bias, stride, padding, pool_size, pool_stride,
                                    need_input, need_weight)
    empty = lambda: input.new_empty(0)  # noqa: E731
    return (dx if need_input else empty(), dw if need_weight else empty(), db if has_bias else empty())


@conv_relu_pool2d_bwd.register_fake
def _(grad, input, weight, y, idx, has_bias, stride, padding, pool_size, pool_stride, need_input, need_weight):
    return (torch.empty_like(input) if need_input else input.new_empty(0),
            torch.empty_like(weight) if need_weight else input.new_empty(0),
            weight.new_empty(weight.shape[0]) if has_bias else input.new_empty(0))


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, pool_size, pool_stride, backend = inputs
    y, idx = output
    ctx.mark_non_differentiable(idx)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, weight, y, idx)
    ctx.args = (bias is not None, stride, padding, pool_size, pool_stride)


def _backward(ctx, grad_y, grad_idx):
    input, weight, y, idx = ctx.saved_tensors
    if grad_y is None:
        return None, None, None, None, None, None, None, None
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    has_bias, stride, padding, P, Q = ctx.args
    dx, dw, db = conv_relu_pool2d_bwd(grad_y.contiguous(), input, weight, y, idx, has_bias and need_b, stride,
                                      padding, P, Q, need_x, need_w)
    return (dx if need_x else None, dw if need_w else None, db if (has_bias and need_b) else None,
            None, None, None, None, None)


torch.library.register_autograd("pydlx::conv_relu_pool2d_fwd", _backward, setup_context=_setup_context)


def _int_arg(value, name: str, low: int, high: int) -> int:
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ArgumentError(f"{NAME}: {name} must be an int or a pair of equal ints, got {value!r}")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ArgumentError(f"{NAME}: {name} must be an int in [{low}, {high}], got {value!r}")
    return value


def check_conv_relu_pool_args(input, weight, bias, stride, padding, pool_size, pool_stride):
    """Normalised (stride, padding, pool_size, pool_stride); raises a clear error naming the bad argument."""
    if not isinstance(input, Tensor) or input.dim() not in (3, 4):
        got = f"{input.dim()}-D" if isinstance(input, Tensor) else type(input).__name__
        raise ArgumentError(f"{NAME}: input must be (N, C, H, W) or unbatched (C, H, W), got {got}")
    if not isinstance(weight, Tensor) or weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ArgumentError(f"{NAME}: weight must be (out_channels, in_channels, k, k) with a square kernel, got {got}")
    if weight.shape[1] != input.shape[-3]:
        raise ArgumentError(f"{NAME}: weight.shape[1] ({weight.shape[1]}) must equal the input's channels "
                         f"({input.shape[-3]}); groups other than 1 are not supported")
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise DtypeError(f"{NAME}: {name} must be a floating-point tensor, got {t.dtype}")
        if t is not None and t.device != input.device:
            raise ArgumentError(f"{NAME}: {name} is on {t.device} but input is on {input.device}")
        if t is not None and t.dtype != input.dtype:
            raise DtypeError(f"{NAME}: {name} has dtype {t.dtype} but input has {input.dtype}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ArgumentError(f"{NAME}: bias must be 1-D with {weight.shape[0]} elements, got {tuple(bias.shape)}")
    R = weight.shape[-1]
    if not 1 <= R <= 11:
        raise ArgumentError(f"{NAME}: kernel size must be in [1, 11], got {R}")
    stride = _int_arg(stride, "stride", 1, 4)
    padding = _int_arg(padding, "padding", 0, 3)
    pool_size = _int_arg(pool_size, "pool_size", 2, 3)
    pool_stride = _int_arg(pool_stride if pool_stride is not None else pool_size, "pool_stride", 1, 3)
    HO, WO, _, _ = out_shape(*input.shape[-2:], R, stride, padding, pool_size, pool_stride)
    if min(HO, WO) < pool_size:
        raise ArgumentError(f"{NAME}: the conv output ({HO}x{WO}) is smaller than the pool window ({pool_size})")
    return stride, padding, pool_size, pool_stride


def conv_relu_pool2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
                     pool_size=2, pool_stride=None) -> Tensor:
    """``MaxPool2d(pool_size, pool_stride)(ReLU(Conv2d(x)))``, floor mode, groups 1, dilation 1, zero padding.

    input: (N, C, H, W) or (C, H, W); weight: (K, C, k, k); bias: (K,) or None. Square kernels 1..11, stride 1..4,
    padding 0..3, pool 2 or 3 with stride 1..3 (default: pool_size).
    """
    if all(isinstance(t, Tensor) and t.is_floating_point() for t in (input, weight, bias) if t is not None):
        # under torch.autocast, cast first (as F.conv2d does), so a bf16 activation meets fp32 weights
        input, weight, bias = autocast_cast(input.device.type, (input, weight, bias))
    stride, padding, P, Q = check_conv_relu_pool_args(input, weight, bias, stride, padding, pool_size, pool_stride)
    if _backend.cpu_auto(input):
        # CPU + auto: plain eager PyTorch, the fastest there (the op's index bookkeeping costs ~1.4x on a CPU
        # training step, bench/results/cpu.csv); the reference backend, forced, runs the op (and its memory saving)
        return reference_conv_relu_pool2d(input, weight, bias, stride, padding, P, Q)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    y, _ = conv_relu_pool2d_fwd(x, weight, bias, stride, padding, P, Q, choose(x, weight, stride, padding, P, Q,
                                                                              training))
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    return y.squeeze(0) if unbatched else y


def fold_batchnorm(weight: Tensor, bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
                   bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor]:
    """(w', b') of a convolution or Linear followed by an eval-mode BatchNorm: BN(x @ w + b) = x @ w' + b' with
    w' = w * s, b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps) (per output channel). Computed from the
    modules' current tensors at every call, differentiable in w, b, gamma and beta (running stats are buffers)."""
    scale = torch.rsqrt(running_var.to(weight.dtype) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight
    w = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    b = -running_mean.to(weight.dtype) * scale if bias is None else (bias - running_mean.to(weight.dtype)) * scale
    return w, (b + bn_bias if bn_bias is not None else b)


def conv_bn_relu_pool2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], running_mean: Tensor,
                        running_var: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float,
                        stride=1, padding=0, pool_size=2, pool_stride=None) -> Tensor:
    """MaxPool2d(ReLU(BatchNorm2d(Conv2d(x)))) with the BatchNorm in eval mode, folded into the convolution
    (pydlx.optimize's Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d chains). An input BatchNorm2d would refuse (not
    4-D) runs the chain eagerly, so it refuses as torch does."""
    if not (isinstance(input, Tensor) and input.dim() == 4):
        z = torch.nn.functional.conv2d(input, weight, bias, stride, padding)
        z = torch.nn.functional.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, False, 0.0, eps)
        return torch.nn.functional.max_pool2d(torch.relu(z), pool_size, pool_stride)
    w, b = fold_batchnorm(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps)
    return conv_relu_pool2d(input, w, b, stride, padding, pool_size, pool_stride)
