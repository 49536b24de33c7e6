"""``pydlx.optimize(model)`` and ``pydlx.explain(model)``: swap fused layers into an existing model.

What is swapped today (the families of later issues add their patterns here):
  * ``nn.Linear`` followed, inside an ``nn.Sequential``, by an activation module (ReLU, GELU, SiLU, Tanh,
    Sigmoid) becomes ``pydlx.nn.Linear(activation=...)`` sharing the same parameters, and the activation
    module becomes ``nn.Identity``. Parameter names, and so the state_dict, are unchanged.
The walk is post-order and explicit (setattr on the parent); nothing global is patched.
"""
from __future__ import annotations

import copy
from typing import Callable, List, Optional, Tuple

from torch import nn

from .nn.linear import Linear


def _activation_name(m: nn.Module) -> Tuple[Optional[str], Optional[str]]:
    """(pydlx activation name, None) for a fusable activation module, or (None, why not)."""
    if type(m) is nn.ReLU:
        return "relu", None
    if type(m) is nn.GELU:
        return ("gelu" if m.approximate == "none" else "gelu_tanh"), None
    if type(m) is nn.SiLU:
        return "silu", None
    if type(m) is nn.Tanh:
        return "tanh", None
    if type(m) is nn.Sigmoid:
        return "sigmoid", None
    return None, f"{type(m).__name__} is not a fusable activation"


def _plan(model: nn.Module, filter_fn) -> List[Tuple[str, nn.Sequential, int, Optional[str], Optional[str]]]:
    """(fqn, parent Sequential, index, activation, skip reason) for each Linear inside a Sequential."""
    found = []
    for fqn, mod in model.named_modules():
        if not isinstance(mod, nn.Sequential):
            continue
        children = list(mod.children())
        names = [n for n, _ in mod.named_children()]
        for i, child in enumerate(children):
            if type(child) is not nn.Linear:
                continue
            child_fqn = f"{fqn}.{names[i]}" if fqn else names[i]
            if filter_fn is not None and not filter_fn(child, child_fqn):
                found.append((child_fqn, mod, i, None, "excluded by filter_fn"))
                continue
            if i + 1 >= len(children):
                found.append((child_fqn, mod, i, None, "no activation follows it"))
                continue
            act, why = _activation_name(children[i + 1])
            found.append((child_fqn, mod, i, act, why))
    return found


def optimize(model: nn.Module, *, inplace: bool = False,
             filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Return ``model`` with fusable chains replaced by pydlx layers; state_dict keys and values unchanged.

    inplace=False (default) works on a deep copy and leaves ``model`` untouched. ``filter_fn(module, fqn)``
    returning False keeps that module as it is.
    """
    if not inplace:
        model = copy.deepcopy(model)
    for fqn, parent, i, act, why in _plan(model, filter_fn):
        if act is None:
            continue
        names = [n for n, _ in parent.named_children()]
        lin = getattr(parent, names[i])
        setattr(parent, names[i], Linear.from_module(lin, activation=act))
        setattr(parent, names[i + 1], nn.Identity())
    return model


def explain(model: nn.Module) -> str:
    """What ``optimize`` would fuse, and for each candidate it skips, why."""
    lines = []
    for fqn, parent, i, act, why in _plan(model, None):
        if act is not None:
            lines.append(f"fuse   {fqn}: Linear + {act} -> pydlx.nn.Linear(activation={act!r})")
        else:
            lines.append(f"keep   {fqn}: Linear ({why})")
    return "\n".join(lines) if lines else "nothing to fuse: no Linear inside an nn.Sequential"
