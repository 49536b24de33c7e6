"""``pydlx.ops.conv_act_pool2d``: MaxPool2d(act(Conv2d(x))) -- or act(Conv2d(x)) without the pool -- in one kernel
that writes only its output; ``conv_relu_pool2d`` is its ReLU form, ``conv_bn_act_pool2d`` the form with a
BatchNorm2d after the conv (eval mode: folded into the convolution; training mode: pydlx/ops/batchnorm.py's training
form).

Ops (schemas: pydlx/ops/schemas.py): ``pydlx::conv_relu_pool2d_fwd`` -> (y, idx, z) and ``conv_relu_pool2d_bwd``
-> (dx, dw, db). Saved for backward: x, w, the output y (and idx / z) -- against eager's x, w, the full conv output,
the full activation output and int64 pool indices. With a pool the activation must be non-decreasing (max commutes
with it; its derivative is then a function of y). The implementations are pydlx/<backend>/conv_relu_pool.py; every
backend's backward routes dy through idx and the activation's derivative into the conv output's gradient and runs
the convolution backward (cuDNN on GPUs): a fused backward is not written yet.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend, _geometry, registry
from .._geometry import out_shape
from ..activations import MONOTONE, check_activation, forward as activation_forward, is_monotone, saves_preact
from ..reference.batchnorm import momentum_factor
from ..reference.conv_relu_pool import conv_act_pool2d as reference_conv_act_pool2d
from . import batchnorm
from ._common import (ArgumentError, act_name, autocast_cast, autocast_enabled, autograd, check_floating, check_like,
                      implement, metas, plain, traced)


_FOUND = registry.found("conv_relu_pool")


def _impl(backend: str):
    return _FOUND.get(backend) or registry.implementation("conv_relu_pool", backend)


def choose(x: Tensor, weight: Tensor, stride: int, padding: int, P: int, Q: int, PP: int, ceil_mode: bool,
           activation: Optional[str], training: bool, op: str = "pydlx.ops.conv_act_pool2d") -> str:
    """The backend for one call (pydlx/_backend.py). Without a measured policy, auto on GPUs runs the eager
    forward (cuDNN) inside the op -- which still saves only the output and int8 indices for backward -- and the
    Triton and C++/CUDA kernels run when forced or when the GPU's policy measured them faster (policies are measured
    on the benchmarks' ReLU + floor-mode unpadded pool: registry.FAMILIES["conv_relu_pool"].policy_applies)."""
    N, C, H, W = x.shape
    call = registry.ConvCall(x.dtype, training, N, C, H, W, weight.shape[0], weight.shape[-1], stride, padding, P, Q,
                             PP, ceil_mode, activation, tuple(x.stride()))
    return _backend.choose("conv_relu_pool", x.device, call, op[len("pydlx."):])


# ----------------------------------------------------------------------------------------------- ops
def _fwd(input, weight, bias, stride, padding, pool_size, pool_stride, pool_padding, ceil_mode, activation,
         save_preact, backend, save_index=True):
    return _impl(backend).conv_relu_pool_fwd(input, weight, bias, stride, padding, pool_size, pool_stride,
                                             pool_padding, ceil_mode, act_name(activation), save_preact, save_index)


def _fwd_fake(input, weight, bias, stride, padding, pool_size, pool_stride, pool_padding, ceil_mode, activation,
              save_preact, backend, save_index=True):
    _, _, HP, WP = out_shape(*input.shape[-2:], weight.shape[-1], stride, padding, pool_size, pool_stride,
                             pool_padding, ceil_mode)
    shape = (input.shape[0], weight.shape[0], HP, WP)
    return (input.new_empty(shape), input.new_empty(shape if pool_size > 1 and save_index else (0,),
                                                    dtype=torch.int8),
            input.new_empty(shape if save_preact else (0,)))


def _bwd(grad, input, weight, y, idx, z, has_bias, stride, padding, pool_size, pool_stride, pool_padding,
         activation, need_input, need_weight, backend):
    dx, dw, db = _impl(backend).conv_relu_pool_bwd(grad, input, weight, y, idx, z, has_bias, stride, padding,
                                                   pool_size, pool_stride, pool_padding, act_name(activation),
                                                   need_input, need_weight)
    empty = lambda: input.new_empty(0)  # noqa: E731  (a fresh one per output: outputs must not alias)
    return (dx if need_input else empty(), dw if need_weight else empty(), db if has_bias else empty())


