"""Reference Linear + activation, in eager PyTorch.

``linear(x, w, b, act) == act(x @ w.T + b)``. The activations and their derivatives are written out here,
once, and are the definition the Triton and CUDA kernels are tested against.

Backward needs the activation's derivative at the pre-activation ``z``. For relu, tanh and sigmoid it is a
function of the output ``y`` (relu: y > 0; tanh: 1 - y^2; sigmoid: y(1 - y)), so only ``y`` is kept; for
gelu, gelu_tanh and silu it is not, so ``z`` is kept (see ``SAVES_PREACT``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid")
# Activations whose derivative needs the pre-activation z (the others derive it from the output).
SAVES_PREACT = frozenset({"gelu", "gelu_tanh", "silu"})

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)


def activation_forward(z: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    if activation is None:
        return z
    if activation == "relu":
        return torch.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "silu":
        return F.silu(z)
    if activation == "tanh":
        return torch.tanh(z)
    if activation == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def activation_backward(grad: torch.Tensor, saved: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    """dL/dz from dL/dy. ``saved`` is z for SAVES_PREACT activations, else the output y."""
    if activation is None:
        return grad
    s = saved
    if activation == "relu":
        # NaN in y propagates like torch's threshold_backward (grad * (y > 0) would also zero NaN: keep torch's)
        return torch.where(s > 0, grad, torch.zeros_like(grad))
    if activation == "tanh":
        return grad * (1 - s * s)
    if activation == "sigmoid":
        return grad * s * (1 - s)
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(s * _INV_SQRT_2))
        pdf = torch.exp(-0.5 * s * s) / math.sqrt(2 * math.pi)
        return grad * (cdf + s * pdf)
    if activation == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (s + 0.044715 * s * s * s)
        t = torch.tanh(inner)
        dinner = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * s * s)
        return grad * (0.5 * (1 + t) + 0.5 * s * (1 - t * t) * dinner)
    if activation == "silu":
        sg = torch.sigmoid(s)
        return grad * sg * (1 + s * (1 - sg))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def linear_forward(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   activation: Optional[str], save_preact: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, z) for a 2-D input; z is an empty tensor unless ``save_preact``."""
    z = F.linear(x2d, weight, bias)
    y = activation_forward(z, activation)
    if not save_preact:
        return y, z.new_empty(0)
    return y, (z.clone() if y is z else z)  # two outputs of one op must not alias


def linear_backward(grad_y: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, saved: torch.Tensor,
                    activation: Optional[str], has_bias: bool
                    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(dx, dw, db) for a 2-D input, with ``saved`` as in ``activation_backward``."""
    dz = activation_backward(grad_y, saved, activation)
    dx = dz @ weight
    dw = dz.t() @ x2d
    db = dz.sum(0) if has_bias else None
    return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           activation: Optional[str] = None) -> torch.Tensor:
    """act(x @ weight.T + bias) for any leading dims, through torch's own autograd."""
    return activation_forward(F.linear(x, weight, bias), activation)
