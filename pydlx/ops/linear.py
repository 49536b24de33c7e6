"""``pydlx.ops.linear``: act(input @ weight.T + bias) as torch.library ops with autograd.

Ops (schemas defined once, here):
  pydlx::linear_fwd(input, weight, bias, activation, save_preact, backend) -> (y, z)
      y = act(input @ weight.T + bias), any leading dims; z = the pre-activation when ``save_preact``, else an
      empty tensor. z is non-differentiable: it exists only to be saved for backward.
  pydlx::linear_bwd(grad, input, weight, saved, activation, has_bias, need_dx, need_dw, backend) -> (dx, dw, db)
      empty tensors stand for gradients that are not needed.
  pydlx::linear_bn_train_fwd(input, weight, bias, bn_weight, bn_bias, eps, activation, backend) -> (y, mean, var)
      ``linear_batchnorm``'s training form: act(BatchNorm1d(x W^T + b)) with batch statistics (mean and biased
      variance per feature, fp32 for 16-bit x; non-differentiable); saves x, backward recomputes x W^T + b.
  pydlx::linear_bn_train_bwd(grad, input, weight, bias, bn_weight, bn_bias, mean, var, eps, activation, backend,
      need_input, need_weight, need_bias) -> (dx, dw, db, dgamma, dbeta)

``activation`` is a spec string (pydlx/reference/linear.py: "relu", "leaky_relu(0.2)", ..., or "none"), passed in
its canonical form. Saved for backward: input, weight and one M×N tensor: y for relu/tanh/sigmoid/leaky_relu/elu/
relu6/hardsigmoid (their derivative is a function of y), z for gelu/gelu_tanh/silu/hardswish/mish (it is not;
recomputing z would cost a second forward GEMM). With no activation nothing but input and weight is saved.

Each call's backend is chosen by the dispatcher (pydlx/_backend.py: forced, or auto by the GPU's measured policy)
before the op runs and passed to it (``backend``): the backward runs on the forward's backend, and torch.compile
sees one opaque op and no graph break. The implementations are pydlx/{reference,triton,cuda}/linear.py.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from .._policy import size_of
from ._common import ArgumentError, DtypeError, rows, FLOAT_DTYPES, autocast_cast, why_not_kernel_dtype
from ..activations import activation_spec, check_activation, forward as activation_forward, saves_preact
from ..reference.batchnorm import linear_bn_train_bwd as reference_linear_bn_train_bwd
from ..reference.batchnorm import linear_bn_train_fwd as reference_linear_bn_train_fwd, math_dtype
from ..reference.batchnorm import momentum_factor, update_running_stats
from ..reference.linear import linear as reference_linear


def _act_name(activation: str) -> Optional[str]:
    return None if activation == "none" else activation


def _op_activation(activation: Optional[str]) -> str:
    """The spec a custom op takes: canonical (one spelling, one compiled kernel), "none" for None."""
    return activation_spec(*check_activation(activation)) or "none"


def _impl(backend: str):
    return _backend.implementation("linear", backend)


def choose(x: Tensor, weight: Tensor, training: bool) -> str:
    """The backend for one call (pydlx/_backend.py): forced, or auto by the GPU's policy / defaults."""
    def kernel_check(backend):
        return lambda: why_not_kernel_dtype(x) or _impl(backend).why_cannot(weight.shape[1], weight.shape[0])

    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    call = _backend.CallKey(x.dtype, "training" if training else "inference",
                            size_of("linear", M=M, N=weight.shape[0], K=weight.shape[1]))
    return _backend.choose("linear", x, checks={"triton": kernel_check("triton"), "cuda": kernel_check("cuda")},
                           call=call)


@torch.library.custom_op("pydlx::linear_fwd", mutates_args=())
def linear_fwd(input: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
               save_preact: bool, backend: str) -> Tuple[Tensor, Tensor]:
    lead = input.shape[:-1]
    y, z = _impl(backend).linear_fwd(rows(input), weight, bias, _act_name(activation), save_preact)
    y = y.reshape(*lead, weight.shape[0])
    return y, (z.reshape(*lead, weight.shape[0]) if save_preact else z)


