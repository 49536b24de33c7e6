"""Reference Conv2d -> activation [-> MaxPool2d], in eager PyTorch:
``max_pool2d(act(conv2d(x, w, b, stride, padding)), pool_size, pool_stride, pool_padding, ceil_mode=ceil_mode)``
(groups 1, dilation 1; pool_size 1 means no pool). The oracle of the fused kernels and the CPU path;
``conv_relu_pool_fwd`` is the reference backend of the op (pydlx/triton/conv_relu_pool.py's signature: the output,
the int8 argmax of each pool window and, without a pool, the pre-activation when the activation's derivative needs
it), ``conv_relu_pool_bwd`` the backward every backend shares (dy through the argmax and the activation's
derivative into cuDNN's convolution backward)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .._geometry import conv_size
from ..activations import forward as activation_forward, forward_fresh as activation_forward_fresh
from .linear import activation_backward


def conv_act_pool2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride: int = 1,
                    padding: int = 0, activation: Optional[str] = "relu", pool_size: int = 1,
                    pool_stride: Optional[int] = None, pool_padding: int = 0, ceil_mode: bool = False) -> torch.Tensor:
    """The chain as eager PyTorch runs it (autograd included)."""
    y = activation_forward_fresh(F.conv2d(x, weight, bias, stride=stride, padding=padding), activation)
    if pool_size == 1:
        return y
    return F.max_pool2d(y, pool_size, pool_stride if pool_stride is not None else pool_size, pool_padding,
                        ceil_mode=ceil_mode)


def conv_relu_pool2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride: int = 1,
                     padding: int = 0, pool_size: int = 2, pool_stride: Optional[int] = None, pool_padding: int = 0,
                     ceil_mode: bool = False) -> torch.Tensor:
    return conv_act_pool2d(x, weight, bias, stride, padding, "relu", pool_size, pool_stride, pool_padding, ceil_mode)


def supports(call, device) -> Optional[str]:
    return None  # eager PyTorch addresses any size


_FIRSTS: Dict[tuple, torch.Tensor] = {}  # _firsts' tensors, kept per geometry and device


def _firsts(HP: int, WP: int, row: int, Q: int, PP: int, device) -> Tuple[torch.Tensor, bool]:
    """([HP, WP] int64: ph0 row + pw0, with (ph0, pw0) = (ph Q - PP, pw Q - PP) the first conv-output position of
    pooled pixel (ph, pw)'s window; whether the math is traced). Made once per geometry and device and kept, so that
    the index bookkeeping is four elementwise ops each way (each one a kernel launch on a GPU). Traced (under
    torch.compile or a dispatch mode: a decomposition or graph being traced) it is made afresh and not kept, and the
    ops using it must not be in place."""
    traced = torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0  # (written out: per call)
    key = (HP, WP, row, Q, PP, device)
    t = None if traced else _FIRSTS.get(key)
    if t is None:
        ph0 = torch.arange(HP, device=device).view(HP, 1) * Q - PP
        pw0 = torch.arange(WP, device=device).view(1, WP) * Q - PP
        t = ph0 * row + pw0
        if not traced:
            if len(_FIRSTS) >= 256:
                _FIRSTS.clear()
            _FIRSTS[key] = t
    return t, traced


def _window_index(flat: torch.Tensor, WO: int, P: int, Q: int, PP: int) -> torch.Tensor:
    """max_pool2d's flat conv-output indices -> the position inside each pool window (int8): with (oh, ow) =
    (flat // WO, flat % WO), (oh - ph0) P + (ow - pw0) = flat + (flat // WO) (P - WO) - (ph0 P + pw0)."""
    HP, WP = flat.shape[-2:]
    pos = torch.add(flat, torch.div(flat, WO, rounding_mode="floor"), alpha=P - WO)
    firsts, traced = _firsts(HP, WP, P, Q, PP, flat.device)
    return (pos - firsts if traced else pos.sub_(firsts)).to(torch.int8)


def _flat_index(idx: torch.Tensor, WO: int, P: int, Q: int, PP: int) -> torch.Tensor:
    """``_window_index``'s inverse: window position i (int8) -> the flat conv-output index (int64),
    (ph0 + i // P) WO + pw0 + i % P = i + (i // P) (WO - P) + (ph0 WO + pw0)."""
    HP, WP = idx.shape[-2:]
    i = idx.long()
    pos = torch.add(i, torch.div(i, P, rounding_mode="floor"), alpha=WO - P)
    firsts, traced = _firsts(HP, WP, WO, Q, PP, idx.device)
    return pos + firsts if traced else pos.add_(firsts)


def conv_relu_pool_fwd(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], stride: int, padding: int,
                       P: int, Q: int, PP: int = 0, ceil_mode: bool = False, activation: Optional[str] = "relu",
                       save_preact: bool = False, save_index: bool = True
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, idx, z) for 4-D x: the output (contiguous NCHW); with a pool (P > 1) and ``save_index`` each max's
    position in its window (int8), else an empty tensor; z the pre-activation when ``save_preact`` (no pool only),
    else empty."""
    z = F.conv2d(x, w, b, stride=stride, padding=padding)
    a = activation_forward(z, activation) if save_preact else activation_forward_fresh(z, activation)
    if P == 1:
        zs = (z.clone() if a is z else z).contiguous() if save_preact else x.new_empty(0)
        return a.contiguous(), x.new_empty(0, dtype=torch.int8), zs
    if not save_index:  # (inference: the pool alone)
        return (F.max_pool2d(a, P, Q, PP, ceil_mode=ceil_mode).contiguous(), x.new_empty(0, dtype=torch.int8),
                x.new_empty(0))
    y, flat = F.max_pool2d(a, P, Q, PP, ceil_mode=ceil_mode, return_indices=True)
    return y.contiguous(), _window_index(flat, a.shape[-1], P, Q, PP), x.new_empty(0)


def conv_relu_pool_bwd(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
                       z: torch.Tensor, has_bias: bool, stride: int, padding: int, P: int, Q: int, PP: int,
                       activation: Optional[str], need_input: bool, need_weight: bool
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db): with a pool, dy through the activation's derivative (from the pooled y: pools fuse only with
    non-decreasing activations, whose derivative is a function of y) and routed to each max's conv-output position
    (overlapping windows accumulate); without, the derivative from y or the saved pre-activation z. Then the
    convolution backward (cuDNN on GPUs). Unneeded gradients come back as None."""
    N, K = x.shape[0], w.shape[0]
    R = w.shape[-1]
    HO, WO = conv_size(x.shape[-2], R, stride, padding), conv_size(x.shape[-1], R, stride, padding)
    g = activation_backward(grad, z if z.numel() else y, activation)
    if P == 1:
        dz = g
    else:
        HP, WP = y.shape[-2:]
        flat = _flat_index(idx, WO, P, Q, PP)
        dz = grad.new_zeros((N, K, HO * WO)).scatter_add_(2, flat.view(N, K, HP * WP),
                                                           g.reshape(N, K, HP * WP)).view(N, K, HO, WO)
    return conv_backward(dz, x, w, has_bias, stride, padding, need_input, need_weight)


def conv_backward(dz: torch.Tensor, x: torch.Tensor, w: torch.Tensor, has_bias: bool, stride: int, padding: int,
                  need_input: bool, need_weight: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db) of the convolution from the gradient at its output ``dz`` (cuDNN's convolution backward on
    GPUs; groups 1, dilation 1); unneeded ones come back as None."""
    return torch.ops.aten.convolution_backward(
        dz, x, w, [w.shape[0]] if has_bias else None, [stride, stride], [padding, padding], [1, 1], False,
        [0, 0], 1, [need_input, need_weight, has_bias])


__all__ = ["conv_act_pool2d", "conv_relu_pool2d", "supports", "conv_relu_pool_fwd", "conv_relu_pool_bwd",
           "conv_backward"]