def _bwd_fake(grad, input, weight, y, idx, z, has_bias, stride, padding, pool_size, pool_stride, pool_padding,
              activation, need_input, need_weight, backend):
    return (torch.empty_like(input) if need_input else input.new_empty(0),
            torch.empty_like(weight) if need_weight else input.new_empty(0),
            weight.new_empty(weight.shape[0]) if has_bias else input.new_empty(0))


conv_relu_pool2d_fwd = implement("conv_relu_pool2d_fwd", _fwd, _fwd_fake, differentiable=True)
conv_relu_pool2d_bwd = implement("conv_relu_pool2d_bwd", _bwd, _bwd_fake, second_order=True)


def _save(a, out):
    y, idx, z = out
    # y only where backward reads it (a pool, or an activation whose derivative is a function of y): without an
    # activation nothing but x and w, so a later in-place op on y (ResNet's ``out += identity`` after a folded
    # Conv -> BatchNorm) is as legal as in eager
    needs_y = a.pool_size > 1 or (act_name(a.activation) is not None and z.numel() == 0)
    # (the bias, a parameter, costs no memory: a double backward recomputes z from it)
    return (a.input, a.weight, y if needs_y else y.new_empty(0), idx, z, *((a.bias,) if a.bias is not None else ()))


def _backward(a, saved, grads, needs):
    input, weight, y, idx, z, *bias = saved
    if a.backend == "reference" and torch.is_grad_enabled() and z.numel():
        # a backward that records a graph (create_graph=True): the saved z carries no history, the recomputed one
        # does (the pre-activation is saved only without a pool)
        z = torch.nn.functional.conv2d(input, weight, bias[0] if bias else None, a.stride, a.padding)
    if act_name(a.activation) is not None and saves_preact(a.activation) and z.numel() == 0 and grads[0].numel():
        raise RuntimeError("pydlx.ops.conv_act_pool2d: backward needs the pre-activation, but the forward ran with "
                           "save_preact=False (call the op through pydlx.ops.conv_act_pool2d)")
    if a.pool_size > 1 and idx.numel() == 0 and grads[0].numel():
        raise RuntimeError("pydlx.ops.conv_act_pool2d: backward needs the pool's argmax, but the forward ran with "
                           "save_index=False (call the op through pydlx.ops.conv_act_pool2d)")
    has_bias = a.has_bias and needs.bias
    dx, dw, db = conv_relu_pool2d_bwd(grads[0], input, weight, y, idx, z, has_bias, a.stride,
                                      a.padding, a.pool_size, a.pool_stride, a.pool_padding, a.activation,
                                      needs.input, needs.weight, a.backend)
    return {"input": dx, "weight": dw, "bias": db if has_bias else None}


autograd("conv_relu_pool2d_fwd", _save, _backward, non_differentiable=(1, 2))


# ----------------------------------------------------------------------------------------------- checks
def _int_arg(value, name: str, limits, op_name: str) -> int:
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ArgumentError(f"{op_name}: {name} must be an int or a pair of equal ints, got {value!r}")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or not _geometry.within(value, limits):
        raise ArgumentError(f"{op_name}: {name} must be an int in [{limits[0]}, {limits[1]}], got {value!r}")
    return value


