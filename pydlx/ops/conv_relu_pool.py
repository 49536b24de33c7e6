"""``pydlx.ops.conv_act_pool2d``: MaxPool2d(act(Conv2d(x))) -- or act(Conv2d(x)) without the pool -- in one kernel that
writes only its output; ``pydlx.ops.conv_relu_pool2d`` is its ReLU form, ``conv_bn_act_pool2d`` the form with a
BatchNorm2d after the conv (eval mode: folded into the convolution; training mode: the training form below).

Ops (schemas defined once, here):
  pydlx::conv_relu_pool2d_fwd(input, weight, bias, stride, padding, pool_size, pool_stride, pool_padding,
      ceil_mode, activation, save_preact, backend) -> (y, idx, z)
      y: the output [N, K, HP, WP] (pooled, or the activated conv output when pool_size is 1); idx: int8, each max's
      position in its pool window (empty without a pool); z: the pre-activation, only without a pool and when the
      activation's derivative needs it (hardswish, mish, gelu, silu). idx and z are non-differentiable.
  pydlx::conv_relu_pool2d_bwd(grad, input, weight, y, idx, z, has_bias, stride, padding, pool_size, pool_stride,
      pool_padding, activation, need_input, need_weight) -> (dx, dw, db)
  pydlx::conv_bn_train_fwd(input, weight, bias, bn_weight, bn_bias, eps, stride, padding, pool_size, pool_stride,
      pool_padding, ceil_mode, activation, backend) -> (y, mean, var)
      the training form: max_pool(act(BatchNorm2d(conv(x)))) with batch statistics (per channel, fp32 for 16-bit x;
      non-differentiable; the caller moves the running statistics); saves x, backward recomputes the conv output.
  pydlx::conv_bn_train_bwd(grad, input, weight, bias, bn_weight, bn_bias, mean, var, eps, stride, padding,
      pool_size, pool_stride, pool_padding, ceil_mode, activation, backend, need_input, need_weight, need_bias)
      -> (dx, dw, db, dgamma, dbeta)
Saved for backward: x, w, the output y (and idx / z) -- against eager's x, w, the full conv output, the full
activation output and int64 pool indices. With a pool the activation must be non-decreasing (max commutes with it;
its derivative is then a function of y). The forced ``cuda`` backend runs csrc/conv_relu_pool.cu's direct
convolution (first layers: at most 8 input channels). Backward routes dy through idx and the activation's derivative
into the conv output's gradient and runs the convolution backward (cuDNN on GPUs); a fused backward is not written
yet.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from ._common import ArgumentError, DtypeError, FLOAT_DTYPES, autocast_cast, why_not_kernel_dtype
from .._policy import size_of
from ..reference.conv_relu_pool import conv_act_pool2d as reference_conv_act_pool2d, conv_relu_pool_bwd, out_shape
from ..reference.conv_relu_pool import conv_bn_train_bwd as reference_conv_bn_train_bwd
from ..reference.conv_relu_pool import conv_bn_train_fwd as reference_conv_bn_train_fwd
from ..reference.batchnorm import math_dtype, momentum_factor, update_running_stats
from ..activations import MONOTONE, check_activation, forward as activation_forward, is_monotone, saves_preact

NAME = "pydlx.ops.conv_relu_pool2d"


def _impl(backend: str):
    return _backend.implementation("conv_relu_pool", backend)


def choose(x: Tensor, weight: Tensor, stride: int, padding: int, P: int, Q: int, PP: int, ceil_mode: bool,
           activation: Optional[str], training: bool) -> str:
    """The backend for one call (pydlx/_backend.py). Without a measured policy, auto on GPUs runs the eager
    forward (cuDNN) inside the op -- which still saves only the output and int8 indices for backward -- and the
    Triton and C++/CUDA kernels run when forced or when the GPU's policy measured them faster. Policies are measured
    on the benchmarks' ReLU + floor-mode unpadded pool; other variants (activations, no pool, padded or ceil-mode
    pools) stay eager under auto until a GPU measures them."""
    HO, WO, HP, WP = out_shape(*x.shape[-2:], weight.shape[-1], stride, padding, P, Q, PP, ceil_mode)
    measured = activation == "relu" and P > 1 and PP == 0 and not ceil_mode
    call = _backend.CallKey(x.dtype, "training" if training else "inference", size_of(
        "conv_relu_pool", N=x.shape[0], K=weight.shape[0], C=x.shape[1], R=weight.shape[-1], HO=HO, WO=WO)
    ) if measured else None
    return _backend.choose("conv_relu_pool", x, NAME[len("pydlx."):], checks={
        "triton": lambda: why_not_kernel_dtype(x) or _impl("triton").why_too_large(
            x.shape, x.stride(), weight.shape[0], weight.shape[-1], HP, WP),
        "cuda": lambda: _impl("cuda").why_cannot(x.shape[1]) or why_not_kernel_dtype(x)}, call=call)


@torch.library.custom_op("pydlx::conv_relu_pool2d_fwd", mutates_args=())
def conv_relu_pool2d_fwd(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int,
                         pool_size: int, pool_stride: int, pool_padding: int, ceil_mode: bool, activation: str,
                         save_preact: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return _impl(backend).conv_relu_pool_fwd(input, weight, bias, stride, padding, pool_size, pool_stride,
                                             pool_padding, ceil_mode, _act_name(activation), save_preact)


def _act_name(activation: str) -> Optional[str]:
    return None if activation == "none" else activation


@conv_relu_pool2d_fwd.register_fake
def _(input, weight, bias, stride, padding, pool_size, pool_stride, pool_padding, ceil_mode, activation,
      save_preact, backend):
    _, _, HP, WP = out_shape(*input.shape[-2:], weight.shape[-1], stride, padding, pool_size, pool_stride,
                             pool_padding, ceil_mode)
    shape = (input.shape[0], weight.shape[0], HP, WP)
    return (input.new_empty(shape), input.new_empty(shape if pool_size > 1 else (0,), dtype=torch.int8),
            input.new_empty(shape if save_preact else (0,)))


@torch.library.custom_op("pydlx::conv_relu_pool2d_bwd", mutates_args=())
def conv_relu_pool2d_bwd(grad: Tensor, input: Tensor, weight: Tensor, y: Tensor, idx: Tensor, z: Tensor,
                         has_bias: bool, stride: int, padding: int, pool_size: int, pool_stride: int,
                         pool_padding: int, activation: str, need_input: bool, need_weight: bool
                         ) -> Tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = conv_relu_pool_bwd(grad, input, weight, y, idx, z, has_bias, stride, padding, pool_size,
                                    pool_stride, pool_padding, _act_name(activation), need_input, need_weight)
    empty = lambda: input.new_empty(0)  # noqa: E731
    return (dx if need_input else empty(), dw if need_weight else empty(), db if has_bias else empty())


@conv_relu_pool2d_bwd.register_fake
def _(grad, input, weight, y, idx, z, has_bias, stride, padding, pool_size, pool_stride, pool_padding, activation,
      need_input, need_weight):
    return (torch.empty_like(input) if need_input else input.new_empty(0),
            torch.empty_like(weight) if need_weight else input.new_empty(0),
            weight.new_empty(weight.shape[0]) if has_bias else input.new_empty(0))


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, pool_size, pool_stride, pool_padding, _, activation, _, _ = inputs
    y, idx, z = output
    ctx.mark_non_differentiable(idx, z)
    ctx.set_materialize_grads(False)
    # y only where backward reads it (a pool, or an activation whose derivative is a function of y): without an
    # activation nothing but x and w, so a later in-place op on y (ResNet's ``out += identity`` after a folded
    # Conv -> BatchNorm) is as legal as in eager
    needs_y = pool_size > 1 or (_act_name(activation) is not None and z.numel() == 0)
    ctx.save_for_backward(input, weight, y if needs_y else y.new_empty(0), idx, z)
    ctx.args = (bias is not None, stride, padding, pool_size, pool_stride, pool_padding, activation)


def _backward(ctx, grad_y, grad_idx, grad_z):
    input, weight, y, idx, z = ctx.saved_tensors
    if grad_y is None:
        return (None,) * 12
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    has_bias, stride, padding, P, Q, PP, activation = ctx.args
    if _act_name(activation) is not None and saves_preact(activation) and z.numel() == 0 and grad_y.numel() != 0:
        raise RuntimeError("pydlx.ops.conv_act_pool2d: backward needs the pre-activation, but the forward ran with "
                           "save_preact=False (call the op through pydlx.ops.conv_act_pool2d)")
    dx, dw, db = conv_relu_pool2d_bwd(grad_y.contiguous(), input, weight, y, idx, z, has_bias and need_b, stride,
                                      padding, P, Q, PP, activation, need_x, need_w)
    return (dx if need_x else None, dw if need_w else None, db if (has_bias and need_b) else None) + (None,) * 9


torch.library.register_autograd("pydlx::conv_relu_pool2d_fwd", _backward, setup_context=_setup_context)


def _int_arg(value, name: str, low: int, high: int) -> int:
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ArgumentError(f"{NAME}: {name} must be an int or a pair of equal ints, got {value!r}")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ArgumentError(f"{NAME}: {name} must be an int in [{low}, {high}], got {value!r}")
    return value


def check_conv_relu_pool_args(input, weight, bias, stride, padding, pool_size, pool_stride, pool_padding=0,
                              ceil_mode=False, activation="relu"):
    """Normalised (stride, padding, pool_size, pool_stride, pool_padding); raises a clear error naming the bad
    argument."""
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
    try:
        check_activation(activation)
    except ValueError as e:
        raise ArgumentError(f"{NAME}: {e}") from None
    R = weight.shape[-1]
    if not 1 <= R <= 11:
        raise ArgumentError(f"{NAME}: kernel size must be in [1, 11], got {R}")
    stride = _int_arg(stride, "stride", 1, 4)
    padding = _int_arg(padding, "padding", 0, 5)
    pool_size = _int_arg(pool_size, "pool_size", 1, 3)
    pool_stride = _int_arg(pool_stride if pool_stride is not None else pool_size, "pool_stride", 1, 3)
    pool_padding = _int_arg(pool_padding, "pool_padding", 0, pool_size // 2)  # max_pool2d: at most half the window
    if not isinstance(ceil_mode, bool):
        raise ArgumentError(f"{NAME}: ceil_mode must be a bool, got {ceil_mode!r}")
    if pool_size == 1 and (pool_stride != 1 or ceil_mode):
        raise ArgumentError(f"{NAME}: pool_size 1 means no pool: pool_stride must be 1 and ceil_mode False")
    if pool_size > 1 and activation is not None and not is_monotone(activation):
        raise ArgumentError(f"{NAME}: a pool fuses only after a non-decreasing activation ({sorted(MONOTONE)}), "
                            f"got {activation!r}: max does not commute with it")
    HO, WO, HP, WP = out_shape(*input.shape[-2:], R, stride, padding, pool_size, pool_stride, pool_padding,
                               ceil_mode)
    if min(HO, WO) < 1:
        raise ArgumentError(f"{NAME}: the kernel ({R}) is larger than the padded input "
                            f"({input.shape[-2] + 2 * padding}x{input.shape[-1] + 2 * padding})")
    if min(HP, WP) < 1:
        raise ArgumentError(f"{NAME}: the conv output ({HO}x{WO}) is too small for the pool window ({pool_size}, "
                            f"padding {pool_padding})")
    return stride, padding, pool_size, pool_stride, pool_padding


def conv_act_pool2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
                    activation: Optional[str] = "relu", pool_size=1, pool_stride=None, pool_padding=0,
                    ceil_mode: bool = False) -> Tensor:
    """``MaxPool2d(pool_size, pool_stride, pool_padding, ceil_mode=ceil_mode)(act(Conv2d(x)))``; pool_size 1: no
    pool. Groups 1, dilation 1, zero padding.

    input: (N, C, H, W) or (C, H, W); weight: (K, C, k, k); bias: (K,) or None. Square kernels 1..11, stride 1..4,
    padding 0..5; pools 2 or 3 (stride 1..3, default pool_size; padding up to half the window; floor or ceil
    mode), only after a non-decreasing activation (relu, leaky_relu, elu, relu6, hardsigmoid, sigmoid, tanh, or
    none). activation: any of pydlx.ops.linear's (None for none).
    """
    if all(isinstance(t, Tensor) and t.is_floating_point() for t in (input, weight, bias) if t is not None):
        # under torch.autocast, cast first (as F.conv2d does), so a bf16 activation meets fp32 weights
        input, weight, bias = autocast_cast(input.device.type, (input, weight, bias))
    stride, padding, P, Q, PP = check_conv_relu_pool_args(input, weight, bias, stride, padding, pool_size,
                                                          pool_stride, pool_padding, ceil_mode, activation)
    if _backend.cpu_auto(input):
        # CPU + auto: plain eager PyTorch, the fastest there (the op's index bookkeeping costs ~1.4x on a CPU
        # training step, bench/results/cpu.csv); the reference backend, forced, runs the op (and its memory saving)
        return reference_conv_act_pool2d(input, weight, bias, stride, padding, activation, P, Q, PP, ceil_mode)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    save_preact = training and P == 1 and activation is not None and saves_preact(activation)
    y, _, _ = conv_relu_pool2d_fwd(x, weight, bias, stride, padding, P, Q, PP, ceil_mode, activation or "none",
                                   save_preact, choose(x, weight, stride, padding, P, Q, PP, ceil_mode, activation,
                                                       training))
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    return y.squeeze(0) if unbatched else y


def conv_relu_pool2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
                     pool_size=2, pool_stride=None, pool_padding=0, ceil_mode: bool = False) -> Tensor:
    """``MaxPool2d(pool_size, pool_stride, pool_padding, ceil_mode=ceil_mode)(ReLU(Conv2d(x)))``: conv_act_pool2d
    with ReLU (see there for the supported options); pool 2 or 3."""
    return conv_act_pool2d(input, weight, bias, stride, padding, "relu", pool_size, pool_stride, pool_padding,
                           ceil_mode)


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


def fold_costs_memory(input: Tensor, weight: Tensor, out_elems: int, *others: Optional[Tensor]) -> bool:
    """Whether folding would make backward keep more than eager does: with gradients, the folded weight (as large as
    the weight) is saved for backward, where eager's BatchNorm keeps its input (one output map). Folding pays when
    the map is at least the weight's size -- the early, wide layers; the late layers of a small batch (ResNet-18's
    512x512x3x3 convs on 4x4 maps at batch 8) run as written. Without gradients nothing is saved: always fold."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (input, weight, *others)):
        return False
    return weight.numel() > out_elems


