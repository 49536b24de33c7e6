"""Reference Conv2d -> activation [-> MaxPool2d], in eager PyTorch:
``max_pool2d(act(conv2d(x, w, b, stride, padding)), pool_size, pool_stride, pool_padding, ceil_mode=ceil_mode)``
(groups 1, dilation 1; pool_size 1 means no pool). The oracle of the fused kernels and the CPU path;
``conv_relu_pool_fwd`` is the reference backend of the op (pydlx/triton/conv_relu_pool.py's signature: the output,
the int8 argmax of each pool window and, without a pool, the pre-activation when the activation's derivative needs
it), ``conv_relu_pool_bwd`` the backward every backend shares (dy through the argmax and the activation's
derivative into cuDNN's convolution backward)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .batchnorm import batch_stats, bn_act, bn_act_backward
from ..activations import forward as activation_forward
from .linear import activation_backward


def conv_act_pool2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride: int = 1,
                    padding: int = 0, activation: Optional[str] = "relu", pool_size: int = 1,
                    pool_stride: Optional[int] = None, pool_padding: int = 0, ceil_mode: bool = False) -> torch.Tensor:
    """The chain as eager PyTorch runs it (autograd included)."""
    y = activation_forward(F.conv2d(x, weight, bias, stride=stride, padding=padding), activation)
    if pool_size == 1:
        return y
    return F.max_pool2d(y, pool_size, pool_stride if pool_stride is not None else pool_size, pool_padding,
                        ceil_mode=ceil_mode)


def conv_relu_pool2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride: int = 1,
                     padding: int = 0, pool_size: int = 2, pool_stride: Optional[int] = None, pool_padding: int = 0,
                     ceil_mode: bool = False) -> torch.Tensor:
    return conv_act_pool2d(x, weight, bias, stride, padding, "relu", pool_size, pool_stride, pool_padding, ceil_mode)


def pooled_size(size: int, P: int, Q: int, pad: int, ceil_mode: bool) -> int:
    """max_pool2d's output size along one dimension (dilation 1): floor or ceil of (size + 2 pad - P) / Q, plus 1;
    in ceil mode the last window must start inside the input or its left padding (torch's rule)."""
    out = (size + 2 * pad - P + ((Q - 1) if ceil_mode else 0)) // Q + 1
    if ceil_mode and (out - 1) * Q >= size + pad:
        out -= 1
    return out


def out_shape(H: int, W: int, R: int, stride: int, padding: int, P: int, Q: int, pool_padding: int = 0,
              ceil_mode: bool = False) -> Tuple[int, int, int, int]:
    """(HO, WO, HP, WP): the conv output and pooled sizes; the one home of these formulas."""
    HO = (H + 2 * padding - R) // stride + 1
    WO = (W + 2 * padding - R) // stride + 1
    return HO, WO, pooled_size(HO, P, Q, pool_padding, ceil_mode), pooled_size(WO, P, Q, pool_padding, ceil_mode)


def why_too_large(x_shape, x_strides, K: int, R: int, HP: int, WP: int) -> Optional[str]:
    return None  # eager PyTorch addresses any size


def _window_index(flat: torch.Tensor, WO: int, P: int, Q: int, PP: int) -> torch.Tensor:
    """max_pool2d's flat conv-output indices -> the position inside each pool window (int8), the window of pooled
    pixel (ph, pw) starting at conv output (ph Q - PP, pw Q - PP)."""
    HP, WP = flat.shape[-2:]
    oh, ow = flat // WO, flat % WO
    ph = torch.arange(HP, device=oh.device).view(HP, 1) * Q - PP
    pw = torch.arange(WP, device=oh.device).view(1, WP) * Q - PP
    return ((oh - ph) * P + (ow - pw)).to(torch.int8)


def conv_relu_pool_fwd(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], stride: int, padding: int,
                       P: int, Q: int, PP: int = 0, ceil_mode: bool = False, activation: Optional[str] = "relu",
                       save_preact: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, idx, z) for 4-D x: the output (contiguous NCHW); with a pool (P > 1) each max's position in its window
    (int8), else an empty tensor; z the pre-activation when ``save_preact`` (no pool only), else empty."""
    z = F.conv2d(x, w, b, stride=stride, padding=padding)
    a = activation_forward(z, activation)
    empty = x.new_empty(0)
    if P == 1:
        zs = (z.clone() if a is z else z).contiguous() if save_preact else empty
        return a.contiguous(), empty.to(torch.int8), zs
    y, flat = F.max_pool2d(a, P, Q, PP, ceil_mode=ceil_mode, return_indices=True)
    return y.contiguous(), _window_index(flat, a.shape[-1], P, Q, PP), empty


def conv_relu_pool_bwd(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
                       z: torch.Tensor, has_bias: bool, stride: int, padding: int, P: int, Q: int, PP: int,
                       activation: Optional[str], need_input: bool, need_weight: bool
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db): with a pool, dy through the activation's derivative (from the pooled y: pools fuse only with
    non-decreasing activations, whose derivative is a function of y) and routed to each max's conv-output position
    (overlapping windows accumulate); without, the derivative from y or the saved pre-activation z. Then the
    convolution backward (cuDNN on GPUs). Unneeded gradients come back as None."""
    N, K = x.shape[0], w.shape[0]
    HO = (x.shape[-2] + 2 * padding - w.shape[-1]) // stride + 1
    WO = (x.shape[-1] + 2 * padding - w.shape[-1]) // stride + 1
    g = activation_backward(grad, z if z.numel() else y, activation)
    if P == 1:
        dz = g
    else:
        HP, WP = y.shape[-2:]
        idx = idx.long()
        oh = torch.arange(HP, device=y.device).view(HP, 1) * Q - PP + idx // P
        ow = torch.arange(WP, device=y.device).view(1, WP) * Q - PP + idx % P
        dz = grad.new_zeros((N, K, HO * WO)).scatter_add_(2, (oh * WO + ow).view(N, K, HP * WP),
                                                           g.reshape(N, K, HP * WP)).view(N, K, HO, WO)
    return torch.ops.aten.convolution_backward(
        dz, x, w, [K] if has_bias else None, [stride, stride], [padding, padding], [1, 1], False,
        [0, 0], 1, [need_input, need_weight, has_bias])