def check_conv_relu_pool_args(input, weight, bias, stride, padding, pool_size, pool_stride, pool_padding=0,
                              ceil_mode=False, activation="relu", name: str = "pydlx.ops.conv_act_pool2d"):
    """Normalised (stride, padding, pool_size, pool_stride, pool_padding); raises a clear error naming the bad
    argument (and ``name``, the op the user called). The limits are pydlx/_geometry.py's."""
    if not isinstance(input, Tensor) or input.dim() not in (3, 4):
        got = f"{input.dim()}-D" if isinstance(input, Tensor) else type(input).__name__
        raise ArgumentError(f"{name}: input must be (N, C, H, W) or unbatched (C, H, W), got {got}")
    if not isinstance(weight, Tensor) or weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ArgumentError(f"{name}: weight must be (out_channels, in_channels, k, k) with a square kernel, got {got}")
    if weight.shape[1] != input.shape[-3]:
        raise ArgumentError(f"{name}: weight.shape[1] ({weight.shape[1]}) must equal the input's channels "
                            f"({input.shape[-3]}); groups other than 1 are not supported")
    check_floating(name, "input", input)
    check_like(name, "weight", weight, input)
    check_like(name, "bias", bias, input)
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ArgumentError(f"{name}: bias must be 1-D with {weight.shape[0]} elements, got {tuple(bias.shape)}")
    try:
        check_activation(activation)
    except ValueError as e:
        raise ArgumentError(f"{name}: {e}") from None
    R = weight.shape[-1]
    if not _geometry.within(R, _geometry.KERNEL):
        raise ArgumentError(f"{name}: kernel size must be in [{_geometry.KERNEL[0]}, {_geometry.KERNEL[1]}], got {R}")
    stride = _int_arg(stride, "stride", _geometry.STRIDE, name)
    padding = _int_arg(padding, "padding", _geometry.PADDING, name)
    pool_size = _int_arg(pool_size, "pool_size", _geometry.POOL, name)
    pool_stride = _int_arg(pool_stride if pool_stride is not None else pool_size, "pool_stride",
                           _geometry.POOL_STRIDE, name)
    pool_padding = _int_arg(pool_padding, "pool_padding", (0, pool_size // 2), name)  # max_pool2d: half the window
    if not isinstance(ceil_mode, bool):
        raise ArgumentError(f"{name}: ceil_mode must be a bool, got {ceil_mode!r}")
    if pool_size == 1 and (pool_stride != 1 or ceil_mode):
        raise ArgumentError(f"{name}: pool_size 1 means no pool: pool_stride must be 1 and ceil_mode False")
    if pool_size > 1 and activation is not None and not is_monotone(activation):
        raise ArgumentError(f"{name}: a pool fuses only after a non-decreasing activation ({sorted(MONOTONE)}), "
                            f"got {activation!r}: max does not commute with it")
    HO, WO, HP, WP = out_shape(*input.shape[-2:], R, stride, padding, pool_size, pool_stride, pool_padding,
                               ceil_mode)
    if min(HO, WO) < 1:
        raise ArgumentError(f"{name}: the kernel ({R}) is larger than the padded input "
                            f"({input.shape[-2] + 2 * padding}x{input.shape[-1] + 2 * padding})")
    if min(HP, WP) < 1:
        raise ArgumentError(f"{name}: the conv output ({HO}x{WO}) is too small for the pool window ({pool_size}, "
                            f"padding {pool_padding})")
    return stride, padding, pool_size, pool_stride, pool_padding


def _cast(input, weight, bias):
    """Under torch.autocast, cast first (as F.conv2d does), so a bf16 activation meets fp32 weights."""
    if all(isinstance(t, Tensor) and t.is_floating_point() for t in (input, weight, bias) if t is not None):
        return autocast_cast(input.device.type, (input, weight, bias))
    return input, weight, bias


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------------- entry points
_PLANS = _backend.Plans()
_EAGER = "eager"  # a plan: plain eager PyTorch (a CPU tensor under auto)


def _plan(name, input, weight, bias, stride, padding, activation, pool_size, pool_stride, pool_padding, ceil_mode):
    """What a call of ``_conv_act_pool2d`` runs, derived once per signature: (_EAGER, normalised geometry), or
    (backend, normalised geometry, save_preact, whether autograd records the call)."""
    geometry = check_conv_relu_pool_args(input, weight, bias, stride, padding, pool_size, pool_stride, pool_padding,
                                         ceil_mode, activation, name)
    if _backend.cpu_auto(input):
        return _EAGER, geometry
    stride, padding, P, Q, PP = geometry
    x = input.unsqueeze(0) if input.dim() == 3 else input
    training = _needs_grad(input, weight, bias)
    save_preact = training and P == 1 and activation is not None and saves_preact(activation)
    return (choose(x, weight, stride, padding, P, Q, PP, ceil_mode, activation, training, name), geometry,
            save_preact, training)


def _conv_act_pool2d(name: str, input, weight, bias, stride, padding, activation, pool_size, pool_stride,
                     pool_padding, ceil_mode) -> Tensor:
    if not traced() and plain(input, weight, bias):
        if autocast_enabled():
            input, weight, bias = _cast(input, weight, bias)
        key = (name, metas((input, weight, bias)), input.stride(), stride, padding, activation, pool_size,
               pool_stride, pool_padding, ceil_mode, torch.is_grad_enabled(), _backend.state())
        plan = _PLANS.get(key)
        if plan is None:
            plan = _PLANS.keep(key, _plan(name, input, weight, bias, stride, padding, activation, pool_size,
                                          pool_stride, pool_padding, ceil_mode))
        backend, (stride, padding, P, Q, PP) = plan[:2]
        if backend is _EAGER:
            return reference_conv_act_pool2d(input, weight, bias, stride, padding, activation, P, Q, PP, ceil_mode)
        unbatched = input.dim() == 3
        x = input.unsqueeze(0) if unbatched else input
        y = conv_relu_pool2d_fwd.eager(plan[3], x, weight, bias, stride, padding, P, Q, PP, ceil_mode,
                                       activation or "none", plan[2], backend, plan[3])[0]
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            y = y.contiguous(memory_format=torch.channels_last)
        return y.squeeze(0) if unbatched else y
    input, weight, bias = _cast(input, weight, bias)
    stride, padding, P, Q, PP = check_conv_relu_pool_args(input, weight, bias, stride, padding, pool_size,
                                                          pool_stride, pool_padding, ceil_mode, activation, name)
    if _backend.cpu_auto(input):
        # CPU + auto: plain eager PyTorch, the fastest there (the op's index bookkeeping costs ~1.4x on a CPU
        # training step, bench/results/cpu.csv); the reference backend, forced, runs the op (and its memory saving)
        return reference_conv_act_pool2d(input, weight, bias, stride, padding, activation, P, Q, PP, ceil_mode)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    training = _needs_grad(input, weight, bias)
    save_preact = training and P == 1 and activation is not None and saves_preact(activation)
    y, _, _ = conv_relu_pool2d_fwd(x, weight, bias, stride, padding, P, Q, PP, ceil_mode, activation or "none",
                                   save_preact, choose(x, weight, stride, padding, P, Q, PP, ceil_mode, activation,
                                                       training, name), training)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    return y.squeeze(0) if unbatched else y


def conv_act_pool2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
                    activation: Optional[str] = "relu", pool_size=1, pool_stride=None, pool_padding=0,
                    ceil_mode: bool = False) -> Tensor:
    """``MaxPool2d(pool_size, pool_stride, pool_padding, ceil_mode=ceil_mode)(act(Conv2d(x)))``; pool_size 1: no
    pool. Groups 1, dilation 1, zero padding.

    input: (N, C, H, W) or (C, H, W); weight: (K, C, k, k); bias: (K,) or None. Square kernels 1..11, stride 1..4,
    padding 0..5 (pydlx/_geometry.py); pools 2 or 3 (stride 1..3, default pool_size; padding up to half the window;
    floor or ceil mode), only after a non-decreasing activation (relu, leaky_relu, elu, relu6, hardsigmoid, selu,
    sigmoid, tanh, or none). activation: any of pydlx.ops.linear's (None for none).
    """
    return _conv_act_pool2d("pydlx.ops.conv_act_pool2d", input, weight, bias, stride, padding, activation, pool_size,
                            pool_stride, pool_padding, ceil_mode)


def conv_relu_pool2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
                     pool_size=2, pool_stride=None, pool_padding=0, ceil_mode: bool = False) -> Tensor:
    """``MaxPool2d(pool_size, pool_stride, pool_padding, ceil_mode=ceil_mode)(ReLU(Conv2d(x)))``: conv_act_pool2d
    with ReLU (see there for the supported options); pool 2 or 3."""
    return _conv_act_pool2d("pydlx.ops.conv_relu_pool2d", input, weight, bias, stride, padding, "relu", pool_size,
                            pool_stride, pool_padding, ceil_mode)


