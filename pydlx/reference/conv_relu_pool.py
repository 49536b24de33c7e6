"""Reference Conv2d -> ReLU -> MaxPool2d, in eager PyTorch: ``max_pool2d(relu(conv2d(x, w, b, stride, padding)),
pool_size, pool_stride)`` (floor mode, groups 1, dilation 1). The oracle of the fused kernels."""
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
