"""Reference Conv2d -> ReLU -> MaxPool2d, in eager PyTorch: ``max_pool2d(relu(conv2d(x, w, b, stride, padding)),
pool_size, pool_stride)`` (floor mode, groups 1, dilation 1). The oracle of the fused kernels and the CPU path;
``conv_relu_pool_fwd`` is the reference backend of the op (pydlx/triton/conv_relu_pool.py's signature: the
pooled map and the int8 argmax), ``conv_relu_pool_bwd`` the backward every backend shares (dy through the argmax
and the ReLU mask into cuDNN's convolution backward)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def conv_relu_pool2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride: int = 1,
                     padding: int = 0, pool_size: int = 2, pool_stride: Optional[int] = None) -> torch.Tensor:
    z = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    return F.max_pool2d(torch.relu(z), pool_size, pool_stride if pool_stride is not None else pool_size)


def out_shape(H: int, W: int, R: int, stride: int, padding: int, P: int, Q: int) -> Tuple[int, int, int, int]:
    """(HO, WO, HP, WP): the conv output and pooled sizes (floor mode); the one home of this formula."""
    HO = (H + 2 * padding - R) // stride + 1
    WO = (W + 2 * padding - R) // stride + 1
    return HO, WO, (HO - P) // Q + 1, (WO - P) // Q + 1


def why_too_large(x_shape, x_strides, K: int, R: int, HP: int, WP: int) -> Optional[str]:
    return None  # eager PyTorch addresses any size


def _window_index(y_idx_flat: torch.Tensor, WO: int, HP: int, WP: int, P: int, Q: int) -> torch.Tensor:
    """max_pool2d's flat conv-output indices -> the position inside each pool window (int8)."""
    oh, ow = y_idx_flat // WO, y_idx_flat % WO
    ph = torch.arange(HP, device=oh.device).view(HP, 1) * Q
    pw = torch.arange(WP, device=oh.device).view(1, WP) * Q
    return ((oh - ph) * P + (ow - pw)).to(torch.int8)


def conv_relu_pool_fwd(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], stride: int, padding: int,
                       P: int, Q: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, idx) for 4-D x: the pooled map (contiguous NCHW) and each max's position in its window (int8)."""
    z = torch.relu(F.conv2d(x, w, b, stride=stride, padding=padding))
    y, flat = F.max_pool2d(z, P, Q, return_indices=True)
    return y.contiguous(), _window_index(flat, z.shape[-1], y.shape[-2], y.shape[-1], P, Q)


def conv_relu_pool_bwd(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
                       has_bias: bool, stride: int, padding: int, P: int, Q: int, need_input: bool,
                       need_weight: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db): dy routed to each max's conv-output position through the ReLU mask (overlapping windows
    accumulate), then the convolution backward (cuDNN on GPUs). Unneeded gradients come back as None."""
    N, K, HP, WP = y.shape
    HO, WO, _, _ = out_shape(*x.shape[-2:], w.shape[-1], stride, padding, P, Q)
    idx = idx.long()
    oh = torch.arange(HP, device=y.device).view(HP, 1) * Q + idx // P
    ow = torch.arange(WP, device=y.device).view(1, WP) * Q + idx % P
    g = torch.where(y > 0, grad, torch.zeros_like(grad))
    dz = grad.new_zeros((N, K, HO * WO)).scatter_add_(2, (oh * WO + ow).view(N, K, HP * WP), g.reshape(N, K, HP * WP))
    return torch.ops.aten.convolution_backward(
        dz.view(N, K, HO, WO), x, w, [K] if has_bias else None, [stride, stride], [padding, padding], [1, 1], False,
        [0, 0], 1, [need_input, need_weight, has_bias])
