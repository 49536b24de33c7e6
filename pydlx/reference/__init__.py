"""Eager PyTorch implementations of every pydlx op: the CPU fallback and the test oracle."""
from .conv_relu_pool import conv_relu_pool2d
from .linear import ACTIVATIONS, activation_backward, activation_forward, linear, linear_backward, linear_forward
from .mlp import mlp

__all__ = ["ACTIVATIONS", "activation_forward", "activation_backward", "linear", "linear_forward",
           "linear_backward", "mlp", "conv_relu_pool2d"]
