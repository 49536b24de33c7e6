"""``pydlx.nn.MLP``: an ``nn.Sequential`` of Linear and activation modules whose forward is one pydlx op.

It *is* an nn.Sequential holding the same ``nn.Linear`` modules at the same positions as the equivalent
``nn.Sequential(Linear, act, ..., Linear[, last_act])``, so its parameter names and state_dict are that
Sequential's, and ``from_sequential`` reuses a model's own modules (no copy).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import nn

from ..ops.mlp import mlp
from ..reference.linear import ACTIVATIONS

_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU,
            "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def activation_name(m: nn.Module) -> Optional[str]:
    """pydlx's name for an activation module, or None if it is not one pydlx fuses."""
    if type(m) is nn.ReLU:
        return "relu"
    if type(m) is nn.GELU:
        return "gelu" if m.approximate == "none" else "gelu_tanh"
    return {nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}.get(type(m))


class MLP(nn.Sequential):
    """``Linear(s0, s1), act, ..., Linear(s[-2], s[-1]), last_activation`` computed by ``pydlx.ops.mlp``.

    sizes: [in_features, hidden..., out_features]. activation / last_activation: None, "relu", "gelu",
    "gelu_tanh", "silu", "tanh" or "sigmoid". Layers all at most 128 wide run in one fused kernel.
    """

    def __init__(self, sizes: Sequence[int], activation: Optional[str] = "relu",
                 last_activation: Optional[str] = None, bias: bool = True, device=None, dtype=None) -> None:
        for a, arg in ((activation, "activation"), (last_activation, "last_activation")):
            if a not in ACTIVATIONS:
                raise ValueError(f"pydlx.nn.MLP: {arg} must be one of {ACTIVATIONS}, got {a!r}")
        if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
            raise ValueError(f"pydlx.nn.MLP: sizes must list at least two positive sizes (in, ..., out), got "
                             f"{list(sizes)}")
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias, device=device, dtype=dtype))
            act = activation if i + 2 < len(sizes) else last_activation
            if act is not None:
                layers.append(_MODULES[act]())
        super().__init__(*layers)
        self.activation, self.last_activation = activation, last_activation

    @classmethod
    def from_sequential(cls, seq: nn.Sequential) -> "MLP":
        """An MLP over ``seq``'s own modules (names and parameters kept). ``seq`` must be Linear layers, each but
        the last followed by the same activation module, the last optionally followed by one."""
        if not isinstance(seq, nn.Sequential):
            raise TypeError(f"pydlx.nn.MLP.from_sequential: expected an nn.Sequential, got {type(seq).__name__}")
        children = list(seq.named_children())
        linears = [i for i, (_, m) in enumerate(children) if type(m) is nn.Linear]
        why = _pattern_error(children, linears)
        if why:
            raise ValueError(f"pydlx.nn.MLP.from_sequential: {why}")
        hidden = {activation_name(children[i + 1][1]) for i in linears[:-1] if i + 1 < len(children)
                  and type(children[i + 1][1]) is not nn.Linear}
        last_i = linears[-1]
        last = activation_name(children[last_i + 1][1]) if last_i + 1 < len(children) else None
        new = cls.__new__(cls)
        nn.Sequential.__init__(new, OrderedDict(children))
        new.activation = hidden.pop() if hidden else None
        new.last_activation = last
        new.train(seq.training)
        return new

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        linears = [m for m in self if isinstance(m, nn.Linear)]
        return mlp(input, [m.weight for m in linears], [m.bias for m in linears], self.activation,
                   self.last_activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, last_activation={self.last_activation!r}"


def _pattern_error(children, linears) -> Optional[str]:
    """None if the children are Linear (act Linear)* [act] with one hidden activation type, else why not."""
    if not linears or linears[0] != 0:
        return "it must start with an nn.Linear"
    expected_acts = set()
    for k, i in enumerate(linears):
        nxt = linears[k + 1] if k + 1 < len(linears) else len(children)
        between = [m for _, m in children[i + 1:nxt]]
        if len(between) > 1:
            return f"more than one module between Linear layers at {children[i][0]!r}"
        if between:
            name = activation_name(between[0])
            if name is None:
                return f"{type(between[0]).__name__} after {children[i][0]!r} is not a fusable activation"
            if k + 1 < len(linears):
                expected_acts.add(name)
        elif k + 1 < len(linears):
            expected_acts.add(None)
    if len(expected_acts) > 1:
        return f"the hidden activations differ ({sorted(map(str, expected_acts))}); pydlx.nn.MLP uses one"
    return None
