"""``pydlx.ops.linear``: act(input @ weight.T + bias) as a torch.library op with autograd; ``linear_batchnorm``: a
Linear -> BatchNorm1d [-> act] chain (eval mode: folded into the Linear; training mode: pydlx/ops/batchnorm.py's
training form).

Ops (schemas: pydlx/ops/schemas.py): ``pydlx::linear_fwd`` -> (y, z) and ``pydlx::linear_bwd`` -> (dx, dw, db).
Saved for backward: input, weight and one M×N tensor: y for relu/tanh/sigmoid/leaky_relu/elu/relu6/hardsigmoid/selu
(their derivative is a function of y), z for gelu/gelu_tanh/silu/hardswish/mish (it is not; recomputing z would cost
a second forward GEMM): pydlx/activations.py's ``saves_preact``. With no activation nothing but input and weight is
saved. The implementations are pydlx/<backend>/linear.py (``linear_fwd`` / ``linear_bwd``).
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import Tensor

from .. import _backend, registry
from ..activations import activation_spec, check_activation, forward as activation_forward, saves_preact
from ..reference.batchnorm import momentum_factor
from ..reference.linear import linear as reference_linear
from . import batchnorm
from ._common import (ArgumentError, act_name, autocast_cast, autocast_enabled, autograd, check_floating, check_like,
                      implement, metas, plain, rows, traced, unrows)

NAME = "pydlx.ops.linear"


_FOUND = registry.found("linear")


def _impl(backend: str):
    return _FOUND.get(backend) or registry.implementation("linear", backend)


def op_activation(activation: Optional[str]) -> str:
    """The spec a custom op takes: canonical (one spelling, one compiled kernel), "none" for None."""
    return activation_spec(*check_activation(activation)) or "none"


def choose(x: Tensor, weight: Tensor, training: bool) -> str:
    """The backend for one call (pydlx/_backend.py): forced, or auto by the GPU's policy / defaults."""
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return _backend.choose("linear", x.device,
                           registry.LinearCall(x.dtype, training, M, weight.shape[0], weight.shape[1]), "linear")


# ----------------------------------------------------------------------------------------------- ops
def _fwd(input, weight, bias, activation, save_preact, backend):
    if input.dim() == 2:  # (the common case: no reshape either way)
        return _impl(backend).linear_fwd(input, weight, bias, act_name(activation), save_preact)
    lead = input.shape[:-1]
    y, z = _impl(backend).linear_fwd(rows(input), weight, bias, act_name(activation), save_preact)
    return unrows(y, lead), (unrows(z, lead) if save_preact else z)


def _fwd_fake(input, weight, bias, activation, save_preact, backend):
    y = input.new_empty((*input.shape[:-1], weight.shape[0]))
    return y, (torch.empty_like(y) if save_preact else input.new_empty(0))


def _bwd(grad, input, weight, saved, activation, has_bias, need_dx, need_dw, backend):
    act = act_name(activation)
    if input.dim() == 2:
        dx, dw, db = _impl(backend).linear_bwd(grad, input, weight, saved, act, has_bias, need_dx, need_dw)
    else:
        s2d = rows(saved) if act is not None else saved
        dx, dw, db = _impl(backend).linear_bwd(rows(grad), rows(input), weight, s2d, act, has_bias, need_dx,
                                               need_dw)
        dx = dx.reshape(input.shape) if dx is not None else None
    return (dx if dx is not None else input.new_empty(0),
            dw if dw is not None else input.new_empty(0),
            db if db is not None else input.new_empty(0))


def _bwd_fake(grad, input, weight, saved, activation, has_bias, need_dx, need_dw, backend):
    return (torch.empty_like(input) if need_dx else input.new_empty(0),
            torch.empty_like(weight) if need_dw else input.new_empty(0),
            weight.new_empty(weight.shape[0]) if has_bias else input.new_empty(0))


linear_fwd = implement("linear_fwd", _fwd, _fwd_fake, differentiable=True)
linear_bwd = implement("linear_bwd", _bwd, _bwd_fake, second_order=True)


