"""The activations pydlx fuses: one table, one row each (``TABLE``); everything else derives from it.

A row holds what every part of pydlx needs to know about one activation:

  name          the spec users pass as ``activation=`` ("relu", "leaky_relu", ...)
  code          its number in the kernels: Triton's ``ACT`` constexpr (pydlx/triton/common.py names them from this
                table) and csrc/dispatch.h's ``enum Act`` (tests/test_activations.py checks the C++ against this table)
  param         (torch's argument name, torch's default) of its one parameter, or None: leaky_relu's negative slope
                and elu's alpha
  saves_preact  its derivative needs the pre-activation z (else it is a function of the output y, which backward
                keeps instead)
  monotone      non-decreasing for every parameter pydlx accepts: max commutes with it, so a max pool may follow
                it inside one kernel
  forward       torch's own forward, ``forward(z, parameter)`` (the reference backend and the oracle)
  module        the torch.nn module ``optimize`` recognises (exact type) and ``pydlx.nn.MLP`` builds, with
                ``module_fixed``: attributes that must have these values (nn.GELU's ``approximate``)
  functions     the torch functions ``optimize`` recognises in forward code (``Spelling``: which arguments the call
                may pass besides the input, and which must have fixed values)
  methods       the Tensor methods it recognises (``x.relu()``, ``x.relu_()``)

An activation is given by its *spec*: None, a row's name, or for a row with a parameter the name with its value,
``"leaky_relu(0.2)"`` (``"leaky_relu"`` is torch's 0.01) and ``"elu(0.5)"`` (``"elu"`` is 1.0). ``parse_activation``
reads a spec, ``activation_spec`` writes the canonical one (the plain name for the default value, else
``f"{name}({value!r})"``: Python's float repr, which round-trips).

Backward derives the derivative from y where ``saves_preact`` is False, which needs y > 0 exactly where z > 0: a
negative slope or an alpha <= 0 breaks that, and the fused ops refuse them (``activation_refused``), as torch
refuses the backward of an in-place leaky_relu with a negative slope.

Adding an activation: one row here, its forward and derivative in pydlx/reference/linear.py
(``activation_backward``), pydlx/triton/common.py (``_act_fwd`` / ``_act_bwd``) and csrc/activations.cuh (plus its
code in csrc/dispatch.h); docs/DEVELOPING.md walks through it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Spelling:
    """A torch function that computes an activation of its first argument: ``fn(input, *args)`` where the call may
    pass the arguments named in ``args`` (positionally in that order, or by keyword) and nothing else; ``fixed``:
    arguments that must have these values (given, or torch's default, ``TORCH_DEFAULTS``)."""
    fn: Callable
    args: Tuple[str, ...] = ()
    fixed: Mapping[str, object] = field(default_factory=dict)


# torch's defaults of the arguments a Spelling may fix or ignore (``inplace``: in place or not, the value is the same)
TORCH_DEFAULTS: Dict[str, object] = {"approximate": "none", "inplace": False}


@dataclass(frozen=True)
class Activation:
    name: str
    code: int
    saves_preact: bool
    monotone: bool
    forward: Callable[[torch.Tensor, float], torch.Tensor]
    module: type
    param: Optional[Tuple[str, float]] = None
    module_fixed: Mapping[str, object] = field(default_factory=dict)
    functions: Tuple[Spelling, ...] = ()
    methods: Tuple[str, ...] = ()

    @property
    def default(self) -> float:
        """torch's default value of the parameter (0.0 for an activation without one)."""
        return self.param[1] if self.param else 0.0

    def build_module(self, value: float = 0.0) -> nn.Module:
        """The torch.nn module computing this activation with parameter ``value``."""
        kwargs = dict(self.module_fixed)
        if self.param:
            kwargs[self.param[0]] = value
        return self.module(**kwargs)


_INPLACE = ("inplace",)
TABLE: Tuple[Activation, ...] = (
    Activation("relu", 1, saves_preact=False, monotone=True, forward=lambda z, a: torch.relu(z), module=nn.ReLU,
               functions=(Spelling(F.relu, _INPLACE), Spelling(torch.relu), Spelling(torch.relu_), Spelling(F.relu_)),
               methods=("relu", "relu_")),
    Activation("gelu", 2, saves_preact=True, monotone=False, forward=lambda z, a: F.gelu(z), module=nn.GELU,
               module_fixed={"approximate": "none"},
               functions=(Spelling(F.gelu, ("approximate",), {"approximate": "none"}),)),
    Activation("gelu_tanh", 3, saves_preact=True, monotone=False,
               forward=lambda z, a: F.gelu(z, approximate="tanh"), module=nn.GELU,
               module_fixed={"approximate": "tanh"},
               functions=(Spelling(F.gelu, ("approximate",), {"approximate": "tanh"}),)),
    Activation("silu", 4, saves_preact=True, monotone=False, forward=lambda z, a: F.silu(z), module=nn.SiLU,
               functions=(Spelling(F.silu, _INPLACE),)),
    Activation("tanh", 5, saves_preact=False, monotone=True, forward=lambda z, a: torch.tanh(z), module=nn.Tanh,
               functions=(Spelling(torch.tanh), Spelling(F.tanh)), methods=("tanh", "tanh_")),
    Activation("sigmoid", 6, saves_preact=False, monotone=True, forward=lambda z, a: torch.sigmoid(z),
               module=nn.Sigmoid, functions=(Spelling(torch.sigmoid), Spelling(F.sigmoid)),
               methods=("sigmoid", "sigmoid_")),
    Activation("leaky_relu", 7, saves_preact=False, monotone=True, forward=lambda z, a: F.leaky_relu(z, a),
               module=nn.LeakyReLU, param=("negative_slope", 0.01),
               functions=(Spelling(F.leaky_relu, ("negative_slope", "inplace")),
                          Spelling(F.leaky_relu_, ("negative_slope",)))),
    # alpha expm1(z) below 0 (torch's kernel uses expm1: no cancellation near 0)
    Activation("elu", 8, saves_preact=False, monotone=True, forward=lambda z, a: F.elu(z, a), module=nn.ELU,
               param=("alpha", 1.0),
               functions=(Spelling(F.elu, ("alpha", "inplace")), Spelling(F.elu_, ("alpha",)))),
    Activation("hardswish", 9, saves_preact=True, monotone=False, forward=lambda z, a: F.hardswish(z),
               module=nn.Hardswish, functions=(Spelling(F.hardswish, _INPLACE),)),
    Activation("hardsigmoid", 10, saves_preact=False, monotone=True, forward=lambda z, a: F.hardsigmoid(z),
               module=nn.Hardsigmoid, functions=(Spelling(F.hardsigmoid, _INPLACE),)),
    Activation("mish", 11, saves_preact=True, monotone=False, forward=lambda z, a: F.mish(z), module=nn.Mish,
               functions=(Spelling(F.mish, _INPLACE),)),
    Activation("relu6", 12, saves_preact=False, monotone=True, forward=lambda z, a: F.relu6(z), module=nn.ReLU6,
               functions=(Spelling(F.relu6, _INPLACE),)),
    # scale * elu(z, alpha) with SELU_ALPHA, SELU_SCALE: the self-normalising networks' activation
    Activation("selu", 13, saves_preact=False, monotone=True, forward=lambda z, a: F.selu(z), module=nn.SELU,
               functions=(Spelling(F.selu, _INPLACE), Spelling(torch.selu), Spelling(torch.selu_))),
)
# selu's constants (torch's): selu(z) = SELU_SCALE * (z if z > 0 else SELU_ALPHA * (e^z - 1))
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
NONE_CODE = 0  # no activation (the kernels' ACT == 0)

BY_NAME: Dict[str, Activation] = {a.name: a for a in TABLE}
# Derived views (one home: the table)
ACTIVATIONS = (None,) + tuple(BY_NAME)  # every spec name; None: no activation
PARAMETERS = {a.name: a.default for a in TABLE if a.param}  # the activations with a parameter: torch's default
SAVES_PREACT = frozenset(a.name for a in TABLE if a.saves_preact)
MONOTONE = frozenset(a.name for a in TABLE if a.monotone)

_SPEC = re.compile(r"([a-z_0-9]+)\((.*)\)")


def _accepted(what: str, spec) -> str:
    return (f"{what} must be one of {ACTIVATIONS} (leaky_relu and elu also with their parameter, e.g. "
            f"'leaky_relu(0.2)', 'elu(0.5)'), got {spec!r}")


def _parse(spec: str, what: str) -> Tuple[str, float]:
    if spec in BY_NAME:
        return spec, BY_NAME[spec].default
    m = _SPEC.fullmatch(spec.strip())
    if m is None or m.group(1) not in BY_NAME:
        raise ValueError(_accepted(what, spec))
    name, arg = m.group(1), m.group(2).strip()
    if name not in PARAMETERS:
        raise ValueError(f"{what} {spec!r}: {name} takes no parameter (only {' and '.join(PARAMETERS)} do)")
    try:
        value = float(arg)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{what} {spec!r}: {name}'s parameter must be a finite number, got {arg!r}")
    return name, value


def parse_activation(spec: Optional[str], what: str = "activation") -> Tuple[Optional[str], float]:
    """(name, parameter) of an activation spec: ``"leaky_relu(0.2)"`` -> ("leaky_relu", 0.2), ``"elu"`` ->
    ("elu", 1.0), ``"gelu"`` -> ("gelu", 0.0), None -> (None, 0.0). The parameter is 0.0 for activations without
    one. Raises ValueError for an unknown name, a parameter given to an activation that has none, or a parameter
    that is not a finite number. ``what`` names the argument in the message. (Parsed once per spec: kept.)"""
    if spec is None:
        return None, 0.0
    if not isinstance(spec, str):
        raise ValueError(_accepted(what, spec))
    if torch.compiler.is_compiling():  # (traced: parsed afresh; a guard on the kept table would recompile)
        return _parse(spec, what)
    hit = _PARSED.get(spec)
    if hit is not None:  # (every call after a spec's first: one lookup, no parsing)
        return hit
    parsed = _parse(spec, what)
    if len(_PARSED) >= _PARSED_MAX:  # (specs made from arbitrary parameters must not grow it without bound)
        _ACCEPTED.clear()
        _PARSED.clear()
    _PARSED[spec] = parsed
    return parsed


_PARSED: Dict[str, Tuple[str, float]] = {}  # spec -> (name, parameter), for the well-formed specs seen
_PARSED_MAX = 512
_ACCEPTED: set = set()  # the kept specs that check_activation took (a subset of _PARSED's)


def activation_spec(name: Optional[str], alpha: float = 0.0) -> Optional[str]:
    """The canonical spec of an activation and its parameter: the plain name for the default value (and for
    activations without a parameter, whose ``alpha`` is ignored), else ``f"{name}({float(alpha)!r})"``."""
    if name not in PARAMETERS:
        parse_activation(name)  # an unknown name raises
        return name
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"{name}'s parameter must be a finite number, got {alpha!r}")
    return name if alpha == PARAMETERS[name] else f"{name}({alpha!r})"


