"""Eager PyTorch implementations of every pydlx op: the CPU fallback, the ``reference`` backend (each family's
module has the signatures of pydlx/triton/<family>.py; ``MODULES`` maps the family names to them) and the test
oracle."""
from . import conv_relu_pool as _conv_relu_pool_module, linear as _linear_module, lstm as _lstm_module
from . import mlp as _mlp_module
from .conv_relu_pool import conv_act_pool2d, conv_relu_pool2d
from .linear import (ACTIVATIONS, MONOTONE, activation_backward, activation_forward, activation_spec,
                     check_activation, linear, linear_bwd, linear_fwd, parse_activation, saves_preact)
from .mlp import mlp

# the family modules (pydlx.reference.linear etc.; the package's ``linear`` and ``mlp`` names are the functions)
MODULES = {"linear": _linear_module, "mlp": _mlp_module, "conv_relu_pool": _conv_relu_pool_module,
           "lstm": _lstm_module}

__all__ = ["ACTIVATIONS", "MONOTONE", "activation_forward", "activation_backward", "activation_spec",
           "check_activation", "parse_activation", "saves_preact", "linear", "linear_fwd", "linear_bwd", "mlp",
           "conv_act_pool2d", "conv_relu_pool2d", "MODULES"]