def conv_bn_act_pool2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], running_mean: Tensor,
                       running_var: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float,
                       stride=1, padding=0, activation: Optional[str] = "relu", pool_size=1, pool_stride=None,
                       pool_padding=0, ceil_mode: bool = False, training: bool = False,
                       momentum: Optional[float] = 0.1, num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """MaxPool2d(act(BatchNorm2d(Conv2d(x)))) (pydlx.optimize's Conv2d -> BatchNorm2d [-> act] [-> MaxPool2d]
    chains); the BatchNorm's arguments are F.batch_norm's, ``num_batches_tracked`` its buffer (incremented here in
    training mode, as BatchNorm2d.forward does; ``momentum`` None: the cumulative average).

    Eval mode (``training`` False): the BatchNorm folded into the convolution from the running statistics. Training
    mode: batch statistics (running statistics updated in place) -- the conv output cannot be folded, so under a
    forced backend the op saves only x for backward and recomputes the conv and the BatchNorm there
    (pydlx/ops/batchnorm.py); under ``auto`` it runs as eager PyTorch until a GPU measures the recompute. An input
    BatchNorm2d would refuse (not 4-D, one value per channel in training) runs the chain eagerly, so it refuses as
    torch does; so does an eval-mode call where folding would save more for backward than eager
    (``pydlx.ops.batchnorm.fold_costs_memory``)."""
    eager = (input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, stride, padding, activation,
             pool_size, pool_stride, pool_padding, ceil_mode)
    if training:
        return _conv_bn_train(*eager, momentum, num_batches_tracked)

    if not (isinstance(input, Tensor) and input.dim() == 4) or batchnorm.fold_costs_memory(
            input, weight, (bias, bn_weight, bn_bias), _conv_out_elems, input, weight, stride, padding):
        return _eager_conv_bn(*eager, False, 0.0)
    w, b = batchnorm.folded(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps)
    return _conv_act_pool2d("pydlx.ops.conv_bn_act_pool2d", input, w, b, stride, padding, activation, pool_size,
                            pool_stride, pool_padding, ceil_mode)