@linear_fwd.register_fake
def _(input, weight, bias, activation, save_preact, backend):
    y = input.new_empty((*input.shape[:-1], weight.shape[0]))
    return y, (torch.empty_like(y) if save_preact else input.new_empty(0))


@torch.library.custom_op("pydlx::linear_bwd", mutates_args=())
def linear_bwd(grad: Tensor, input: Tensor, weight: Tensor, saved: Tensor, activation: str, has_bias: bool,
               need_dx: bool, need_dw: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    act = _act_name(activation)
    s2d = rows(saved) if act is not None else saved
    dx, dw, db = _impl(backend).linear_bwd(rows(grad), rows(input), weight, s2d, act, has_bias, need_dx, need_dw)
    return (dx.reshape(input.shape) if dx is not None else input.new_empty(0),
            dw if dw is not None else input.new_empty(0),
            db if db is not None else input.new_empty(0))


@linear_bwd.register_fake
def _(grad, input, weight, saved, activation, has_bias, need_dx, need_dw, backend):
    return (torch.empty_like(input) if need_dx else input.new_empty(0),
            torch.empty_like(weight) if need_dw else input.new_empty(0),
            weight.new_empty(weight.shape[0]) if has_bias else input.new_empty(0))


def _setup_context(ctx, inputs, output):
    input, weight, bias, activation, save_preact, backend = inputs
    y, z = output
    ctx.mark_non_differentiable(z)
    ctx.set_materialize_grads(False)
    act = _act_name(activation)
    saved = (z if saves_preact(act) else y) if act is not None else input.new_empty(0)
    ctx.save_for_backward(input, weight, saved)
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.backend = backend  # the backward runs where the forward ran (their saved tensors match)


def _backward(ctx, grad_y, grad_z):
    input, weight, saved = ctx.saved_tensors
    if grad_y is None:
        return None, None, None, None, None, None
    if saves_preact(_act_name(ctx.activation)) and saved.numel() == 0 and grad_y.numel() != 0:
        raise RuntimeError("pydlx.ops.linear: backward needs the pre-activation, but the forward ran with "
                           "save_preact=False; call pydlx.ops.linear, which sets it when gradients are needed")
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    dx, dw, db = linear_bwd(grad_y, input, weight, saved, ctx.activation, ctx.has_bias and need_db,
                            need_dx, need_dw, ctx.backend)
    return (dx if need_dx else None, dw if need_dw else None, db if (ctx.has_bias and need_db) else None,
            None, None, None)


torch.library.register_autograd("pydlx::linear_fwd", _backward, setup_context=_setup_context)


def check_linear_args(input, weight, bias, activation) -> None:
    """Raise a clear error naming the bad argument. Runs before any kernel."""
    if not isinstance(input, Tensor):
        raise TypeError(f"pydlx.ops.linear: input must be a Tensor, got {type(input).__name__}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        got = f"shape {tuple(weight.shape)}" if isinstance(weight, Tensor) else type(weight).__name__
        raise ArgumentError(f"pydlx.ops.linear: weight must be a 2-D tensor (out_features, in_features), got {got}")
    try:
        check_activation(activation)
    except ValueError as e:
        raise ArgumentError(f"pydlx.ops.linear: {e}") from None
    if input.dim() == 0:
        raise ArgumentError("pydlx.ops.linear: input must have at least 1 dimension, got a 0-D tensor")
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise DtypeError(f"pydlx.ops.linear: {name} must be a floating-point tensor "
                            f"(float16, bfloat16, float32, float64), got {t.dtype}")
    if input.shape[-1] != weight.shape[1]:
        raise ArgumentError(f"pydlx.ops.linear: input's last dimension ({input.shape[-1]}) must equal "
                         f"in_features = weight.shape[1] ({weight.shape[1]}); input shape {tuple(input.shape)}, "
                         f"weight shape {tuple(weight.shape)}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ArgumentError(f"pydlx.ops.linear: bias must be 1-D with out_features = {weight.shape[0]} "
                             f"elements, got shape {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != input.device:
            raise ArgumentError(f"pydlx.ops.linear: {name} is on {t.device} but input is on {input.device}; "
                             "all tensors must be on one device")
        if t is not None and t.dtype != input.dtype:
            raise DtypeError(f"pydlx.ops.linear: {name} has dtype {t.dtype} but input has {input.dtype}; "
                            "they must match (or run under torch.autocast)")


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
           activation: Optional[str] = None) -> Tensor:
    """act(input @ weight.T + bias), like ``act(F.linear(input, weight, bias))``, in one fused kernel.

    input: (*, in_features); weight: (out_features, in_features); bias: (out_features,) or None.
    activation: None, "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "leaky_relu" (or
    "leaky_relu(slope)", slope >= 0), "elu" (or "elu(alpha)", alpha > 0), "hardswish", "hardsigmoid", "mish", "relu6".
    Under torch.autocast the three tensors are cast to the autocast dtype, as F.linear's are.
    Backward saves y or the pre-activation z (gelu, gelu_tanh, silu, hardswish, mish); see module docs.
    """
    if all(isinstance(t, Tensor) and t.is_floating_point() for t in (input, weight, bias) if t is not None):
        # under torch.autocast, cast first (as F.linear does), so a bf16 activation meets fp32 weights
        input, weight, bias = autocast_cast(input.device.type, (input, weight, bias))
    check_linear_args(input, weight, bias, activation)
    if _backend.cpu_auto(input):
        return reference_linear(input, weight, bias, activation)
    needs_grad = torch.is_grad_enabled() and (
        input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    save_preact = needs_grad and saves_preact(activation)
    y, _ = linear_fwd(input, weight, bias, _op_activation(activation), save_preact,
                      choose(input, weight, needs_grad))
    return y


def linear_batchnorm(input: Tensor, weight: Tensor, bias: Optional[Tensor], running_mean: Tensor,
                     running_var: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float,
                     activation: Optional[str] = None, training: bool = False, momentum: Optional[float] = 0.1,
                     num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """act(BatchNorm1d(Linear(x))) (pydlx.optimize's Linear -> BatchNorm1d [-> act] chains); the BatchNorm's
    arguments are F.batch_norm's, ``num_batches_tracked`` its buffer (incremented here in training mode, as
    BatchNorm1d.forward does; ``momentum`` None: the cumulative average). BatchNorm1d normalises dim 1, the Linear's
    features only for 2-D input: other ranks run the chain eagerly, as torch does.

    Eval mode: the BatchNorm folded into the Linear from its running statistics; a call where folding would save
    more for backward than eager runs eagerly (pydlx.ops.conv_relu_pool.fold_costs_memory). Training mode: batch
    statistics; under a forced backend the op saves only x and recomputes the Linear's output in backward (against
    eager's x, the Linear's output and the activation's), under ``auto`` the chain runs as eager PyTorch until a GPU
    measures the recompute."""
    from .conv_relu_pool import fold_batchnorm, fold_costs_memory

    if training:
        return _linear_bn_train(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, activation,
                                momentum, num_batches_tracked)
    if not (isinstance(input, Tensor) and input.dim() == 2) or fold_costs_memory(
            input, weight, input.shape[0] * weight.shape[0], bias, bn_weight, bn_bias):
        return _eager_linear_bn(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, activation,
                                False, 0.0)
    w, b = fold_batchnorm(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps)
    return linear(input, w, b, activation)


def _eager_linear_bn(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, activation, training,
                     momentum) -> Tensor:
    """The chain as eager PyTorch runs it (torch's own argument errors included)."""
    z = torch.nn.functional.batch_norm(torch.nn.functional.linear(input, weight, bias), running_mean, running_var,
                                       bn_weight, bn_bias, training, momentum, eps)
    return activation_forward(z, activation)


# --------------------------------------------------------------------- training-mode BatchNorm: recomputed in backward
def _gemm(backend: str):
    """The backend's Linear (no activation) as linear(x2d, w, b)."""
    impl = _impl(backend)
    return lambda x, w, b: impl.linear_fwd(x, w, b, None, False)[0]


@torch.library.custom_op("pydlx::linear_bn_train_fwd", mutates_args=())
def linear_bn_train_fwd(input: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                        bn_bias: Optional[Tensor], eps: float, activation: str, backend: str
                        ) -> Tuple[Tensor, Tensor, Tensor]:
    return reference_linear_bn_train_fwd(_gemm(backend), input, weight, bias, bn_weight, bn_bias, eps,
                                         _act_name(activation))


@linear_bn_train_fwd.register_fake
def _(input, weight, bias, bn_weight, bn_bias, eps, activation, backend):
    stats = input.new_empty(weight.shape[0], dtype=math_dtype(input.dtype))
    return input.new_empty((input.shape[0], weight.shape[0])), stats, torch.empty_like(stats)


@torch.library.custom_op("pydlx::linear_bn_train_bwd", mutates_args=())
def linear_bn_train_bwd(grad: Tensor, input: Tensor, weight: Tensor, bias: Optional[Tensor],
                        bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], mean: Tensor, var: Tensor, eps: float,
                        activation: str, backend: str, need_input: bool, need_weight: bool, need_bias: bool
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = reference_linear_bn_train_bwd(_gemm(backend), grad, input, weight, bias, bn_weight, bn_bias, mean, var,
                                          eps, _act_name(activation), need_input, need_weight, need_bias)
    return tuple(g.to(t.dtype) if g is not None else input.new_empty(0)
                 for g, t in zip(grads, (input, weight, bias, bn_weight, bn_bias)))


@linear_bn_train_bwd.register_fake
def _(grad, input, weight, bias, bn_weight, bn_bias, mean, var, eps, activation, backend, need_input, need_weight,
      need_bias):
    def like(t, needed):
        return torch.empty_like(t) if t is not None and needed else input.new_empty(0)
    return (like(input, need_input), like(weight, need_weight), like(bias, need_bias), like(bn_weight, True),
            like(bn_bias, True))


def _train_setup_context(ctx, inputs, output):
    input, weight, bias, bn_weight, bn_bias, eps, activation, backend = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, weight, bias, bn_weight, bn_bias, mean, var)  # no activation-sized tensor but x
    ctx.args = (eps, activation, backend)


def _train_backward(ctx, grad_y, grad_mean, grad_var):
    input, weight, bias, bn_weight, bn_bias, mean, var = ctx.saved_tensors
    if grad_y is None:
        return (None,) * 8
    need = ctx.needs_input_grad
    grads = linear_bn_train_bwd(grad_y.contiguous(), input, weight, bias, bn_weight, bn_bias, mean, var, *ctx.args,
                                need[0], need[1], need[2])
    return tuple(g if need[i] and t is not None else None
                 for i, (g, t) in enumerate(zip(grads, (input, weight, bias, bn_weight, bn_bias)))) + (None,) * 3


torch.library.register_autograd("pydlx::linear_bn_train_fwd", _train_backward, setup_context=_train_setup_context)


def _linear_bn_train(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, activation, momentum,
                     num_batches_tracked) -> Tensor:
    """``linear_batchnorm`` in training mode (see there)."""
    factor = momentum_factor(momentum, num_batches_tracked)  # (BatchNorm1d.forward's bookkeeping)
    if not (isinstance(input, Tensor) and input.dim() == 2) or _backend.current_backend() == "auto" or \
            running_mean is None or running_var is None or input.shape[0] == 1:
        # (torch's own errors: "Expected more than 1 value per channel when training" for one row)
        return _eager_linear_bn(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, activation,
                                True, factor)
    if all(isinstance(t, Tensor) and t.is_floating_point() for t in (input, weight, bias) if t is not None):
        input, weight, bias = autocast_cast(input.device.type, (input, weight, bias))
    check_linear_args(input, weight, bias, activation)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    y, mean, var = linear_bn_train_fwd(input, weight, bias, bn_weight, bn_bias, float(eps),
                                       _op_activation(activation), choose(input, weight, needs_grad))
    update_running_stats(running_mean, running_var, mean, var, input.shape[0], factor)
    return y
