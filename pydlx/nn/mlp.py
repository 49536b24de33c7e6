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
from ..activations import activation_refused, activation_spec, check_activation, module_of, module_spec


def activation_name(m: nn.Module) -> Optional[str]:
    """pydlx's activation spec for an activation module (``nn.LeakyReLU(0.2)`` -> ``"leaky_relu(0.2)"``), or None
    if it is not one pydlx fuses (``activation_refusal`` says why, for the modules pydlx knows)."""
    spec = module_spec(m)
    return spec if spec is not None and activation_refused(spec) is None else None


def activation_refusal(m: nn.Module) -> Optional[str]:
    """Why pydlx does not fuse an activation module it knows (leaky_relu with a negative slope, elu with alpha <= 0),
    else None."""
    spec = module_spec(m)
    why = activation_refused(spec) if spec is not None else None
    return f"{type(m).__name__}({m.extra_repr()}): {why}" if why else None


def is_activation(m: nn.Module) -> bool:
    """Whether ``m`` is an activation module: one pydlx knows, or any of torch.nn's activations (Softplus, ...)."""
    t = type(m)
    return module_spec(m) is not None or (t.__module__ == "torch.nn.modules.activation"
                                           and t is not nn.MultiheadAttention)


def not_fused_reason(m: nn.Module) -> str:
    """Why a Linear followed by ``m`` keeps its own kernel, for a module ``activation_name`` refuses: a parameter
    pydlx refuses, an activation pydlx does not fuse, or a module that is no activation (Dropout, Permute)."""
    name = type(m).__name__
    return activation_refusal(m) or (f"{name} is not a fusable activation" if is_activation(m)
                                     else f"followed by {name}, not an activation")


class MLP(nn.Sequential):
    """``Linear(s0, s1), act, ..., Linear(s[-2], s[-1]), last_activation`` computed by ``pydlx.ops.mlp``.

    sizes: [in_features, hidden..., out_features]. activation / last_activation: an activation spec as
    pydlx.ops.linear takes (None, "relu", "gelu", "leaky_relu(0.2)", "mish", ...; kept in canonical form), built as
    the matching torch.nn module. Layers all at most 128 wide run in one fused kernel.
    """

    def __init__(self, sizes: Sequence[int], activation: Optional[str] = "relu",
                 last_activation: Optional[str] = None, bias: bool = True, device=None, dtype=None) -> None:
        specs = []
        for a, arg in ((activation, "activation"), (last_activation, "last_activation")):
            try:
                specs.append(activation_spec(*check_activation(a, arg)))
            except ValueError as e:
                raise ValueError(f"pydlx.nn.MLP: {e}") from None
        activation, last_activation = specs
        if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
            raise ValueError(f"pydlx.nn.MLP: sizes must list at least two positive sizes (in, ..., out), got "
                             f"{list(sizes)}")
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias, device=device, dtype=dtype))
            act = activation if i + 2 < len(sizes) else last_activation
            if act is not None:
                layers.append(module_of(act))
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
                return activation_refusal(between[0]) or (
                    f"{type(between[0]).__name__} after {children[i][0]!r} is not "
                    f"{'a fusable activation' if is_activation(between[0]) else 'an activation'}")
            if k + 1 < len(linears):
                expected_acts.add(name)
        elif k + 1 < len(linears):
            expected_acts.add(None)
    if len(expected_acts) > 1:
        return f"the hidden activations differ ({sorted(map(str, expected_acts))}); pydlx.nn.MLP uses one"
    return None
