"""``pydlx.ops.conv_relu_pool2d``: MaxPool2d(ReLU(Conv2d(x))) in one kernel that writes only the pooled map.

Ops (schemas defined once, here):
  pydlx::conv_relu_pool2d_fwd(input, weight, bias, stride, padding, pool_size, pool_stride) -> (y, idx)
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
from ..reference.conv_relu_pool import conv_relu_pool2d as reference_conv_relu_pool2d, out_shape

NAME = "pydlx.ops.conv_relu_pool2d"


CUDA_MAX_CHANNELS = 8  # csrc/conv_relu_pool.cu's direct convolution is for first layers


def _why_not_cuda(x: Tensor) -> Optional[str]:
    if x.shape[1] > CUDA_MAX_CHANNELS:
        return (f"the C++/CUDA direct convolution is for first layers (at most {CUDA_MAX_CHANNELS} input channels), "
                f"got {x.shape[1]}; the triton backend takes any")
    return why_not_kernel_dtype(x)


def _why_not_triton(x: Tensor, weight: Tensor, HP: int, WP: int) -> Optional[str]:
    why = why_not_kernel_dtype(x)
    if why is not None:
        return why
    from ..triton import conv_relu_pool as tri  # (choose() has checked that triton imports)
    return tri.why_too_large(x.shape, x.stride(), weight.shape[0], weight.shape[-1], HP, WP)


def _choose(x: Tensor, weight: Tensor, HP: int, WP: int) -> str:
    # auto on GPUs: the eager forward (cuDNN) inside the op -- which still saves only the pooled map and int8
    # indices for backward -- until GPU measurements show where the fused kernels win (bench/NOTES.md); the
    # Triton and C++/CUDA kernels run when their backend is forced. (CPU + auto never gets here: plain eager.)
    return _backend.choose("conv_relu_pool2d", x, lambda t: (), extra_check={
        "triton": lambda: _why_not_triton(x, weight, HP, WP), "cuda": lambda: _why_not_cuda(x)})


def _window_index(y_idx_flat: Tensor, WO: int, HP: int, WP: int, P: int, Q: int) -> Tensor:
    """max_pool2d's flat conv-output indices -> the position inside each pool window (int8)."""
    oh, ow = y_idx_flat // WO, y_idx_flat % WO
    ph = torch.arange(HP, device=oh.device).view(HP, 1) * Q
    pw = torch.arange(WP, device=oh.device).view(1, WP) * Q
    return ((oh - ph) * P + (ow - pw)).to(torch.int8)


@torch.library.custom_op("pydlx::conv_relu_pool2d_fwd", mutates_args=())
def conv_relu_pool2d_fwd(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int,
                         pool_size: int, pool_stride: int) -> Tuple[Tensor, Tensor]:
    _, _, HP, WP = out_shape(*input.shape[-2:], weight.shape[-1], stride, padding, pool_size, pool_stride)
    backend = _choose(input, weight, HP, WP)
    if backend == "triton":
        from ..triton import conv_relu_pool as tri
        return tri.conv_relu_pool_fwd(input, weight, bias, stride, padding, pool_size, pool_stride)
    if backend == "cuda":
        return torch.ops.pydlx.conv_relu_pool2d_fwd_cuda(input, weight, bias, stride, padding, pool_size,
                                                         pool_stride)
    z = torch.relu(torch.nn.functional.conv2d(input, weight, bias, stride=stride, padding=padding))
    y, flat = torch.nn.functional.max_pool2d(z, pool_size, pool_stride, return_indices=True)
    return y.contiguous(), _window_index(flat, z.shape[-1], y.shape[-2], y.shape[-1], pool_size, pool_stride)


@conv_relu_pool2d_fwd.register_fake
def _(input, weight, bias, stride, padding, pool_size, pool_stride):
    _, _, HP, WP = out_shape(*input.shape[-2:], weight.shape[-1], stride, padding, pool_size, pool_stride)
    shape = (input.shape[0], weight.shape[0], HP, WP)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int8)


@torch.library.custom_op("pydlx::conv_relu_pool2d_bwd", mutates_args=())
def conv_relu_pool2d_bwd(grad: Tensor, input: Tensor, weight: Tensor, y: Tensor, idx: Tensor, has_bias: bool,
                         stride: int, padding: int, pool_size: int, pool_stride: int, need_input: bool,
                         need_weight: bool) -> Tuple[Tensor, Tensor, Tensor]:
    N, K, HP, WP = y.shape
    HO, WO, _, _ = out_shape(*input.shape[-2:], weight.shape[-1], stride, padding, pool_size, pool_stride)
    # route dy to each max's conv-output position, through the ReLU mask; overlapping windows accumulate
    idx = idx.long()
    oh = torch.arange(HP, device=y.device).view(HP, 1) * pool_stride + idx // pool_size
    ow = torch.arange(WP, device=y.device).view(1, WP) * pool_stride + idx % pool_size
    g = torch.where(y > 0, grad, torch.zeros_like(grad))
    dz = grad.new_zeros((N, K, HO * WO)).scatter_add_(2, (oh * WO + ow).view(N, K, HP * WP), g.reshape(N, K, HP * WP))
    dx, dw, db = torch.ops.aten.convolution_backward(
        dz.view(N, K, HO, WO), input, weight, [K] if has_bias else None, [stride, stride], [padding, padding],
        [1, 1], False, [0, 0], 1, [need_input, need_weight, has_bias])
    empty = lambda: input.new_empty(0)  # noqa: E731
    return (dx if need_input else empty(), dw if need_weight else empty(), db if has_bias else empty())


@conv_relu_pool2d_bwd.register_fake
def _(grad, input, weight, y, idx, has_bias, stride, padding, pool_size, pool_stride, need_input, need_weight):
    return (torch.empty_like(input) if need_input else input.new_empty(0),
            torch.empty_like(weight) if need_weight else input.new_empty(0),
            weight.new_empty(weight.shape[0]) if has_bias else input.new_empty(0))


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, pool_size, pool_stride = inputs
    y, idx = output
    ctx.mark_non_differentiable(idx)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, weight, y, idx)
    ctx.args = (bias is not None, stride, padding, pool_size, pool_stride)


def _backward(ctx, grad_y, grad_idx):
    input, weight, y, idx = ctx.saved_tensors
    if grad_y is None:
        return None, None, None, None, None, None, None
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    has_bias, stride, padding, P, Q = ctx.args
    dx, dw, db = conv_relu_pool2d_bwd(grad_y.contiguous(), input, weight, y, idx, has_bias and need_b, stride,
                                      padding, P, Q, need_x, need_w)
    return (dx if need_x else None, dw if need_w else None, db if (has_bias and need_b) else None,
            None, None, None, None)


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
    if input.device.type == "cpu" and _backend.current_backend() == "auto":
        # CPU + auto: plain eager PyTorch, the fastest there (the op's index bookkeeping costs ~1.4x on a CPU
        # training step, bench/results/cpu.csv); the reference backend, forced, runs the op (and its memory saving)
        return reference_conv_relu_pool2d(input, weight, bias, stride, padding, P, Q)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    y, _ = conv_relu_pool2d_fwd(x, weight, bias, stride, padding, P, Q)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    return y.squeeze(0) if unbatched else y