def conv_bn_act_pool2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], running_mean: Tensor,
                       running_var: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float,
                       stride=1, padding=0, activation: Optional[str] = "relu", pool_size=1, pool_stride=None,
                       pool_padding=0, ceil_mode: bool = False, training: bool = False,
                       momentum: Optional[float] = 0.1, num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """MaxPool2d(act(BatchNorm2d(Conv2d(x)))) (pydlx.optimize's Conv2d -> BatchNorm2d [-> act] [-> MaxPool2d]
    chains); the BatchNorm's arguments are F.batch_norm's, ``num_batches_tracked`` its buffer (incremented here in
    training mode, as BatchNorm2d.forward does; ``momentum`` None: the cumulative average).

    Eval mode (``training`` False): the BatchNorm folded into the convolution from the running statistics. Training
    mode: batch statistics (running statistics updated in place) -- the conv output cannot be folded, so the op saves
    only x for backward and recomputes the conv and the BatchNorm there (``conv_bn_train``); under ``auto`` it runs
    as eager PyTorch until a GPU measures the recompute. An input BatchNorm2d would refuse (not 4-D, one value per
    channel in training) runs the chain eagerly, so it refuses as torch does; so does an eval-mode call where folding
    would save more for backward than eager (``fold_costs_memory``)."""
    if training:
        return conv_bn_train(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, stride, padding,
                             activation, pool_size, pool_stride, pool_padding, ceil_mode, momentum,
                             num_batches_tracked)
    def out_elems() -> int:
        R = weight.shape[-1]
        st, pd = (v if isinstance(v, int) else v[0] for v in (stride, padding))
        HO, WO = ((n + 2 * pd - R) // st + 1 for n in input.shape[-2:])
        return input.shape[0] * weight.shape[0] * max(HO, 0) * max(WO, 0)

    if not (isinstance(input, Tensor) and input.dim() == 4) or fold_costs_memory(
            input, weight, out_elems(), bias, bn_weight, bn_bias):
        return _eager_conv_bn(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, stride,
                              padding, activation, pool_size, pool_stride, pool_padding, ceil_mode, False, 0.0)
    w, b = fold_batchnorm(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps)
    return conv_act_pool2d(input, w, b, stride, padding, activation, pool_size, pool_stride, pool_padding, ceil_mode)


def _eager_conv_bn(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, stride, padding,
                   activation, pool_size, pool_stride, pool_padding, ceil_mode, training, momentum) -> Tensor:
    """The chain as eager PyTorch runs it (torch's own argument errors included: BatchNorm2d's for a 3-D input)."""
    z = F.conv2d(input, weight, bias, stride, padding)
    if z.dim() != 4:
        raise ValueError(f"expected 4D input (got {z.dim()}D input)")  # BatchNorm2d._check_input_dim's error
    z = activation_forward(F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps),
                           activation)
    return z if pool_size == 1 else F.max_pool2d(
        z, pool_size, pool_stride if pool_stride is not None else pool_size, pool_padding, ceil_mode=ceil_mode)