def activation_refused(spec: Optional[str]) -> Optional[str]:
    """Why the fused ops refuse a well-formed spec, or None: the derivatives of leaky_relu and elu are taken from
    the output y (y > 0 exactly where z > 0), which a negative slope or an alpha <= 0 breaks."""
    name, alpha = parse_activation(spec)
    if name == "leaky_relu" and alpha < 0:
        return (f"leaky_relu with a negative slope ({alpha!r}) is not supported: its derivative is taken from the "
                "output, which needs slope >= 0")
    if name == "elu" and alpha <= 0:
        return (f"elu with alpha <= 0 ({alpha!r}) is not supported: its derivative is taken from the output, which "
                "needs alpha > 0")
    return None


def check_activation(spec: Optional[str], what: str = "activation") -> Tuple[Optional[str], float]:
    """Raise ValueError with a clear message unless the fused ops take ``spec`` (a known activation, a finite
    parameter where it has one, slope >= 0 / alpha > 0); returns (name, parameter) as ``parse_activation``."""
    compiling = torch.compiler.is_compiling()  # (traced: checked afresh, as in parse_activation)
    if not compiling and type(spec) is str and spec in _ACCEPTED:  # (a spec taken before: no second look)
        hit = _PARSED.get(spec)  # (None only if another thread just emptied the tables)
        if hit is not None:
            return hit
    name, alpha = parse_activation(spec, what)
    why = activation_refused(spec)
    if why is not None:
        raise ValueError(f"{what} {spec!r}: {why}")
    if not compiling and spec in _PARSED:
        _ACCEPTED.add(spec)
    return name, alpha


