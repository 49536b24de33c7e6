"""Reference Linear + activation, in eager PyTorch.

``linear(x, w, b, act) == act(x @ w.T + b)``. The activations' derivatives are written out here, once
(``activation_backward``), and are the definition the Triton and CUDA kernels are tested against; the activations
themselves (names, parameters, what backward keeps, torch's forward) are pydlx/activations.py's table.

Backward needs the activation's derivative at the pre-activation ``z``. Where it is a function of the output ``y``
only ``y`` is kept (relu: y > 0; tanh: 1 - y^2; sigmoid: y(1 - y); leaky_relu: y > 0; elu: y + alpha below 0;
relu6: 0 < y < 6; hardsigmoid: 0 < y < 1; selu: y + scale alpha below 0); for gelu, gelu_tanh, silu, hardswish and
mish it is not, so ``z`` is kept (the table's ``saves_preact``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..activations import SELU_ALPHA, SELU_SCALE, check_activation, forward as activation_forward
from ..activations import forward_fresh as activation_forward_fresh

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)


def activation_backward(grad: torch.Tensor, saved: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    """dL/dz from dL/dy. ``saved`` is z for SAVES_PREACT activations, else the output y. Computed in fp32 for
    16-bit tensors (rounded once, as torch's own backward kernels do), in forms that do not cancel: 1 - sigmoid(v)
    as sigmoid(-v), 1 - y^2 as (1 - y)(1 + y), the normal CDF of z < 0 as erfc, mish's 1 - tanh(softplus(z)) from
    exact fractions of exp(-|z|) (the kernels use the same). At the kinks and for NaN, torch's conventions."""
    name, alpha = check_activation(activation)
    if name is None:
        return grad
    if name == "relu":
        # torch's own relu backward, one op: 0 where y <= 0, else the gradient (at y = NaN too, as torch)
        return torch.ops.aten.threshold_backward(grad, saved, 0)
    if grad.dtype == saved.dtype and name in ("leaky_relu", "relu6"):
        # torch's own backward ops, from y (their formulas below), one op each; their own derivative is zero but
        # connects y in a graph a double backward builds, as eager's backward connects its z
        if name == "leaky_relu":
            return torch.ops.aten.leaky_relu_backward(grad, saved, alpha, True)
        return torch.ops.aten.hardtanh_backward(grad, saved, 0.0, 6.0)
    dtype = torch.promote_types(grad.dtype, saved.dtype)
    math_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    g, s = grad.to(math_dtype), saved.to(math_dtype)
    if name == "tanh":
        d = (1 - s) * (1 + s)
    elif name == "sigmoid":
        d = s * (1 - s)
    elif name == "gelu":
        d = normal_cdf(s) + s * torch.exp(-0.5 * s * s) / math.sqrt(2 * math.pi)
    elif name == "gelu_tanh":
        v = 2 * _SQRT_2_OVER_PI * (s + 0.044715 * s * s * s)
        dv = 2 * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * s * s)
        sg = torch.sigmoid(v)
        d = sg + s * dv * sg * torch.sigmoid(-v)
    elif name == "silu":
        d = torch.sigmoid(s) * (1 + s * torch.sigmoid(-s))
    elif name == "leaky_relu":  # from y (torch's leaky_relu_backward: y > 0 ? g : g * slope)
        return torch.where(s > 0, g, g * alpha).to(dtype)
    elif name == "elu":  # from y: z <= 0 where y <= 0, and there dy/dz = alpha e^z = y + alpha (NaN: g, as torch)
        return torch.where(s <= 0, g * (s + alpha), g).to(dtype)
    elif name == "hardswish":  # from z, torch's hardswish_backward: 0 at z <= -3, 1 at z >= 3
        return torch.where(s <= -3, torch.zeros_like(g), torch.where(s < 3, g * (s / 3 + 0.5), g)).to(dtype)
    elif name == "hardsigmoid":  # from y: 1/6 where 0 < y < 1 (torch: -3 < z < 3), else 0 (NaN too, as torch)
        return torch.where((s > 0) & (s < 1), g / 6, torch.zeros_like(g)).to(dtype)
    elif name == "relu6":  # from y, torch's hardtanh_backward: 0 where y <= 0 or y >= 6, else g (NaN: g)
        return torch.where((s <= 0) | (s >= 6), torch.zeros_like(g), g).to(dtype)
    elif name == "selu":  # from y, as elu: scale alpha e^z = y + scale alpha where y <= 0, scale above
        return torch.where(s <= 0, g * (s + SELU_SCALE * SELU_ALPHA), g * SELU_SCALE).to(dtype)
    else:  # mish: n + z (1 - n)(1 + n) sigmoid(z), n = tanh(softplus(z))
        n, one_minus_n, sg = mish_parts(s)
        d = n + s * one_minus_n * (1 + n) * sg
    return (g * d).to(dtype)


def mish_parts(z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, 1 - n, sigmoid(z)) with n = tanh(softplus(z)), from t = exp(-|z|) <= 1 (no overflow) as exact fractions
    (no cancellation): with e = e^z, n = (e^2 + 2e) / (e^2 + 2e + 2); for z <= 0 (e = t) n = t(t+2) / (t(t+2) + 2),
    1 - n = 2 / (t(t+2) + 2), sigmoid = t / (1 + t); for z > 0 (e = 1/t) n = (1 + 2t) / (1 + 2t + 2t^2),
    1 - n = 2t^2 / (1 + 2t + 2t^2), sigmoid = 1 / (1 + t)."""
    t = torch.exp(-z.abs())
    neg = z <= 0
    num = torch.where(neg, t * (t + 2), 1 + 2 * t)
    rest = torch.where(neg, torch.full_like(t, 2.0), 2 * t * t)
    den = num + rest
    return num / den, rest / den, torch.where(neg, t, torch.ones_like(t)) / (1 + t)


def normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """0.5 (1 + erf(z / sqrt 2)), as 0.5 erfc(-z / sqrt 2) for z < 0 where 1 + erf cancels."""
    return torch.where(z >= 0, 0.5 * (1 + torch.erf(z * _INV_SQRT_2)), 0.5 * torch.special.erfc(-z * _INV_SQRT_2))


def supports(call, device) -> Optional[str]:
    return None  # eager PyTorch runs any size


def linear_fwd(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               activation: Optional[str], save_preact: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, z) for a 2-D input; z is an empty tensor unless ``save_preact`` (the signature of every backend's)."""
    z = F.linear(x2d, weight, bias)
    if not save_preact:
        return activation_forward_fresh(z, activation), z.new_empty(0)
    y = activation_forward(z, activation)
    return y, (z.clone() if y is z else z)  # two outputs of one op must not alias


def linear_bwd(grad_y: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, saved: torch.Tensor,
               activation: Optional[str], has_bias: bool, need_dx: bool = True, need_dw: bool = True
               ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx, dw, db) for a 2-D input (None where not needed), with ``saved`` as in ``activation_backward``."""
    dz = activation_backward(grad_y, saved, activation)
    return (torch.mm(dz, weight) if need_dx else None, torch.mm(dz.t(), x2d) if need_dw else None,
            dz.sum(0) if has_bias else None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           activation: Optional[str] = None) -> torch.Tensor:
    """act(x @ weight.T + bias) for any leading dims, through torch's own autograd."""
    return activation_forward_fresh(F.linear(x, weight, bias), activation)