# --------------------------------------------------------------------- training-mode BatchNorm: recomputed in backward
def _conv_fn(backend: str, stride: int, padding: int):
    """The backend's convolution (no activation, no pool) as conv(x, w, b)."""
    impl = _impl(backend)
    return lambda x, w, b: impl.conv_relu_pool_fwd(x, w, b, stride, padding, 1, 1, 0, False, None, False)[0]


@torch.library.custom_op("pydlx::conv_bn_train_fwd", mutates_args=())
def conv_bn_train_fwd(input: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                      bn_bias: Optional[Tensor], eps: float, stride: int, padding: int, pool_size: int,
                      pool_stride: int, pool_padding: int, ceil_mode: bool, activation: str, backend: str
                      ) -> Tuple[Tensor, Tensor, Tensor]:
    return reference_conv_bn_train_fwd(_conv_fn(backend, stride, padding), input, weight, bias, bn_weight, bn_bias,
                                       eps, pool_size, pool_stride, pool_padding, ceil_mode, _act_name(activation))


@conv_bn_train_fwd.register_fake
def _(input, weight, bias, bn_weight, bn_bias, eps, stride, padding, pool_size, pool_stride, pool_padding, ceil_mode,
      activation, backend):
    _, _, HP, WP = out_shape(*input.shape[-2:], weight.shape[-1], stride, padding, pool_size, pool_stride,
                             pool_padding, ceil_mode)
    stats = input.new_empty(weight.shape[0], dtype=math_dtype(input.dtype))
    return input.new_empty((input.shape[0], weight.shape[0], HP, WP)), stats, torch.empty_like(stats)