def saves_preact(spec: Optional[str]) -> bool:
    """Whether backward needs the pre-activation z (else the output y, or nothing for None)."""
    return parse_activation(spec)[0] in SAVES_PREACT


def is_monotone(spec: Optional[str]) -> bool:
    """Whether max commutes with the activation (non-decreasing), so that a max pool may run before or after it."""
    return spec is not None and parse_activation(spec)[0] in MONOTONE


def code(spec: Optional[str]) -> Tuple[int, float]:
    """(kernel code, parameter) of a spec: what the Triton and C++/CUDA kernels take. Kept per spec, as the parsed
    specs are (every kernel launch asks)."""
    hit = _CODES.get(spec) if type(spec) is str and not torch.compiler.is_compiling() else None
    if hit is not None:
        return hit
    name, alpha = parse_activation(spec)
    out = (NONE_CODE if name is None else BY_NAME[name].code), float(alpha)
    if type(spec) is str and spec in _PARSED and not torch.compiler.is_compiling():
        if len(_CODES) >= _PARSED_MAX:
            _CODES.clear()
        _CODES[spec] = out
    return out


_CODES: Dict[str, Tuple[int, float]] = {}  # spec -> code(spec), for the specs parse_activation keeps


def forward(z: torch.Tensor, spec: Optional[str]) -> torch.Tensor:
    """act(z) as torch computes it (the row's ``forward``); z for None."""
    name, alpha = parse_activation(spec)
    return z if name is None else BY_NAME[name].forward(z, alpha)


