"""``pydlx.nn.Linear``: nn.Linear with a fused activation; same parameters and state_dict as nn.Linear."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.linear import linear
from ..activations import check_activation


class Linear(nn.Linear):
    """``act(nn.Linear(in_features, out_features, bias)(x))`` in one kernel.

    A subclass of nn.Linear: ``weight``/``bias``, their initialisation and the state_dict are nn.Linear's, so
    checkpoints load both ways. ``activation`` is an activation spec as pydlx.ops.linear takes: None, "relu", "gelu",
    "gelu_tanh", "silu", "tanh", "sigmoid", "leaky_relu" / "leaky_relu(0.2)", "elu" / "elu(0.5)", "hardswish",
    "hardsigmoid", "mish", "relu6" or "selu".
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: Optional[str] = None,
                 device=None, dtype=None) -> None:
        try:
            check_activation(activation)
        except ValueError as e:
            raise ValueError(f"pydlx.nn.Linear: {e}") from None
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation

    @classmethod
    def from_module(cls, linear_module: nn.Linear, activation: Optional[str] = None) -> "Linear":
        """A pydlx Linear that shares ``linear_module``'s parameters (no copy) and applies ``activation``."""
        if not isinstance(linear_module, nn.Linear):
            raise TypeError(f"pydlx.nn.Linear.from_module: expected an nn.Linear, got {type(linear_module).__name__}")
        w = linear_module.weight
        new = cls(linear_module.in_features, linear_module.out_features, bias=linear_module.bias is not None,
                  activation=activation, device="meta", dtype=w.dtype)
        new.weight = linear_module.weight
        new.bias = linear_module.bias
        new.train(linear_module.training)
        return new

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation!r}"