@torch.library.custom_op("pydlx::conv_bn_train_bwd", mutates_args=())
def conv_bn_train_bwd(grad: Tensor, input: Tensor, weight: Tensor, bias: Optional[Tensor],
                      bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], mean: Tensor, var: Tensor, eps: float,
                      stride: int, padding: int, pool_size: int, pool_stride: int, pool_padding: int, ceil_mode: bool,
                      activation: str, backend: str, need_input: bool, need_weight: bool, need_bias: bool
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = reference_conv_bn_train_bwd(_conv_fn(backend, stride, padding), grad, input, weight, bias, bn_weight,
                                        bn_bias, mean, var, eps, stride, padding, pool_size, pool_stride,
                                        pool_padding, ceil_mode, _act_name(activation), need_input, need_weight,
                                        need_bias)
    like = (input, weight, bias, bn_weight, bn_bias)
    return tuple(g.to(t.dtype) if g is not None else input.new_empty(0) for g, t in zip(grads, like))


@conv_bn_train_bwd.register_fake
def _(grad, input, weight, bias, bn_weight, bn_bias, mean, var, eps, stride, padding, pool_size, pool_stride,
      pool_padding, ceil_mode, activation, backend, need_input, need_weight, need_bias):
    def like(t, needed):
        return torch.empty_like(t) if t is not None and needed else input.new_empty(0)
    return (like(input, need_input), like(weight, need_weight), like(bias, need_bias), like(bn_weight, True),
            like(bn_bias, True))