def _save(a, out):
    y, z = out
    act = act_name(a.activation)
    # (the bias, a parameter, costs no memory: a double backward recomputes z from it)
    return (a.input, a.weight, (z if saves_preact(act) else y) if act is not None else a.input.new_empty(0),
            *((a.bias,) if a.bias is not None else ()))


def _backward(a, saved, grads, needs):
    input, weight, kept, *bias = saved
    preact = saves_preact(act_name(a.activation))
    if preact and a.backend == "reference" and torch.is_grad_enabled():
        # a backward that records a graph (create_graph=True): the saved z carries no history, the recomputed one
        # does, so the second backward sees how the activation's derivative depends on the inputs
        kept = torch.nn.functional.linear(input, weight, bias[0] if bias else None)
    if preact and kept.numel() == 0 and grads[0].numel() != 0:
        raise RuntimeError("pydlx.ops.linear: backward needs the pre-activation, but the forward ran with "
                           "save_preact=False; call pydlx.ops.linear, which sets it when gradients are needed")
    has_bias = a.has_bias and needs.bias
    dx, dw, db = linear_bwd(grads[0], input, weight, kept, a.activation, has_bias, needs.input, needs.weight,
                            a.backend)
    return {"input": dx, "weight": dw, "bias": db if has_bias else None}


autograd("linear_fwd", _save, _backward, non_differentiable=(1,))


# ----------------------------------------------------------------------------------------------- entry points
def check_linear_args(input, weight, bias, activation, name: str = NAME) -> None:
    """Raise a clear error naming the bad argument. Runs before any kernel."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        got = f"shape {tuple(weight.shape)}" if isinstance(weight, Tensor) else type(weight).__name__
        raise ArgumentError(f"{name}: weight must be a 2-D tensor (out_features, in_features), got {got}")
    try:
        check_activation(activation)
    except ValueError as e:
        raise ArgumentError(f"{name}: {e}") from None
    if input.dim() == 0:
        raise ArgumentError(f"{name}: input must have at least 1 dimension, got a 0-D tensor")
    check_floating(name, "input", input)
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_floating(name, arg, t)
    if input.shape[-1] != weight.shape[1]:
        raise ArgumentError(f"{name}: input's last dimension ({input.shape[-1]}) must equal "
                            f"in_features = weight.shape[1] ({weight.shape[1]}); input shape {tuple(input.shape)}, "
                            f"weight shape {tuple(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ArgumentError(f"{name}: bias must be 1-D with out_features = {weight.shape[0]} elements, got shape "
                            f"{tuple(bias.shape)}")
    check_like(name, "weight", weight, input)
    check_like(name, "bias", bias, input)


def _cast(input, weight, bias):
    """Under torch.autocast, the three tensors cast first (as F.linear casts them), so a bf16 activation meets fp32
    weights."""
    if all(isinstance(t, Tensor) and t.is_floating_point() for t in (input, weight, bias) if t is not None):
        return autocast_cast(input.device.type, (input, weight, bias))
    return input, weight, bias


_PLANS = _backend.Plans()
_EAGER = "eager"  # a plan: plain eager PyTorch (auto chose the reference, or a CPU tensor under auto)


def _plan(input, weight, bias, activation):
    """What a call of ``linear`` runs, derived once per signature: _EAGER, or (backend, the op's activation spec,
    save_preact, whether autograd records the call)."""
    check_linear_args(input, weight, bias, activation)
    if _backend.cpu_auto(input):
        return _EAGER
    needs_grad = torch.is_grad_enabled() and (
        input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    backend = choose(input, weight, needs_grad)
    if _backend.runs_eager(backend):
        return _EAGER
    return backend, op_activation(activation), needs_grad and saves_preact(activation), needs_grad


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
           activation: Optional[str] = None) -> Tensor:
    """act(input @ weight.T + bias), like ``act(F.linear(input, weight, bias))``, in one fused kernel.

    input: (*, in_features); weight: (out_features, in_features); bias: (out_features,) or None.
    activation: a spec of pydlx/activations.py: None, "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid",
    "leaky_relu" (or "leaky_relu(slope)", slope >= 0), "elu" (or "elu(alpha)", alpha > 0), "hardswish",
    "hardsigmoid", "mish", "relu6", "selu". Under torch.autocast the three tensors are cast to the autocast dtype, as
    F.linear's are. Backward saves y or the pre-activation z (gelu, gelu_tanh, silu, hardswish, mish).
    """
    if not traced() and plain(input, weight, bias):
        if autocast_enabled():
            input, weight, bias = _cast(input, weight, bias)
        key = (metas((input, weight, bias)), activation, torch.is_grad_enabled(), _backend.state())
        plan = _PLANS.get(key)
        if plan is None:
            plan = _PLANS.keep(key, _plan(input, weight, bias, activation))
        if plan is _EAGER:
            return reference_linear(input, weight, bias, activation)
        backend, act, save_preact, needs_grad = plan
        return linear_fwd.eager(needs_grad, input, weight, bias, act, save_preact, backend)[0]
    input, weight, bias = _cast(input, weight, bias)
    check_linear_args(input, weight, bias, activation)
    if _backend.cpu_auto(input):
        return reference_linear(input, weight, bias, activation)
    needs_grad = torch.is_grad_enabled() and (
        input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    backend = choose(input, weight, needs_grad)
    if _backend.runs_eager(backend):
        return reference_linear(input, weight, bias, activation)
    y, _ = linear_fwd(input, weight, bias, op_activation(activation), needs_grad and saves_preact(activation),
                      backend)
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
    more for backward than eager runs eagerly (pydlx.ops.batchnorm.fold_costs_memory). Training mode: batch
    statistics; under a forced backend the op saves only x and recomputes the Linear's output in backward (against
    eager's x, the Linear's output and the activation's), under ``auto`` the chain runs as eager PyTorch until a GPU
    measures the recompute."""
    if training:
        return _linear_bn_train(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, activation,
                                momentum, num_batches_tracked)
    if not (isinstance(input, Tensor) and input.dim() == 2) or batchnorm.fold_costs_memory(
            input, weight, (bias, bn_weight, bn_bias), operator.mul, input.shape[0], weight.shape[0]):
        return _eager_linear_bn(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, activation,
                                False, 0.0)
    w, b = batchnorm.folded(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps)
    return linear(input, w, b, activation)