def _conv_out_elems(input: Tensor, weight: Tensor, stride, padding) -> int:
    """Elements of the convolution's output map (before any pool)."""
    st, pd = (v if isinstance(v, int) else v[0] for v in (stride, padding))
    HO, WO, _, _ = out_shape(*input.shape[-2:], weight.shape[-1], st, pd, 1, 1)
    return input.shape[0] * weight.shape[0] * max(HO, 0) * max(WO, 0)


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


def _conv_bn_train(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, stride, padding,
                   activation, pool_size, pool_stride, pool_padding, ceil_mode, momentum, num_batches_tracked
                   ) -> Tensor:
    """``conv_bn_act_pool2d`` in training mode: the conv output is needed whole for the batch statistics, so the
    conv runs first (the backend's), then the normalisation, activation and pool; backward recomputes the conv
    output from x (pydlx/ops/batchnorm.py). Under ``auto`` (CPU, and GPUs until a measurement says the memory is
    worth the recompute) the chain runs as eager PyTorch."""
    factor = momentum_factor(momentum, num_batches_tracked)  # (BatchNorm2d.forward's bookkeeping)
    eager = (input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, stride, padding, activation)
    if not (isinstance(input, Tensor) and input.dim() == 4) or _backend.current_backend() == "auto" or \
            running_mean is None or running_var is None:
        return _eager_conv_bn(*eager, pool_size, pool_stride, pool_padding, ceil_mode, True, factor)
    input, weight, bias = _cast(input, weight, bias)
    tensors = (input, weight, bias, running_mean, running_var, bn_weight, bn_bias)
    options = (stride, padding, activation, pool_size, pool_stride, pool_padding, ceil_mode)
    if traced() or not plain(*tensors):
        plan = _train_plan(input, weight, bias, *options)
    else:  # (kept per call signature, as the other entry points keep theirs)
        key = (metas(tensors), options, torch.is_grad_enabled(), _backend.state())
        plan = _TRAIN_PLANS.get(key)
        if plan is None:
            plan = _TRAIN_PLANS.keep(key, _train_plan(input, weight, bias, *options))
    backend, geometry, count = plan
    if backend is _EAGER:  # torch: "Expected more than 1 value per channel when training" (ValueError)
        return _eager_conv_bn(*eager, *geometry[2:], ceil_mode, True, factor)
    return batchnorm.train("conv", (*geometry, ceil_mode), input, weight, bias, running_mean, running_var, bn_weight,
                           bn_bias, eps, activation or "none", backend, factor, count)


_TRAIN_PLANS = _backend.Plans()


def _train_plan(input, weight, bias, stride, padding, activation, pool_size, pool_stride, pool_padding, ceil_mode):
    """What a training-form call runs, derived once per signature: (backend, the checked geometry (stride, padding,
    P, Q, PP), values per channel), or _EAGER for a call BatchNorm2d refuses (one value per channel)."""
    name = "pydlx.ops.conv_bn_act_pool2d"
    geometry = check_conv_relu_pool_args(input, weight, bias, stride, padding, pool_size, pool_stride, pool_padding,
                                         ceil_mode, activation, name)
    stride, padding, P, Q, PP = geometry
    HO, WO, _, _ = out_shape(*input.shape[-2:], weight.shape[-1], stride, padding, P, Q, PP, ceil_mode)
    count = input.shape[0] * HO * WO
    if count == 1:
        return _EAGER, geometry, count
    return choose(input, weight, stride, padding, 1, 1, 0, False, None, _needs_grad(input, weight, bias), name), \
        geometry, count
