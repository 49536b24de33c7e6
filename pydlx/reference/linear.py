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
    """dL/dz from dL/dy. ``saved`` is z for SAVES_PREACT activations, else the output y. Computed in fp32 for
    16-bit tensors (rounded once, as torch's own backward kernels do), in forms that do not cancel: 1 - sigmoid(v)
    as sigmoid(-v), 1 - y^2 as (1 - y)(1 + y), the normal CDF of z < 0 as erfc (the kernels use the same)."""
    if activation is None:
        return grad
    if activation == "relu":
        # NaN in y propagates like torch's threshold_backward (grad * (y > 0) would also zero NaN: keep torch's)
        return torch.where(saved > 0, grad, torch.zeros_like(grad))
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    dtype = torch.promote_types(grad.dtype, saved.dtype)
    math_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    g, s = grad.to(math_dtype), saved.to(math_dtype)
    if activation == "tanh":
        d = (1 - s) * (1 + s)
    elif activation == "sigmoid":
        d = s * (1 - s)
    elif activation == "gelu":
        d = normal_cdf(s) + s * torch.exp(-0.5 * s * s) / math.sqrt(2 * math.pi)
    elif activation == "gelu_tanh":
        v = 2 * _SQRT_2_OVER_PI * (s + 0.044715 * s * s * s)
        dv = 2 * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * s * s)
        sg = torch.sigmoid(v)
        d = sg + s * dv * sg * torch.sigmoid(-v)
    else:  # silu
        d = torch.sigmoid(s) * (1 + s * torch.sigmoid(-s))
    return (g * d).to(dtype)


def normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """0.5 (1 + erf(z / sqrt 2)), as 0.5 erfc(-z / sqrt 2) for z < 0 where 1 + erf cancels."""
    return torch.where(z >= 0, 0.5 * (1 + torch.erf(z * _INV_SQRT_2)), 0.5 * torch.special.erfc(-z * _INV_SQRT_2))


def why_cannot(in_features: int, out_features: int) -> Optional[str]:
    return None  # eager PyTorch runs any size


def linear_fwd(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               activation: Optional[str], save_preact: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, z) for a 2-D input; z is an empty tensor unless ``save_preact`` (the signature of every backend's)."""
    z = F.linear(x2d, weight, bias)
    y = activation_forward(z, activation)
    if not save_preact:
        return y, z.new_empty(0)
    return y, (z.clone() if y is z else z)  # two outputs of one op must not alias


def linear_bwd(grad_y: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, saved: torch.Tensor,
               activation: Optional[str], has_bias: bool, need_dx: bool = True, need_dw: bool = True
               ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx, dw, db) for a 2-D input (None where not needed), with ``saved`` as in ``activation_backward``."""
    dz = activation_backward(grad_y, saved, activation)
    return (dz @ weight if need_dx else None, dz.t() @ x2d if need_dw else None, dz.sum(0) if has_bias else None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           activation: Optional[str] = None) -> torch.Tensor:
    """act(x @ weight.T + bias) for any leading dims, through torch's own autograd."""
    return activation_forward(F.linear(x, weight, bias), activation)


# SHIM (not committed): the act branch's interface
MONOTONE = frozenset({"relu", "sigmoid", "tanh"})


def parse_activation(spec):
    return spec, 0.0


def check_activation(spec):
    if spec not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {spec!r}")


def saves_preact(spec):
    return spec in SAVES_PREACT