def forward_fresh(z: torch.Tensor, spec: Optional[str]) -> torch.Tensor:
    """``forward`` for a z that nothing else holds or reads later (a layer's fresh output that is not kept as the
    pre-activation): relu runs in place, as ``nn.ReLU(inplace=True)`` after a layer does (autograd stays exact: its
    backward reads the output); no new tensor is allocated and written. The others as ``forward``. Under
    torch.compile or a dispatch mode (a decomposition or graph being traced, whose math must be functional) not in
    place either."""
    if spec == "relu" and not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()):
        return z.relu_()
    return forward(z, spec)


# ----------------------------------------------------------------------------------------------- torch spellings
def module_spec(m: nn.Module) -> Optional[str]:
    """The spec of an activation module pydlx has the activation of (parameters it refuses included), else None.
    Exact types: a subclass may compute something else."""
    for a in TABLE:
        if type(m) is a.module and all(getattr(m, k, None) == v for k, v in a.module_fixed.items()):
            if not a.param:
                return a.name
            try:
                return activation_spec(a.name, getattr(m, a.param[0]))
            except (TypeError, ValueError):  # a parameter that is not a finite number
                return None
    return None


def module_of(spec: str) -> nn.Module:
    """The torch.nn module of an activation spec (``"leaky_relu(0.2)"`` -> ``nn.LeakyReLU(0.2)``)."""
    name, alpha = parse_activation(spec)
    return BY_NAME[name].build_module(alpha)


_BY_FUNCTION: Dict[object, Tuple[Tuple[Activation, Spelling], ...]] = {}
for _a in TABLE:
    for _s in _a.functions:
        _BY_FUNCTION[_s.fn] = _BY_FUNCTION.get(_s.fn, ()) + ((_a, _s),)
_BY_METHOD: Dict[str, Activation] = {m: a for a in TABLE for m in a.methods}


def _constant(v) -> bool:
    return isinstance(v, (bool, int, float, str, type(None)))


def function_spec(fn, args: tuple, kwargs: dict) -> Optional[str]:
    """The spec of a call ``fn(input, *args, **kwargs)`` of a torch function computing an activation of its input
    (``F.leaky_relu(x, 0.2)`` -> ``"leaky_relu(0.2)"``), with constant arguments; else None. ``args`` excludes the
    input. Parameters the fused ops refuse are included (``activation_refused`` says why)."""
    for a, s in _BY_FUNCTION.get(fn, ()):
        if len(args) > len(s.args) or any(k not in s.args for k in kwargs):
            continue
        given = dict(zip(s.args, args), **kwargs)
        if not all(_constant(v) for v in given.values()):
            continue  # e.g. a traced value
        if any(given.get(k, TORCH_DEFAULTS.get(k)) != v for k, v in s.fixed.items()):
            continue
        if not a.param:
            return a.name
        value = given.get(a.param[0], a.default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        try:
            return activation_spec(a.name, value)
        except ValueError:  # not finite
            return None
    return None


def method_spec(method: str, nargs: int) -> Optional[str]:
    """The spec of ``x.<method>()`` (no arguments besides x: ``nargs`` counts the others), else None."""
    a = _BY_METHOD.get(method)
    return a.name if a is not None and nargs == 0 else None


__all__ = ["Activation", "Spelling", "TABLE", "BY_NAME", "ACTIVATIONS", "PARAMETERS", "SAVES_PREACT", "MONOTONE",
           "NONE_CODE", "parse_activation", "activation_spec", "activation_refused", "check_activation",
           "saves_preact", "is_monotone", "code", "forward", "module_spec", "module_of", "function_spec",
           "method_spec"]
