"""The cuda backend of ``pydlx.ops.conv_act_pool2d``: csrc/conv_relu_pool.cu's direct convolution for first layers
(at most 8 input channels; fp32 FMAs, each conv output computed once), with pydlx/triton/conv_relu_pool.py's
signature. The backward is the one every backend shares (pydlx/reference/conv_relu_pool.py)."""
from __future__ import annotations

from typing import Optional

import torch

from ..activations import parse_activation
# The backward every backend shares (dy through the int8 argmax and the activation's derivative into cuDNN's
# convolution backward).
from ..reference.conv_relu_pool import conv_relu_pool_bwd  # noqa: F401

MAX_CHANNELS = 8  # csrc/conv_relu_pool.cu's kMaxChannels: a direct convolution is for first layers


def supports(call, device) -> Optional[str]:
    """None if the direct convolution runs this call (a registry.ConvCall), else why not."""
    if call.C > MAX_CHANNELS:
        return (f"the C++/CUDA direct convolution is for first layers (at most {MAX_CHANNELS} input channels), "
                f"got {call.C}; the triton backend takes any")
    return None


def conv_relu_pool_fwd(x, w, b, stride: int, padding: int, P: int, Q: int, PP: int = 0, ceil_mode: bool = False,
                       activation: Optional[str] = "relu", save_preact: bool = False, save_index: bool = True):
    """(y, idx, z) for 4-D x: the (pooled) output (contiguous NCHW), the int8 argmax (pool and ``save_index``
    only: the kernel writes it always, an inference call drops it), the pre-activation (``save_preact``, no pool
    only)."""
    name, alpha = parse_activation(activation)
    y, idx, z = torch.ops.pydlx.conv_relu_pool2d_fwd_cuda(x, w, b, stride, padding, P, Q, PP, ceil_mode,
                                                          name or "none", float(alpha), save_preact)
    return y, (idx if save_index else idx.new_empty(0)), z
