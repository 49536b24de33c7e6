"""Float64 oracles of pydlx's activations, written here independently of pydlx (torch.expm1 / log1p / erfc / where
in float64), for tests/test_activations.py, tests/test_linear.py and tests/test_mlp.py.

``ORACLE[spec](z)``: the activation in forms that are accurate in float64 (the normal CDF as erfc, tanh-GELU as
z sigmoid(2u), elu's and selu's e^z - 1 as expm1, mish's softplus as log1p(exp(z))), with torch's conventions under
autograd
at the kinks and for NaN (written with ``where`` so that the derivative at a kink is torch's: 0 at relu6's 0 and 6,
hardswish's -3, hardsigmoid's -3 and 3, 1 at hardswish's 3; at NaN the gradient passes for relu, elu, hardswish, relu6,
is scaled by the slope for leaky_relu, and is 0 for hardsigmoid).

``activation(z64, spec, dtype)``: the oracle of a kernel computing in ``dtype``. For the activations whose
derivative pydlx takes from the stored output y (FROM_STORED_Y), the derivative is the same rule applied in float64
to the float64 y rounded to ``dtype``, as the kernels store it: where the derivative jumps at a kink that is not at
y = 0 (relu6 at y = 6, hardsigmoid at y = 1), rounding y moves the kink by up to half an ulp of y (bf16: z within
0.012 of hardsigmoid's 3 gives y = 1 and derivative 0, as torch's in-place relu6 / leaky_relu / elu backward from
the result do), and elu's y + alpha loses y's rounding. For hardswish, whose derivative pydlx takes from the stored
pre-activation z and jumps at z = -3 and 3 (FROM_STORED_Z), the derivative is taken at the float64 z rounded to
``dtype``, as the kernels and eager PyTorch store it (bf16: z within 0.008 below 3 rounds to 3, derivative 1 rather
than 1.5). Everywhere else this is the float64 derivative.
"""
import math

import torch

from pydlx.activations import parse_activation


def _leaky_relu(slope):
    return lambda z: torch.where(z > 0, z, slope * z)


# A branch that ``where`` does not take must have a finite derivative there (0 times inf or NaN is NaN): its input is
# replaced by 0 where it is not taken.
def _elu(alpha):
    return lambda z: torch.where(z <= 0, alpha * torch.expm1(torch.where(z <= 0, z, torch.zeros_like(z))), z)


def _hardswish(z):
    inside = (z > -3) & (z < 3)
    zi = torch.where(inside, z, torch.zeros_like(z))
    return torch.where(z <= -3, torch.zeros_like(z), torch.where(inside, zi * (zi + 3) / 6, z))


def _hardsigmoid(z):
    # 0 * z: 0 below -3 and NaN at NaN, with derivative 0 (torch's hardsigmoid_backward)
    return torch.where((z > -3) & (z < 3), (z + 3) / 6, torch.where(z >= 3, torch.ones_like(z), 0 * z))


# torch.nn.SELU's constants, written out here (not read from pydlx)
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _relu6(z):
    return torch.where(z <= 0, torch.zeros_like(z), torch.where(z >= 6, torch.full_like(z, 6.0), z))


ORACLE = {
    "relu": torch.relu,
    "gelu": lambda z: z * 0.5 * torch.special.erfc(-z / math.sqrt(2)),
    "gelu_tanh": lambda z: z * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (z + 0.044715 * z * z * z)),
    "silu": lambda z: z * torch.sigmoid(z),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leaky_relu": _leaky_relu(0.01),
    "leaky_relu(0.2)": _leaky_relu(0.2),
    "elu": _elu(1.0),
    "elu(0.5)": _elu(0.5),
    "hardswish": _hardswish,
    "hardsigmoid": _hardsigmoid,
    "mish": lambda z: z * torch.tanh(torch.log1p(torch.exp(z))),
    "relu6": _relu6,
    "selu": lambda z: _SELU_SCALE * _elu(_SELU_ALPHA)(z),
}
NEW = ["leaky_relu", "leaky_relu(0.2)", "elu", "elu(0.5)", "hardswish", "hardsigmoid", "mish", "relu6", "selu"]


def _from_y(name, alpha, y):
    """The derivative of the activation as a function of its output y (float64)."""
    one, zero = torch.ones_like(y), torch.zeros_like(y)
    if name == "leaky_relu":
        return torch.where(y > 0, one, alpha * one)
    if name == "elu":
        return torch.where(y <= 0, y + alpha, one)
    if name == "relu6":
        return torch.where((y <= 0) | (y >= 6), zero, one)
    if name == "selu":
        return torch.where(y <= 0, y + _SELU_SCALE * _SELU_ALPHA, _SELU_SCALE * one)
    return torch.where((y > 0) & (y < 1), one / 6, zero)  # hardsigmoid


FROM_STORED_Y = ("leaky_relu", "elu", "relu6", "hardsigmoid", "selu")


class _StoredY(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, spec, dtype):
        y = ORACLE[spec](z)
        ctx.spec = spec
        ctx.save_for_backward(y.to(dtype).double())
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * _from_y(*parse_activation(ctx.spec), y), None, None


FROM_STORED_Z = ("hardswish",)


class _StoredZ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, spec, dtype):
        ctx.spec = spec
        ctx.save_for_backward(z.to(dtype).double())
        return ORACLE[spec](z)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        with torch.enable_grad():
            z = z.detach().requires_grad_()
            (dz,) = torch.autograd.grad(ORACLE[ctx.spec](z), z, g)
        return dz, None, None


def activation(z64: torch.Tensor, spec, dtype) -> torch.Tensor:
    """The float64 oracle of ``spec`` at ``z64`` for a kernel computing in ``dtype`` (see the module docstring)."""
    if spec is None:
        return z64
    if dtype != torch.float64 and parse_activation(spec)[0] in FROM_STORED_Y:
        return _StoredY.apply(z64, spec, dtype)
    if dtype != torch.float64 and parse_activation(spec)[0] in FROM_STORED_Z:
        return _StoredZ.apply(z64, spec, dtype)
    return ORACLE[spec](z64)


def kinks(spec) -> tuple:
    """The pre-activations where the derivative of ``spec`` jumps (relu's 0, relu6's 0 and 6, hardswish's -3 and
    3, ...; none for the smooth ones and for elu with alpha 1). Near one, a kernel's z and the float64 z can fall on
    different sides by the rounding of their sums alone: tests leave those elements' gradients out."""
    if spec is None:
        return ()
    name, alpha = parse_activation(spec)
    if name in ("relu", "leaky_relu", "selu") or (name == "elu" and alpha != 1.0):
        return (0.0,)
    return {"relu6": (0.0, 6.0), "hardsigmoid": (-3.0, 3.0), "hardswish": (-3.0, 3.0)}.get(name, ())