def _train_setup_context(ctx, inputs, output):
    input, weight, bias, bn_weight, bn_bias, eps, stride, padding, P, Q, PP, ceil_mode, activation, backend = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.set_materialize_grads(False)
    # x and the per-channel statistics only (and the parameters, which live anyway): no activation-sized tensor
    ctx.save_for_backward(input, weight, bias, bn_weight, bn_bias, mean, var)
    ctx.args = (eps, stride, padding, P, Q, PP, ceil_mode, activation, backend)


def _train_backward(ctx, grad_y, grad_mean, grad_var):
    input, weight, bias, bn_weight, bn_bias, mean, var = ctx.saved_tensors
    if grad_y is None:
        return (None,) * 14
    need = ctx.needs_input_grad
    dx, dw, db, dg, dbeta = conv_bn_train_bwd(grad_y.contiguous(), input, weight, bias, bn_weight, bn_bias, mean,
                                              var, *ctx.args, need[0], need[1], need[2])
    keep = lambda g, i, t: g if need[i] and t is not None else None  # noqa: E731
    return (keep(dx, 0, input), keep(dw, 1, weight), keep(db, 2, bias), keep(dg, 3, bn_weight),
            keep(dbeta, 4, bn_bias)) + (None,) * 9


torch.library.register_autograd("pydlx::conv_bn_train_fwd", _train_backward, setup_context=_train_setup_context)


