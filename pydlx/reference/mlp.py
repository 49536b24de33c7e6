"""Reference MLP, in eager PyTorch: ``Linear(s0, s1) -> act -> ... -> Linear(s[-2], s[-1]) -> last_activation``.

``mlp(x, weights, biases, activation, last_activation)`` with ``weights[i]`` of shape ``(s[i+1], s[i])`` and
``biases[i]`` of shape ``(s[i+1],)`` or None. The oracle of the fused MLP kernels.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .linear import SAVES_PREACT, linear


def saves_z(activation: Optional[str], last_activation: Optional[str]) -> bool:
    """Whether a fused MLP keeps the pre-activations for backward: only when an activation's derivative needs z
    (gelu, gelu_tanh, silu); relu/tanh/sigmoid derive it from the layer outputs, which are kept anyway."""
    return activation in SAVES_PREACT or last_activation in SAVES_PREACT


def mlp(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
        activation: Optional[str] = "relu", last_activation: Optional[str] = None) -> torch.Tensor:
    h = x
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = linear(h, w, b, activation if i + 1 < len(weights) else last_activation)
    return h
