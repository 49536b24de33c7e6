"""A layer (Linear or Conv2d) followed by a BatchNorm: the eval-mode fold, and the one training form.

Eval mode: the BatchNorm's running statistics fold into the layer's weight and bias (``fold_batchnorm``), and the
chain runs as the layer's op (pydlx.ops.linear / conv_act_pool2d).

Training mode: the BatchNorm normalises with the batch statistics, which need the layer's whole output before anything
is normalised, so nothing folds. The ops ``pydlx::layer_bn_train_fwd`` / ``layer_bn_train_bwd`` (schemas:
pydlx/ops/schemas.py) run the layer on the chosen backend, then the statistics, the normalisation and the activation
(and a max pool after a conv), and save only the layer's input and two per-channel vectors: backward recomputes the
layer's output with the same backend (the pool's argmax, ties included, is the forward's), runs BatchNorm's backward
and the layer's. Eager PyTorch keeps the layer's output, the activation's and the pool's int64 indices instead; the
price is one more layer forward in backward. ``LAYERS`` says what differs between a Linear and a convolution.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend, registry
from .._geometry import out_shape
from ..reference.batchnorm import bn_act_backward, bn_act_train, cast_to, math_dtype, update_running_stats
from ..reference.conv_relu_pool import conv_backward
from ._common import act_name, autograd, implement, plain, traced


# ----------------------------------------------------------------------------------------------- eval mode: the fold
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


class _Fold(NamedTuple):
    refs: list  # weak references to the six tensors (None where absent)
    stamp: list  # what the fold was computed from (_stamp)
    folded: Tuple[Tensor, Tensor]


_FOLDS: Dict[int, _Fold] = {}  # id(weight) -> its kept fold
MAX_FOLDS = 1024


def _stamp(tensors, eps) -> list:
    stamp = [eps]
    for t in tensors:
        stamp.append(None if t is None else (t._version, t.data_ptr(), t.dtype, t.device))
    return stamp


def _same(refs, tensors) -> bool:
    for r, t in zip(refs, tensors):
        if (r is not None or t is not None) and (r is None or r() is not t):
            return False
    return True


_backend.CACHES.append(_FOLDS.clear)


def folded(weight: Tensor, bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
           bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor]:
    """``fold_batchnorm``'s (w', b'), kept between calls that autograd does not record (inference: eval mode under
    no_grad / inference_mode, or frozen parameters), so that an eval-mode forward does not fold again on every call.
    A kept fold is used only while each of the six tensors is the same object with the same version counter, data
    pointer, dtype and device (an optimizer step, a training-mode call moving the running statistics,
    ``load_state_dict`` and ``.to()`` all change one of them; an in-place change through ``.data`` does not, as it
    is hidden from autograd too: ``pydlx.clear_caches()`` forgets kept folds). Computed afresh whenever autograd
    records (the fold is then differentiable in w, b, gamma and beta) and while torch.compile / torch.export trace."""
    tensors = (weight, bias, running_mean, running_var, bn_weight, bn_bias)
    if traced() or not plain(*tensors):
        return fold_batchnorm(*tensors, eps)
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and ((grad and t.requires_grad) or t.is_inference()):
            return fold_batchnorm(*tensors, eps)
    stamp = _stamp(tensors, eps)
    kept = _FOLDS.get(id(weight))
    if kept is not None and kept.stamp == stamp and _same(kept.refs, tensors):
        return kept.folded
    out = fold_batchnorm(*tensors, eps)
    if len(_FOLDS) >= MAX_FOLDS:
        _FOLDS.clear()
    key = id(weight)

    def forget(ref, key=key):
        entry = _FOLDS.get(key)
        if entry is not None and entry.refs[0] is ref:
            del _FOLDS[key]
    refs = [weakref.ref(weight, forget)] + [weakref.ref(t) if t is not None else None for t in tensors[1:]]
    _FOLDS[key] = _Fold(refs, stamp, out)
    return out


def fold_costs_memory(input: Tensor, weight: Tensor, others: Sequence[Optional[Tensor]],
                      out_elems: Callable[..., int], *args) -> bool:
    """Whether folding would make backward keep more than eager does: with gradients, the folded weight (as large as
    the weight) is saved for backward, where eager's BatchNorm keeps its input (one output map of ``out_elems(*args)``
    elements, computed only then). Folding pays when the map is at least the weight's size -- the early, wide layers;
    the late layers of a small batch (ResNet-18's 512x512x3x3 convs on 4x4 maps at batch 8) run as written. Without
    gradients nothing is saved: always fold. A symbolic map size (torch.export with a dynamic batch): fold, rather
    than guard the exported program on the size."""
    if not torch.is_grad_enabled() or not (input.requires_grad or weight.requires_grad or any(
            t is not None and t.requires_grad for t in others)):
        return False
    n = out_elems(*args)
    return not isinstance(n, torch.SymInt) and weight.numel() > n


# ----------------------------------------------------------------------------------------------- training mode
class Layer(NamedTuple):
    """What the training form needs of a layer: its output z (no activation) on a backend, what runs after the
    activation (a pool) and its backward (``after_backward(a, grad)``: the gradient at the activation's output),
    the layer's backward from dz, and the output's shape (for the fake implementation)."""
    forward: Callable[[str, Tensor, Tensor, Optional[Tensor], Sequence[int]], Tensor]
    after: Callable[[Sequence[int]], Optional[Callable]]
    after_backward: Callable[[Sequence[int]], Optional[Callable]]
    backward: Callable[..., Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]]
    shape: Callable[[Tensor, Tensor, Sequence[int]], Tuple[int, ...]]


def _linear_forward(backend, x, w, b, args):
    return registry.implementation("linear", backend).linear_fwd(x, w, b, None, False)[0]


def _linear_backward(dz, x, w, b, args, need_x, need_w, need_b):
    return (dz @ w if need_x else None, dz.t() @ x if need_w else None,
            dz.sum(0) if b is not None and need_b else None)


# conv layer_args: (stride, padding, pool_size, pool_stride, pool_padding, ceil_mode)
def _conv_forward(backend, x, w, b, args):
    stride, padding = args[:2]
    return registry.implementation("conv_relu_pool", backend).conv_relu_pool_fwd(
        x, w, b, stride, padding, 1, 1, 0, False, None, False)[0]


def _conv_pool(args):
    _, _, P, Q, PP, ceil = args
    return None if P == 1 else lambda a: F.max_pool2d(a, P, Q, PP, ceil_mode=bool(ceil))


def _conv_pool_backward(args):
    _, _, P, Q, PP, ceil = args
    if P == 1:
        return None

    def pool_backward(a, grad):  # max_pool2d's own backward over the recomputed map: the forward's argmax
        _, where = F.max_pool2d(a, P, Q, PP, ceil_mode=bool(ceil), return_indices=True)
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, a, [P, P], [Q, Q], [PP, PP], [1, 1],
                                                               bool(ceil), where)
    return pool_backward


def _conv_backward(dz, x, w, b, args, need_x, need_w, need_b):
    return conv_backward(dz, x, w, b is not None and need_b, args[0], args[1], need_x, need_w)


def _conv_shape(x, w, args):
    stride, padding, P, Q, PP, ceil = args
    _, _, HP, WP = out_shape(*x.shape[-2:], w.shape[-1], stride, padding, P, Q, PP, bool(ceil))
    return (x.shape[0], w.shape[0], HP, WP)


LAYERS = {
    "linear": Layer(_linear_forward, lambda args: None, lambda args: None, _linear_backward,
                    lambda x, w, args: (x.shape[0], w.shape[0])),
    "conv": Layer(_conv_forward, _conv_pool, _conv_pool_backward, _conv_backward, _conv_shape),
}


def _fwd(input, weight, bias, bn_weight, bn_bias, eps, layer, layer_args, activation, backend):
    L = LAYERS[layer]
    z = L.forward(backend, input, weight, bias, layer_args)
    return bn_act_train(z, eps, bn_weight, bn_bias, act_name(activation), L.after(layer_args))


def _fwd_fake(input, weight, bias, bn_weight, bn_bias, eps, layer, layer_args, activation, backend):
    stats = input.new_empty(weight.shape[0], dtype=math_dtype(input.dtype))
    return input.new_empty(LAYERS[layer].shape(input, weight, layer_args)), stats, torch.empty_like(stats)


def _bwd(grad, input, weight, bias, bn_weight, bn_bias, mean, invstd, eps, layer, layer_args, activation, backend,
         need_input, need_weight, need_bias):
    L = LAYERS[layer]
    z = L.forward(backend, input, weight, bias, layer_args)  # recomputed: the forward's, bit for bit
    dz, dgamma, dbeta = bn_act_backward(grad, z, mean, invstd, eps, bn_weight, bn_bias, act_name(activation),
                                        L.after_backward(layer_args))
    dx, dw, db = L.backward(dz, input, weight, bias, layer_args, need_input, need_weight, need_bias)
    like = (input, weight, bias, bn_weight, bn_bias)
    return tuple(cast_to(g, t.dtype) if g is not None else input.new_empty(0)
                 for g, t in zip((dx, dw, db, dgamma, dbeta), like))


def _bwd_fake(grad, input, weight, bias, bn_weight, bn_bias, mean, invstd, eps, layer, layer_args, activation,
              backend, need_input, need_weight, need_bias):
    def like(t, needed):
        return torch.empty_like(t) if t is not None and needed else input.new_empty(0)
    return (like(input, need_input), like(weight, need_weight), like(bias, need_bias), like(bn_weight, True),
            like(bn_bias, True))


layer_bn_train_fwd = implement("layer_bn_train_fwd", _fwd, _fwd_fake, differentiable=True)
layer_bn_train_bwd = implement("layer_bn_train_bwd", _bwd, _bwd_fake,
                               # (it recomputes from x; ATen's batch norm backward differentiates through its
                               # saved mean and invstd in training mode, as eager BatchNorm's double backward does)
                               second_order=True)


def _save(a, out):
    _, mean, invstd = out
    return a.input, a.weight, a.bias, a.bn_weight, a.bn_bias, mean, invstd  # no activation-sized tensor but x


def _backward(a, saved, grads, needs):
    input, weight, bias, bn_weight, bn_bias, mean, invstd = saved
    dx, dw, db, dg, dbeta = layer_bn_train_bwd(grads[0], input, weight, bias, bn_weight, bn_bias, mean,
                                               invstd, a.eps, a.layer, a.layer_args, a.activation, a.backend,
                                               needs.input, needs.weight, needs.bias)
    return {"input": dx, "weight": dw, "bias": db if a.has_bias else None,
            "bn_weight": dg if a.has_bn_weight else None, "bn_bias": dbeta if a.has_bn_bias else None}


autograd("layer_bn_train_fwd", _save, _backward, non_differentiable=(1, 2))


def train(layer: str, layer_args: Sequence[int], input: Tensor, weight: Tensor, bias: Optional[Tensor],
          running_mean: Tensor, running_var: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
          eps: float, activation: str, backend: str, momentum: float, count: int) -> Tensor:
    """The training form of ``layer`` -> BatchNorm -> ``activation`` (an op spec) on ``backend``, with the running
    statistics moved as BatchNorm moves them (``momentum``: the factor of this step, ``count``: values per channel).
    The caller has checked the arguments and cast them under autocast."""
    channels_last = input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last) and \
        not input.is_contiguous()
    y, mean, invstd = layer_bn_train_fwd(input, weight, bias, bn_weight, bn_bias, float(eps), layer,
                                         [int(v) for v in layer_args], activation, backend)
    update_running_stats(running_mean, running_var, mean, invstd, float(eps), count, momentum)
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y
