"""The cuda backend of ``pydlx.ops.linear``: cuBLAS GEMMs (through torch) and csrc/linear.cu's pointwise kernels
for act(z) and dy * act'(saved) (16-byte vectorised), the signatures of pydlx/triton/linear.py."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..activations import parse_activation


def supports(call, device) -> Optional[str]:
    return None  # cuBLAS addresses any size


def linear_fwd(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], activation: Optional[str],
               save_preact: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, z) for 2-D x; z is empty unless save_preact."""
    z = torch.addmm(b, x, w.t()) if b is not None else x @ w.t()
    if activation is None:
        return (z.clone() if save_preact else z), (z if save_preact else z.new_empty(0))
    y = torch.ops.pydlx.act_fwd_cuda(z, *parse_activation(activation))
    return y, (z if save_preact else z.new_empty(0))


def linear_bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, saved: torch.Tensor,
               activation: Optional[str], has_bias: bool, need_dx: bool = True, need_dw: bool = True):
    """(dx, dw, db) for 2-D x (None where not needed)."""
    dz = torch.ops.pydlx.act_bwd_cuda(dy.contiguous(), saved, *parse_activation(activation)) \
        if activation is not None else dy
    return (dz @ w if need_dx else None, dz.t() @ x if need_dw else None, dz.sum(0) if has_bias else None)