# ------------------------------------------------------------------- training-mode BatchNorm, recomputed in backward
def conv_bn_train_fwd(conv, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                      gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor], eps: float, P: int, Q: int,
                      PP: int, ceil_mode: bool, activation: Optional[str]
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var): max_pool2d(act(BatchNorm2d(conv(x)))) with the BatchNorm in training mode (batch statistics;
    the caller moves the running statistics: pydlx/reference/batchnorm.py). ``conv(x, w, b)`` is the backend's
    convolution. The conv output lives only inside this call: backward recomputes it from x."""
    z = conv(x, w, b)
    mean, var = batch_stats(z)
    a = bn_act(z, mean, var, eps, gamma, beta, activation)[1]
    y = a if P == 1 else F.max_pool2d(a, P, Q, PP, ceil_mode=ceil_mode)
    return y.contiguous(), mean, var


def conv_bn_train_bwd(conv, grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                      gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor], mean: torch.Tensor,
                      var: torch.Tensor, eps: float, stride: int, padding: int, P: int, Q: int, PP: int, ceil_mode: bool,
                      activation: Optional[str], need_input: bool, need_weight: bool, need_bias: bool
                      ) -> Tuple[Optional[torch.Tensor], ...]:
    """(dx, dw, db, dgamma, dbeta): the conv output, the BatchNorm and the activation recomputed from x (the same
    conv as the forward's, the same ``bn_act``), dy routed through the pool (max_pool2d's own backward over the
    recomputed map: the forward's argmax, ties included), the activation's and BatchNorm's backward
    (``bn_act_backward``) and the convolution backward (cuDNN on GPUs)."""
    z = conv(x, w, b)
    pool = None
    if P > 1:
        def pool(a, grad):
            _, where = F.max_pool2d(a, P, Q, PP, ceil_mode=ceil_mode, return_indices=True)
            return torch.ops.aten.max_pool2d_with_indices_backward(grad, a, [P, P], [Q, Q], [PP, PP], [1, 1],
                                                                   ceil_mode, where)
    dz, dgamma, dbeta = bn_act_backward(grad, z, mean, var, eps, gamma, beta, activation, pool)
    K = w.shape[0]
    dx, dw, db = torch.ops.aten.convolution_backward(
        dz, x, w, [K] if b is not None else None, [stride, stride], [padding, padding], [1, 1], False,
        [0, 0], 1, [need_input, need_weight, b is not None and need_bias])
    return dx, dw, db, dgamma, dbeta


def window_fits(P: int, PP: int) -> bool:
    """max_pool2d's rule: padding at most half the window."""
    return 0 <= PP <= P // 2


__all__ = ["conv_act_pool2d", "conv_relu_pool2d", "out_shape", "pooled_size", "conv_relu_pool_fwd",
           "conv_relu_pool_bwd", "why_too_large", "window_fits", "conv_bn_train_fwd", "conv_bn_train_bwd"]
