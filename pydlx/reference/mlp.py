"""Reference MLP, in eager PyTorch: ``Linear(s0, s1) -> act -> ... -> Linear(s[-2], s[-1]) -> last_activation``.

``mlp(x, weights, biases, activation, last_activation)`` with ``weights[i]`` of shape ``(s[i+1], s[i])`` and
``biases[i]`` of shape ``(s[i+1],)`` or None: the oracle of the fused MLP kernels and the CPU path. ``mlp_fwd`` /
``mlp_bwd`` are the reference backend of the fused op, with pydlx/triton/mlp.py's signatures and layouts (H: the
hidden layers' outputs side by side, Z / DZ: every layer's pre-activation / its gradient side by side).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..activations import forward as activation_forward, forward_fresh as activation_forward_fresh, saves_preact
from .linear import activation_backward, linear


# The fused MLP kernels' limits (pydlx/triton/mlp.py, csrc/mlp.cu's kMaxWidth / kMaxLayers): every layer at most
# this wide, at most this many layers. Wider MLPs run as a chain of fused Linear GEMMs.
FUSED_MAX_WIDTH, FUSED_MAX_LAYERS = 128, 16


def fuses_in_one_kernel(sizes: Sequence[int]) -> bool:
    """Whether an MLP of these sizes (in, ..., out) runs as one fused kernel on GPUs."""
    return len(sizes) - 1 <= FUSED_MAX_LAYERS and max(sizes[1:]) <= FUSED_MAX_WIDTH


def saves_z(activation: Optional[str], last_activation: Optional[str]) -> bool:
    """Whether a fused MLP keeps the pre-activations for backward: only when an activation's derivative needs z
    (gelu, gelu_tanh, silu, hardswish, mish); the others derive it from the layer outputs, which are kept anyway."""
    return saves_preact(activation) or saves_preact(last_activation)


def mlp(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
        activation: Optional[str] = "relu", last_activation: Optional[str] = None) -> torch.Tensor:
    h = x
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = linear(h, w, b, activation if i + 1 < len(weights) else last_activation)
    return h


def supports(call, device) -> Optional[str]:
    return None  # eager PyTorch runs any MLP


def _cols(sizes: Sequence[int]) -> List[int]:
    """The column of layer i's output in H and in Z / DZ."""
    return [sum(sizes[1:1 + i]) for i in range(len(sizes) - 1)]


def mlp_fwd(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
            activation: Optional[str], last_activation: Optional[str], save: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, H, Z) for 2-D x; H and Z are empty unless ``save`` (Z also unless an activation needs z)."""
    hs, zs, h = [], [], x
    keep_z = save and saves_z(activation, last_activation)
    act = activation_forward if keep_z else activation_forward_fresh
    for i, (w, b) in enumerate(zip(weights, biases)):
        z = torch.nn.functional.linear(h, w, b)
        h = act(z, activation if i + 1 < len(weights) else last_activation)
        zs.append(z)
        if i + 1 < len(weights):
            hs.append(h)
    H = torch.cat(hs, 1) if save and hs else x.new_empty(0)
    Z = torch.cat(zs, 1) if keep_z else x.new_empty(0)
    return h, H, Z


def mlp_bwd(dy: torch.Tensor, x: torch.Tensor, weights: Sequence[torch.Tensor], y: torch.Tensor, h: torch.Tensor,
            z: torch.Tensor, activation: Optional[str], last_activation: Optional[str], need_dx: bool
            ) -> Tuple[Optional[torch.Tensor], List[torch.Tensor]]:
    """(dx or None, [dz of each layer]): the backward walk through the layers; the weight gradients are the
    caller's GEMMs."""
    L = len(weights)
    cols = _cols([x.shape[1]] + [w.shape[0] for w in weights])
    dzs, g = [None] * L, dy
    for i in range(L - 1, -1, -1):
        a = last_activation if i == L - 1 else activation
        if a is not None:
            if saves_preact(a):
                s = z[:, cols[i]:cols[i] + weights[i].shape[0]]
            else:
                s = y if i == L - 1 else h[:, cols[i]:cols[i] + weights[i].shape[0]]
            g = activation_backward(g, s, a)
        dzs[i] = g
        if i or need_dx:  # (the input's gradient only where it is needed)
            g = torch.mm(g, weights[i])
    return (g if need_dx else None), dzs