def conv_bn_train(input: Tensor, weight: Tensor, bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
                  bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float, stride=1, padding=0,
                  activation: Optional[str] = "relu", pool_size=1, pool_stride=None, pool_padding=0,
                  ceil_mode: bool = False, momentum: Optional[float] = 0.1,
                  num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """``conv_bn_act_pool2d`` with the BatchNorm in training mode: the conv output is needed whole for the batch
    statistics, so the conv runs first (the backend's), then the normalisation, activation and pool; backward
    recomputes the conv output from x. Saved for backward: x and two per-channel vectors -- against eager's x, the
    conv output (BatchNorm's input), the activation output and int64 pool indices; the price is one more
    convolution forward in backward. Under ``auto`` (CPU, and GPUs until a measurement says the memory is worth the
    recompute) the chain runs as eager PyTorch."""
    factor = momentum_factor(momentum, num_batches_tracked)  # (BatchNorm2d.forward's bookkeeping)
    if not (isinstance(input, Tensor) and input.dim() == 4) or _backend.current_backend() == "auto" or \
            running_mean is None or running_var is None:
        return _eager_conv_bn(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, stride,
                              padding, activation, pool_size, pool_stride, pool_padding, ceil_mode, True, factor)
    if all(isinstance(t, Tensor) and t.is_floating_point() for t in (input, weight, bias) if t is not None):
        input, weight, bias = autocast_cast(input.device.type, (input, weight, bias))
    stride, padding, P, Q, PP = check_conv_relu_pool_args(input, weight, bias, stride, padding, pool_size,
                                                          pool_stride, pool_padding, ceil_mode, activation)
    HO, WO, _, _ = out_shape(*input.shape[-2:], weight.shape[-1], stride, padding, P, Q, PP, ceil_mode)
    if input.shape[0] * HO * WO == 1:  # torch: "Expected more than 1 value per channel when training" (ValueError)
        return _eager_conv_bn(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, stride,
                              padding, activation, P, Q, PP, ceil_mode, True, factor)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    backend = choose(input, weight, stride, padding, 1, 1, 0, False, None, training)
    channels_last = input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()
    y, mean, var = conv_bn_train_fwd(input, weight, bias, bn_weight, bn_bias, float(eps), stride, padding, P, Q,
                                     PP, ceil_mode, activation or "none", backend)
    update_running_stats(running_mean, running_var, mean, var, input.shape[0] * HO * WO, factor)
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y