def _eager_linear_bn(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, activation, training,
                     momentum) -> Tensor:
    """The chain as eager PyTorch runs it (torch's own argument errors included)."""
    z = torch.nn.functional.batch_norm(torch.nn.functional.linear(input, weight, bias), running_mean, running_var,
                                       bn_weight, bn_bias, training, momentum, eps)
    return activation_forward(z, activation)


def _linear_bn_train(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, activation, momentum,
                     num_batches_tracked) -> Tensor:
    """``linear_batchnorm`` in training mode (see there)."""
    factor = momentum_factor(momentum, num_batches_tracked)  # (BatchNorm1d.forward's bookkeeping)
    if not (isinstance(input, Tensor) and input.dim() == 2) or _backend.current_backend() == "auto" or \
            running_mean is None or running_var is None or input.shape[0] == 1:
        # (torch's own errors: "Expected more than 1 value per channel when training" for one row)
        return _eager_linear_bn(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, activation,
                                True, factor)
    input, weight, bias = _cast(input, weight, bias)
    tensors = (input, weight, bias, running_mean, running_var, bn_weight, bn_bias)
    if traced() or not plain(*tensors):
        backend, act = _train_plan(input, weight, bias, activation)
    else:  # (kept per call signature, as the other entry points keep theirs)
        key = (metas(tensors), activation, torch.is_grad_enabled(), _backend.state())
        plan = _TRAIN_PLANS.get(key)
        if plan is None:
            plan = _TRAIN_PLANS.keep(key, _train_plan(input, weight, bias, activation))
        backend, act = plan
    return batchnorm.train("linear", [], input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, act,
                           backend, factor, input.shape[0])


_TRAIN_PLANS = _backend.Plans()


def _train_plan(input, weight, bias, activation):
    """What a training-form call runs, derived once per signature: (backend, the op's activation spec)."""
    check_linear_args(input, weight, bias, activation, "pydlx.ops.linear_batchnorm")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    return choose(input, weight, needs_grad), op_activation(activation)
