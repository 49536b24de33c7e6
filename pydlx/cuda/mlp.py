"""The cuda backend of the fused MLP: csrc/mlp.cu's forward (WMMA tensor cores, fp16/bf16, every layer at most 128
wide, at most 16 layers; inference only), with pydlx/triton/mlp.py's signatures."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..activations import parse_activation
from ..reference.mlp import FUSED_MAX_LAYERS, FUSED_MAX_WIDTH, fuses_in_one_kernel


def supports(call, device) -> Optional[str]:
    """None if csrc/mlp.cu's fused forward runs this call (a registry.MLPCall), else why not."""
    return why_cannot(call.sizes, call.dtype, call.training)


def why_cannot(sizes: Sequence[int], dtype: torch.dtype, training: bool) -> Optional[str]:
    if training:
        return "the C++/CUDA fused MLP is forward-only (inference) for now; training runs the triton backend"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"the C++/CUDA fused MLP takes float16 or bfloat16, got {dtype}"
    if not fuses_in_one_kernel(sizes):
        return (f"the C++/CUDA fused MLP takes at most {FUSED_MAX_LAYERS} layers, each at most {FUSED_MAX_WIDTH} "
                f"wide; got sizes {list(sizes)}")
    return None


def mlp_fwd(x, weights, biases, activation, last_activation, save):
    """(y, H, Z) for 2-D x; H and Z are always empty (the forward saves nothing: inference only)."""
    if save:
        raise RuntimeError("pydlx.cuda.mlp: the C++/CUDA fused MLP is forward-only (inference)")
    (act, alpha), (last, last_alpha) = parse_activation(activation), parse_activation(last_activation)
    y = torch.ops.pydlx.mlp_fwd_cuda(x, list(weights), [b for b in biases if b is not None],
                                     [b is not None for b in biases], act or "none", alpha, last or "none", last_alpha)
    return y, x.new_empty(0), x.new_empty(0)


def mlp_bwd(dy, x, weights, y, h, z, activation, last_activation, need_dx):
    """Not written: ``supports`` refuses training calls, so no backward is ever asked of this backend."""
    raise RuntimeError("pydlx.cuda.mlp: the C++/CUDA fused MLP has no backward (inference only)")
