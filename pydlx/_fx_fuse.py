"""The torch.fx half of ``pydlx.optimize``: fusable chains written in a model's forward rather than as modules in an
``nn.Sequential`` — the seed CNN's ``self.pool(F.relu(self.conv1(x)))`` (one pool module reused twice) and
``F.relu(self.fc1(x))``, with ``torch.relu`` / ``F.gelu`` / ``x.relu()`` / in-place ``ReLU(True)`` variants, and every
activation pydlx has (``F.leaky_relu(x, 0.2)``, ``F.elu``, ``F.hardswish``, ``nn.Mish()``, ...) after a Linear.

The forward is traced with ``torch.fx`` (pydlx's and torch's RNN modules are leaves) and the fusable chains in the
graph become calls of pydlx's ops over the modules' own parameters (``get_attr``); no module is replaced, so the
model's modules, attributes and state_dict stay exactly as they are:
  Conv2d -> relu -> max_pool2d   becomes   pydlx.ops.conv_relu_pool2d(x, conv.weight, conv.bias, ...)
  Linear -> act -> Linear ...    becomes   one pydlx.ops.mlp(x, [weights], [biases], ...) call
  Linear -> act                  becomes   pydlx.ops.linear(x, linear.weight, linear.bias, activation)
A module called from several places is fused only if every call is followed by the same pattern.

One rewrite is no fusion: a tensor the forward makes on the CPU only to copy it to a device, as the tutorial RNN
makes its initial states (``torch.zeros(layers, n, hidden).to(x.device)``), is made on that device instead
(``construct_on_device``): the same values without a host-to-device copy, and the host wait for it, on every call,
which CUDA graph capture refuses.

A trace is specialised: Python in the forward ran once, on the values it read then. So the trace records what it
read — every plain attribute of a traced module (``self.training``, ``self.ngpu``, ...), which module objects it
traced through, whether an optional argument was left at its default — and the fused forward is kept per set of
those values (guards). The optimized model is the model itself with its class switched to a subclass whose
``forward`` looks the guards up and runs the matching fused code; when they differ (``.eval()`` after optimizing
in training mode, a changed attribute, a new optional argument) it traces again, and where a trace fails (control
flow on tensor values or shapes) it runs the model's own forward, unfused. Pickling and deepcopy keep the class
and re-trace on first use.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import linecache
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.utils import _pair

from .nn.conv_relu_pool import ConvReLUPool2d, fused_args, unsupported as conv_unsupported
from .nn.linear import Linear
from .nn.lstm import LSTM, LSTMCell
from .nn.mlp import MLP
from ._plan import Block
from .activations import activation_refused, function_spec, is_monotone, method_spec, module_spec
from .reference.mlp import fuses_in_one_kernel

_LEAVES = (Linear, MLP, ConvReLUPool2d, LSTM, LSTMCell, nn.RNNBase, nn.LSTMCell)

MAX_SPECIALISATIONS = 8  # fused forwards kept per model; past that, new guard values run the unfused forward

Allowed = Callable[[str], bool]


# ----------------------------------------------------------------------------------------------- tracing
class TraceFailed(Exception):
    """The forward could not be traced (or must not be fused); ``guards`` are what it had read by then."""

    def __init__(self, why: str, guards: list):
        super().__init__(why)
        self.why, self.guards = why, guards


_INTERNAL = frozenset(nn.Module().__dict__) - {"training"}  # nn.Module's own bookkeeping, read by its machinery
_SIMPLE = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size, torch.layout,
           torch.memory_format)
_recording: List["_Recorder"] = []
_recording_classes: Dict[type, type] = {}


_FX_CONSTANTS = ("_tensor_constant", "_param_constant")


class _Assigns(Exception):
    """The traced forward assigns a module attribute: a side effect the fused code would not repeat."""


class _Recorder:
    """What a trace read from (and wrote to) the plain attributes of the modules it traced through."""

    def __init__(self, paths: Dict[int, str]):
        self.paths, self.reads = paths, {}

    def read(self, module: nn.Module, name: str, value) -> None:
        key = (self.paths[id(module)], name)
        if key not in self.reads and not isinstance(value, torch.Tensor):  # tensors: get_attr, read at run time
            self.reads[key] = value

    def guards(self) -> list:
        return [(path, name, _snapshot(value)) for (path, name), value in self.reads.items()]


def _recording_class(cls: type) -> type:
    """A subclass of ``cls`` that reports reads and writes of instance attributes to the active recorder. It
    stands in for a traced module's class during the trace only; same name and module, so fx sees no change."""
    if cls not in _recording_classes:
        def __getattribute__(self, name):
            value = cls.__getattribute__(self, name)
            if _recording and name not in _INTERNAL and not name.startswith("__") \
                    and name in object.__getattribute__(self, "__dict__"):
                _recording[-1].read(self, name, value)
            return value

        def __setattr__(self, name, value):
            if _recording and not name.startswith(_FX_CONSTANTS):  # fx keeps tensor constants on the root
                raise _Assigns(f"{_recording[-1].paths[id(self)] + '.' if _recording[-1].paths[id(self)] else ''}"
                               f"{name}")
            cls.__setattr__(self, name, value)

        _recording_classes[cls] = type(cls.__name__, (cls,), {
            "__getattribute__": __getattribute__, "__setattr__": __setattr__, "__module__": cls.__module__,
            "__qualname__": cls.__qualname__})
    return _recording_classes[cls]


def _is_leaf(tracer: fx.Tracer, m: nn.Module, qualname: str) -> bool:
    return isinstance(m, _LEAVES) or fx.Tracer.is_leaf_module(tracer, m, qualname)


class _Tracer(fx.Tracer):
    """Leaves: pydlx's modules, torch's recurrent modules and torch.nn's own (fx's rule), decided before the trace
    switches the traced modules' classes."""

    def __init__(self, leaves: set):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self.leaves


def traced_modules(model: nn.Module) -> Tuple[Dict[str, nn.Module], set]:
    """(fqn -> module for the modules a trace runs the forward of, ids of the leaf modules it calls as is)."""
    probe = fx.Tracer()
    traced, leaves = {}, set()

    def walk(m, fqn):
        if fqn and _is_leaf(probe, m, fqn):
            leaves.add(id(m))
            return
        if id(m) in {id(t) for t in traced.values()}:
            return
        traced[fqn] = m
        for name, child in m.named_children():
            walk(child, f"{fqn}.{name}" if fqn else name)

    walk(model, "")
    return traced, leaves


def _forward_parameters(cls: type) -> Tuple[Optional[str], List[str], Dict[str, object]]:
    """(why the forward's signature cannot be traced or None, its parameter names after self, {name: default} of
    its optional parameters)."""
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError) as e:
        return f"forward's signature cannot be read ({e})", [], {}
    if {p.kind for p in params} - {inspect.Parameter.POSITIONAL_OR_KEYWORD}:
        return "forward takes *args, **kwargs or keyword-only parameters", [], {}
    return None, [p.name for p in params], {p.name: p.default for p in params
                                            if p.default is not inspect.Parameter.empty}


def trace(model: nn.Module, at_default: Tuple[str, ...] = ()) -> Tuple[fx.Graph, list]:
    """(graph, guards) of ``model``'s forward with the optional parameters in ``at_default`` fixed at their
    defaults (the others traced as inputs); raises TraceFailed."""
    why, _, defaults = _forward_parameters(type(model))
    if why:
        raise TraceFailed(why, [])
    traced, leaves = traced_modules(model)
    hooked = [fqn for fqn, m in traced.items() if fqn and (m._forward_hooks or m._forward_pre_hooks)]
    recorder = _Recorder({id(m): fqn for fqn, m in traced.items()})
    # which modules were traced through, and whether they have hooks, are guards too
    module_guards = [(fqn, None, _Same(m)) for fqn, m in traced.items() if fqn]
    hook_guards = [(fqn, _HOOKS, has_hooks(m)) for fqn, m in traced.items() if fqn]
    if hooked:
        raise TraceFailed(f"forward hooks on {', '.join(hooked)} (they would run on the trace's proxies)",
                          module_guards + hook_guards)
    classes = {fqn: type(m) for fqn, m in traced.items()}
    _recording.append(recorder)
    try:
        for m in traced.values():
            m.__class__ = _recording_class(type(m))
        graph = _Tracer(leaves).trace(model, concrete_args={n: defaults[n] for n in at_default} or None)
    except _Assigns as e:  # (before it happens: the trace leaves the model as it was)
        raise TraceFailed(f"forward assigns attributes ({e})", module_guards + hook_guards + recorder.guards())
    except Exception as e:  # data-dependent control flow, unsupported calls, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TraceFailed(f"{type(e).__name__}: {msg[:200]}", module_guards + hook_guards + recorder.guards())
    finally:
        _recording.pop()
        for fqn, m in traced.items():
            m.__class__ = classes[fqn]
    return graph, module_guards + hook_guards + recorder.guards()


# ----------------------------------------------------------------------------------------------- guards
_HOOKS = object()  # guard name: whether the module has hooks (has_hooks)


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def has_hooks(m: Optional[nn.Module]) -> bool:
    """Whether ``m`` has forward (pre-)hooks or module backward hooks (``_HOOK_DICTS``): they fire only where ``m``
    itself is called, so a module that has them is never absorbed into a fused op (it runs as written)."""
    return m is not None and any(getattr(m, d) for d in _HOOK_DICTS)


class _Same:
    """A guard value compared by identity (module objects, functions, other objects)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Same) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


def _snapshot(value):
    """A comparable copy of an attribute's value: simple values as they are, lists/tuples/dicts item by item (so
    an in-place change is seen), anything else by identity."""
    if isinstance(value, _SIMPLE):
        return value
    if type(value) in (list, tuple):
        return (type(value), tuple(_snapshot(v) for v in value))
    if type(value) is dict:
        return (dict, tuple((k, _snapshot(v)) for k, v in value.items()))
    return _Same(value)


def _resolve(model: nn.Module, path: str):
    m = model
    for part in path.split(".") if path else ():
        m = m._modules.get(part) if part in m._modules else getattr(m, part, None)
        if m is None:
            return None
    return m


def guards_hold(model: nn.Module, guards: list) -> bool:
    for path, name, want in guards:
        m = _resolve(model, path)
        if name is None:
            got = _Same(m)
        elif name is _HOOKS:
            got = has_hooks(m)
        else:
            got = _snapshot(getattr(m, name, _MISSING)) if m is not None else _MISSING
        if got != want:
            return False
    return True


_MISSING = object()


def compile_guards(guards: list) -> Callable[[nn.Module], bool]:
    """``guards_hold(model, guards)`` as one generated straight-line function, made once per specialisation: each
    module path resolved once (shared prefixes too), each guard one comparison, no loop over the list, no string
    split -- the check every forward of an optimized model runs before its fused code. Where the generated code
    meets anything unexpected (a path that no longer resolves to a module), the generic ``guards_hold`` decides."""
    lines = ["def check(model):", "    try:"]
    names: Dict[str, str] = {"": "model"}
    env: Dict[str, object] = {"MISSING": _MISSING, "snapshot": _snapshot}

    def module(path: str) -> str:
        if path in names:
            return names[path]
        parent, _, part = path.rpartition(".")
        p = module(parent)
        var = names[path] = f"m{len(names)}"
        lines.append(f"        d = {p}._modules")
        lines.append(f"        {var} = d[{part!r}] if {part!r} in d else getattr({p}, {part!r}, None)")
        return var

    for i, (path, name, want) in enumerate(guards):
        m = module(path)
        env[f"w{i}"] = want
        if name is None:  # want: _Same(the module object)
            lines.append(f"        if {m} is not w{i}.obj: return False")
        elif name is _HOOKS:
            hooks = " or ".join(f"{m}.{d}" for d in _HOOK_DICTS)  # (has_hooks, written out: no call per guard)
            lines.append(f"        if ({m} is not None and bool({hooks})) != w{i}: return False")
        else:
            lines.append(f"        v = getattr({m}, {name!r}, MISSING) if {m} is not None else MISSING")
            lines.append(f"        if v is not w{i} and snapshot(v) != w{i}: return False")
    lines += ["        return True", "    except Exception:", "        return guards_hold(model, guards)"]
    env.update(guards_hold=guards_hold, guards=guards)
    exec(compile("\n".join(lines), "<pydlx guards>", "exec"), env)  # noqa: S102  (code made from the guards above)
    return env["check"]


def describe_guards(guards: list) -> str:
    names = [f"self.{p + '.' if p else ''}{n}" for p, n, _ in guards if isinstance(n, str)]
    return ", ".join(names)


# ----------------------------------------------------------------------------------------------- patterns
def _activation(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[str]:
    """pydlx's activation spec for what ``node`` computes from its first argument alone, if pydlx fuses it, else
    None."""
    spec = _activation_spec(node, modules)
    return spec if spec is not None and activation_refused(spec) is None else None


def _activation_spec(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[str]:
    """pydlx's activation spec for what ``node`` computes from its first argument alone (parameters that the fused
    ops refuse included: ``activation_refused`` says why), else None: the spellings of pydlx/activations.py's
    table."""
    if node.op == "call_module":
        return module_spec(modules[node.target])
    if node.op == "call_function" and node.args:
        return function_spec(node.target, node.args[1:], node.kwargs)
    if node.op == "call_method" and not node.kwargs:
        return method_spec(node.target, len(node.args) - 1)
    return None


def _max_pool(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[nn.MaxPool2d]:
    """The MaxPool2d that ``node`` applies to its first argument, else None."""
    if node.op == "call_module" and type(modules[node.target]) is nn.MaxPool2d:
        return modules[node.target]
    if node.op == "call_function" and node.target is F.max_pool2d:
        names = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
        args = dict(zip(names, node.args), **node.kwargs)
        if any(isinstance(v, fx.Node) for k, v in args.items() if k != "input"):
            return None
        args.pop("input", None)
        return nn.MaxPool2d(**args)
    return None


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 and users[0].args and users[0].args[0] is node else None


def _module_input(node: fx.Node):
    """The input of a call_module node of a Conv2d or Linear (positional or ``input=``), else None."""
    if len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    if not node.args and set(node.kwargs) == {"input"}:
        return node.kwargs["input"]
    return None


def _linear_chains(graph: fx.Graph, modules, calls, allowed: Allowed):
    """Runs ``Linear -> act -> Linear [-> act ...] [-> last act]`` in forward code, one hidden activation, every
    Linear called once: [(linear nodes, act nodes, hidden act, last act node or None, last act)]."""
    def single_linear(node):
        return (node is not None and node.op == "call_module" and type(modules.get(node.target)) is nn.Linear
                and len(calls[node.target]) == 1 and _module_input(node) is not None and allowed(node.target))

    chains, used = [], set()
    for node in graph.nodes:
        if node in used or not single_linear(node):
            continue
        linears, acts, hidden, cur = [node], [], None, node
        while True:
            act_node = _only_user(cur)
            act = _activation(act_node, modules) if act_node is not None else None
            nxt = _only_user(act_node) if act is not None else None
            if act is None or not single_linear(nxt) or (hidden is not None and act != hidden):
                break
            hidden = act
            acts.append(act_node)
            linears.append(nxt)
            cur = nxt
        if len(linears) < 2:
            continue
        last_node = _only_user(linears[-1])
        last = _activation(last_node, modules) if last_node is not None else None
        chains.append((linears, acts, hidden, last_node if last else None, last))
        used.update(linears)
    return chains


def _batchnorm(node: fx.Node, mod: nn.Module, modules) -> Optional[Tuple[fx.Node, str, nn.Module]]:
    """(node, fqn, module) of the BatchNorm that is ``node``'s only user: BatchNorm2d after a Conv2d, BatchNorm1d
    after a Linear, over the module's output channels; else None."""
    user = _only_user(node)
    if user is None or user.op != "call_module" or len(user.args) != 1 or user.kwargs:
        return None
    bn = modules.get(user.target)
    want, width = (nn.BatchNorm2d, mod.out_channels) if type(mod) is nn.Conv2d else (nn.BatchNorm1d,
                                                                                     mod.out_features)
    return (user, user.target, bn) if type(bn) is want and bn.num_features == width else None


def _why_not_folded(bn: nn.Module) -> Optional[str]:
    """Why the BatchNorm after a Conv2d / Linear stays eager, or None. In training mode it joins the layer's op all
    the same (batch statistics, the layer's output recomputed in backward: the ops' training forms)."""
    if not bn.track_running_stats or bn.running_mean is None:
        return "track_running_stats=False (batch statistics in eval too)"
    return None


def _bn_training_kwargs(graph: fx.Graph, fqn: str) -> dict:
    """The training form's extra arguments: the BatchNorm's momentum (read from the module at every call) and its
    num_batches_tracked buffer. (The BatchNorm's mode is a guard: the other mode is another specialisation.)"""
    return dict(training=True, momentum=graph.call_function(getattr, (graph.get_attr(fqn), "momentum")),
                num_batches_tracked=graph.get_attr(f"{fqn}.num_batches_tracked"))


def _bn_params(graph: fx.Graph, fqn: str, bn: nn.Module):
    """get_attr nodes of the BatchNorm's running stats and affine parameters, read at every call."""
    return (graph.get_attr(f"{fqn}.running_mean"), graph.get_attr(f"{fqn}.running_var"),
            graph.get_attr(f"{fqn}.weight") if bn.affine else None, graph.get_attr(f"{fqn}.bias") if bn.affine else None,
            bn.eps)


def _params(graph: fx.Graph, fqn: str, mod: nn.Module):
    return graph.get_attr(f"{fqn}.weight"), graph.get_attr(f"{fqn}.bias") if mod.bias is not None else None


def _mlp_apply(graph: fx.Graph, modules, linears, acts, hidden, last_node, last):
    """Replace the chain by one pydlx.ops.mlp call over the Linear modules' own parameters."""
    from .ops.mlp import mlp

    first = linears[0]
    with graph.inserting_before(first):
        wbs = [_params(graph, n.target, modules[n.target]) for n in linears]
        new = graph.call_function(mlp, (_module_input(first), [w for w, _ in wbs], [b for _, b in wbs]),
                                  {"activation": hidden, "last_activation": last})
    tail = last_node if last_node is not None else linears[-1]
    tail.replace_all_uses_with(new)
    doomed = [last_node] if last_node is not None else []
    for i in reversed(range(len(linears))):  # from the tail back: each node's users are gone before it
        doomed += [linears[i]] + ([acts[i - 1]] if i > 0 else [])
    for n in doomed:
        graph.erase_node(n)


def _conv_match(node: fx.Node, mod: nn.Module, first: list, bn, modules):
    """(node, chain nodes, pool, activation spec, bn, why the pool after it stays eager or None) for one call of a
    Conv2d whose output (after ``first``: the eval-mode BatchNorm, if any) goes through an activation, then maybe a
    MaxPool2d (only after a non-decreasing activation: max commutes with it); or through a MaxPool2d then a
    non-decreasing activation (MNIST-style ``F.relu(F.max_pool2d(conv(x), 2))``); or a BatchNorm alone (the
    folded conv). None: no pattern."""
    head = first[-1] if first else node
    a = _only_user(head)
    act = _activation(a, modules) if a is not None else None
    if act is not None:
        b = _only_user(a) if is_monotone(act) else None
        pool = _max_pool(b, modules) if b is not None else None
        dropped = conv_unsupported(mod, pool) if pool is not None and conv_unsupported(mod) is None else None
        if dropped is not None:
            pool = None  # a pool the kernel does not take stays eager; the conv and its activation still fuse
        return (node, first + [a] + ([b] if pool is not None else []), pool, act, bn, dropped)
    pool = _max_pool(a, modules) if a is not None else None
    if pool is not None:
        b = _only_user(a)
        act = _activation(b, modules) if b is not None else None
        if is_monotone(act):
            return (node, first + [a, b], pool, act, bn, None)
    return (node, first, None, None, bn, None) if bn is not None else None


def _pool_words(pool: nn.MaxPool2d) -> str:
    k, p = _pair(pool.kernel_size), _pair(pool.padding)
    st = _pair(pool.stride) if pool.stride is not None else k
    one = lambda v: v[0] if v[0] == v[1] else v  # noqa: E731
    return (f"MaxPool2d({one(k)}, {one(st)}" + (f", padding={one(p)}" if p != (0, 0) else "")
            + (", ceil_mode=True" if pool.ceil_mode else "") + ")")


def _conv_op(pool, act: Optional[str], bn) -> str:
    """The pydlx op a conv match becomes: conv_relu_pool2d for the classic block, else the general forms."""
    if bn is not None:
        return "conv_bn_act_pool2d"
    return "conv_relu_pool2d" if act == "relu" and pool is not None else "conv_act_pool2d"


def _single_apply(graph: fx.Graph, fqn: str, mod: nn.Module, matches) -> None:
    """Each call of ``mod`` (and the eval-mode BatchNorm after it, folded) and the activation (and pool) after it
    become one pydlx op call."""
    from .ops import conv_relu_pool as conv_ops
    from .ops.linear import linear, linear_batchnorm

    for node, chain, pool, act, bn, *_ in matches:
        with graph.inserting_before(node):
            w, b = _params(graph, fqn, mod)
            x = _module_input(node)
            bnp = _bn_params(graph, bn[1], bn[2]) if bn is not None else None
            if type(mod) is nn.Conv2d:
                op = _conv_op(pool, act, bn)
                kw = fused_args(mod, pool)
                if op != "conv_relu_pool2d":
                    kw["activation"] = act
                if bn is not None and bn[2].training:
                    kw.update(_bn_training_kwargs(graph, bn[1]))
                new = graph.call_function(getattr(conv_ops, op), (x, w, b, *(bnp or ())), kw)
            elif bn is not None:
                kw = _bn_training_kwargs(graph, bn[1]) if bn[2].training else {}
                new = graph.call_function(linear_batchnorm, (x, w, b, *bnp), {"activation": act, **kw})
            else:
                new = graph.call_function(linear, (x, w, b), {"activation": act})
        (chain[-1] if chain else node).replace_all_uses_with(new)
        for n in reversed([node, *chain]):  # users before producers
            graph.erase_node(n)


def plan(graph: fx.Graph, model: nn.Module, allowed: Allowed, guards: Optional[list] = None
         ) -> List[Tuple[Block, Callable[[], None]]]:
    """(block, apply) for each functional candidate in ``graph`` (pydlx/_plan.py ``Block``: fused, or kept with the
    reason; module fqns relative to ``model``); ``apply`` rewrites the graph only. The mode of every BatchNorm that
    decided a match goes into ``guards``."""
    guards = guards if guards is not None else []
    modules = dict(model.named_modules())
    calls: Dict[str, List[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and type(modules.get(node.target)) in (nn.Conv2d, nn.Linear):
            calls.setdefault(node.target, []).append(node)
    found = []

    def hooked(nodes) -> Optional[str]:
        """Why a candidate over ``nodes`` runs as written: a module among them has hooks (None: none has). Each
        module's hooks become a guard either way, so that a hook added or removed later makes a new plan."""
        why = None
        for n in nodes:
            if n is not None and n.op == "call_module":
                h = has_hooks(modules.get(n.target))
                guards.append((n.target, _HOOKS, h))
                if h and why is None:
                    why = f"{n.target} has hooks: it runs as written, so that they fire"
        return why

    for linears, acts, hidden, last_node, last in _linear_chains(graph, modules, calls, allowed):
        mods = [modules[n.target] for n in linears]
        sizes = [mods[0].in_features] + [m.out_features for m in mods]
        one = fuses_in_one_kernel(sizes)
        block = Block(tuple(n.target for n in linears), ("MLP",), "forward", "pydlx.ops.mlp",
                      "mlp" if one else "linear", (("sizes", sizes), ("activation", hidden), ("last_activation", last)),
                      reason=hooked(linears + acts + [last_node]), detail="over the Linears' own parameters, " + ("one fused kernel on GPUs" if one else
                                                                     "a chain of fused Linear GEMMs: a layer is "
                                                                     "wider than 128"))
        found.append((block, lambda c=(linears, acts, hidden, last_node, last): _mlp_apply(graph, modules, *c)))
        for n in linears:
            del calls[n.target]
    for fqn, nodes in calls.items():
        mod = modules[fqn]
        matches, bn_why = [], None
        for node in nodes:
            bn = _batchnorm(node, mod, modules) if _module_input(node) is not None else None
            head = node
            if bn is not None:
                guards.append((bn[1], "training", bn[2].training))  # (a leaf: its mode is read at run time)
                bn_why = _why_not_folded(bn[2])
                head = bn[0]
            first = [bn[0]] if bn is not None else []
            if _module_input(node) is None:
                matches.append(None)
                continue
            if type(mod) is nn.Conv2d:
                matches.append(_conv_match(node, mod, first, bn, modules))
                continue
            act_node = _only_user(head)
            act = _activation(act_node, modules) if act_node is not None else None
            if act is not None:
                matches.append((node, first + [act_node], None, act, bn))
            elif act_node is not None and _activation_spec(act_node, modules) is not None:  # one the ops refuse
                matches.append((node, first + [act_node], None, _activation_spec(act_node, modules), bn))
            else:  # Linear -> BatchNorm1d with no activation after it: the folded Linear alone
                matches.append((node, first, None, None, bn) if bn is not None else None)
        if not any(matches):
            continue
        bns = {m[4][1] for m in matches if m is not None and m[4] is not None}
        m0 = next(m for m in matches if m is not None)
        conv = type(mod) is nn.Conv2d
        bn_mod = m0[4][2] if m0[4] else None
        chain = ((("Conv2d",) if conv else ("Linear",)) + ((type(bn_mod).__name__,) if bn_mod is not None else ())
                 + ((m0[3],) if m0[3] else ()) + (("MaxPool2d",) if conv and m0[2] is not None else ()))
        why = None
        if bn_why is not None:
            why = f"BatchNorm {', '.join(sorted(bns))} {bn_why}"
        elif len({m[4][1] if m is not None and m[4] is not None else None for m in matches}) > 1:
            why = f"{fqn}'s calls are followed by different BatchNorms"
        elif not all(matches):
            why = f"{fqn} is called {len(nodes)} times and not every call is followed by the pattern"
        elif conv:
            variants = {(m[3], _pool_words(m[2]) if m[2] is not None else None) for m in matches}
            why = conv_unsupported(mod, m0[2]) or (
                None if len(variants) == 1 else f"{fqn}'s calls use different activations or pools")
        elif len({m[3] for m in matches}) != 1:
            why = f"{fqn}'s calls use different activations"
        elif matches[0][3] is not None and activation_refused(matches[0][3]):
            why = activation_refused(matches[0][3])
        if why is None and not (allowed(fqn) and all(allowed(b) for b in bns)):
            why = "excluded by filter_fn"
        hooks_why = hooked([n for m in matches if m is not None for n in [m[0], *m[1]]])
        why = why or hooks_why
        bn_mode = None if bn_mod is None else ("training" if bn_mod.training else "folded")
        if conv:
            pool = m0[2]
            args = tuple(fused_args(mod, pool).items()) if conv_unsupported(mod) is None else ()
            op = f"pydlx.ops.{_conv_op(pool, m0[3], m0[4])}"
            if op != "pydlx.ops.conv_relu_pool2d":
                args += (("activation", m0[3]),)
            detail = f"the MaxPool2d after it runs eagerly ({m0[5]})" if m0[5] else None
            family = "conv_relu_pool"
        else:
            op = "pydlx.ops.linear_batchnorm" if m0[4] is not None else "pydlx.ops.linear"
            args, detail, family = (("activation", matches[0][3]),), None, "linear"
            if not all(matches):
                op, args = None, ()
        if bn_mode == "training":
            layer = "conv" if conv else "Linear"
            detail = "; ".join(filter(None, [f"BatchNorm in training mode: batch statistics, the {layer}'s output "
                                             "recomputed in backward", detail]))
        found.append((Block((fqn,), chain, "forward", op, family, args, why, bn_mode, detail),
                      lambda fqn=fqn, mod=mod, m=matches: _single_apply(graph, fqn, mod, m)))
    return found


# ----------------------------------------------------------------------------------------------- made on the device
# constructors whose values do not depend on the device they run on (random ones do: another generator)
_CONSTRUCTORS = (torch.zeros, torch.ones, torch.empty, torch.full)


def _moved_to(node: fx.Node):
    """The device of a ``.to(...)`` call when the graph says it is one -- ``.to(t.device)`` or a device constant,
    positional or ``device=``, and nothing else -- as a getattr node or a torch.device; else None."""
    if node.op != "call_method" or node.target != "to":
        return None
    if len(node.args) == 2 and not node.kwargs:
        dev = node.args[1]
    elif len(node.args) == 1 and set(node.kwargs) == {"device"}:
        dev = node.kwargs["device"]
    else:
        return None
    if isinstance(dev, fx.Node):
        ok = dev.op == "call_function" and dev.target is getattr and len(dev.args) == 2 and dev.args[1] == "device"
        return dev if ok and isinstance(dev.args[0], fx.Node) else None
    if isinstance(dev, str):
        try:
            return torch.device(dev)
        except RuntimeError:
            return None
    return dev if isinstance(dev, torch.device) else None


def construct_on_device(graph: fx.Graph) -> List[str]:
    """Rewrite ``torch.zeros(...).to(t.device)`` (also ones, empty and full; a device constant too) into
    ``torch.zeros(..., device=t.device)``: the values are the same, made where they are used, without the copy
    from the CPU and the wait for it at every call -- which a CUDA graph cannot capture. Only where the tensor has
    no other use and the constructor names no device, no ``requires_grad`` (a copy is no leaf) nor anything but a
    ``dtype``. Returns what was rewritten, one ``torch.<name>(...).to(...)`` each."""
    done = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _CONSTRUCTORS or set(node.kwargs) - {"dtype"}:
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].args[:1] != (node,) or node in users[0].args[1:]:
            continue
        to = users[0]
        dev = _moved_to(to)
        if dev is None:
            continue
        if isinstance(dev, fx.Node):
            order = {n: i for i, n in enumerate(graph.nodes)}
            src = dev.args[0]
            if order[src] > order[node]:
                continue  # (the tensor whose device it is comes later: left as written)
            if order[dev] > order[node]:
                if len(dev.users) == 1:
                    node.prepend(dev)  # ``x.device`` read before the constructor, not after it
                else:
                    with graph.inserting_before(node):
                        dev = graph.call_function(getattr, (src, "device"))
        node.kwargs = {**node.kwargs, "device": dev}
        to.replace_all_uses_with(node)
        graph.erase_node(to)
        where = f"{dev.args[0].name}.device" if isinstance(dev, fx.Node) else repr(str(dev))
        done.append(f"torch.{node.target.__name__}(...).to({where})")
    return done


# ----------------------------------------------------------------------------------------------- fused forward
_counter = itertools.count()


def compile_graph(graph: fx.Graph, name: str) -> Callable:
    """The graph as a Python function ``forward(self, ...)`` over the model itself (the generated code reads
    ``self.<module>`` and ``self.<module>.weight`` as a GraphModule's does)."""
    graph.lint()
    code = graph.python_code(root_module="self")
    filename = f"<pydlx fused {name}.forward #{next(_counter)}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102  (code generated by torch.fx)
    return namespace["forward"]


class Specialisation:
    """One fused forward (or None: run the model's own) and the guards under which it is right."""

    def __init__(self, at_default: Tuple[str, ...], guards: list, fn: Optional[Callable], fused: List[str],
                 why: Optional[str], graph: Optional[fx.Graph] = None, moved: Tuple[str, ...] = ()):
        self.at_default, self.guards, self.fn, self.fused, self.why = at_default, guards, fn, fused, why
        self.graph = graph  # the fused graph (for explain and the tests)
        self.holds = compile_guards(guards)  # holds(model): whether the guards hold
        self.moved = moved  # the tensors made on the device rather than copied there (construct_on_device)


class FxState:
    """What a fused model keeps: its original class, which modules may be fused, and its specialisations."""

    def __init__(self, base: type, allowed: frozenset):
        self.base, self.allowed = base, allowed
        _, self.names, self.optional = _forward_parameters(base)
        self.specs: List[Specialisation] = []
        self.last: Optional[Specialisation] = None

    def __getstate__(self):  # specialisations hold module objects and generated code: re-traced after a copy
        return {"base": self.base, "allowed": self.allowed}

    def __setstate__(self, state):
        self.__init__(state["base"], state["allowed"])

    def at_default(self, model, args, kwargs) -> Tuple[str, ...]:
        """The optional parameters this call leaves at their defaults (passing the default itself counts)."""
        if not self.optional:
            return ()
        given = dict(zip(self.names, args))
        given.update(kwargs)
        return tuple(n for n, d in self.optional.items() if n not in given or given[n] is d)

    def positional(self, args, kwargs) -> Optional[tuple]:
        """The call's arguments in the forward's parameter order (defaults filled in), or None if it is not a
        valid call of the forward."""
        if any(k not in self.names[len(args):] for k in kwargs):
            return None
        out = list(args)
        for name in self.names[len(args):]:
            if name in kwargs:
                out.append(kwargs[name])
            elif name in self.optional:
                out.append(self.optional[name])
            else:
                return None
        return tuple(out)

    def lookup(self, model: nn.Module, args=(), kwargs=None) -> Specialisation:
        """The specialisation a call of ``model`` with these arguments runs (made now if there is none)."""
        at_default = self.at_default(model, args, kwargs or {})
        # the common call: the same specialisation as the previous one. Not under torch.compile: the graph would be
        # guarded on which one that was, and the trace's own update of it would recompile the next call
        compiling = torch.compiler.is_compiling()
        last = None if compiling else self.last
        if last is not None and last.at_default == at_default and last.holds(model):
            return last
        for s in self.specs:
            if s is not last and s.at_default == at_default and s.holds(model):
                if not compiling:
                    self.last = s
                return s
        spec = self.specialise(model, at_default)
        if spec in self.specs and not compiling:  # (past MAX_SPECIALISATIONS a guardless unfused one: never the
            self.last = spec                      # shortcut)
        return spec

    def select(self, model: nn.Module, args, kwargs) -> Callable:
        return self.lookup(model, args, kwargs).fn or self.base.forward

    @torch.compiler.disable
    def specialise(self, model: nn.Module, at_default: Tuple[str, ...]) -> Specialisation:
        if len(self.specs) >= MAX_SPECIALISATIONS:
            return Specialisation(at_default, [], None, [], f"more than {MAX_SPECIALISATIONS} specialisations")
        spec = build(model, self.base, at_default, lambda fqn: fqn in self.allowed)
        self.specs.append(spec)
        return spec


@contextlib.contextmanager
def _as(model: nn.Module, cls: type):
    """``model`` seen as an instance of ``cls`` for the duration (tracing runs the original forward)."""
    prev = model.__class__
    model.__class__ = cls
    try:
        yield
    finally:
        model.__class__ = prev


def build(model: nn.Module, base: type, at_default: Tuple[str, ...], allowed: Allowed) -> Specialisation:
    """Trace ``model`` (as a ``base``) now, fuse what ``allowed`` permits; the specialisation for its current
    attribute values."""
    with _as(model, base):
        try:
            graph, guards = trace(model, at_default)
        except TraceFailed as e:
            return Specialisation(at_default, e.guards, None, [], e.why)
        found_guards: list = []
        todo = [(", ".join(b.modules), apply) for b, apply in plan(graph, model, allowed, found_guards) if b.fused]
        guards = guards + [(p, n, _snapshot(v)) for p, n, v in found_guards]
    for _, apply in todo:
        apply()
    moved = tuple(construct_on_device(graph)) if allowed("") else ()
    changed = bool(todo or moved)
    fn = compile_graph(graph, base.__qualname__) if changed else None
    return Specialisation(at_default, guards, fn, [fqn for fqn, _ in todo], None, graph if changed else None, moved)


class FusedForward:
    """Mixed into a fused model's class (first in its MRO): ``forward`` runs the fused code that matches the
    model's current attributes and arguments. Pickling and copying go through the original class."""

    def forward(self, *args, **kwargs):
        state = self._pydlx_fx
        fn = state.select(self, args, kwargs)
        if kwargs and fn is not state.base.forward:  # the generated code may rename parameters: pass by position
            ordered = state.positional(args, kwargs)
            if ordered is None:  # a call the forward itself refuses (unknown or missing argument): let it say so
                return state.base.forward(self, *args, **kwargs)
            return fn(self, *ordered)
        return fn(self, *args, **kwargs)

    def __reduce_ex__(self, protocol):
        state = self._pydlx_fx
        plain = state.base.__new__(state.base)
        plain.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_pydlx_fx"})
        return _refuse, (plain, state)


_fused_classes: Dict[type, type] = {}


def fused_class(base: type) -> type:
    """The fused subclass of ``base``: its ``forward`` runs FusedForward's and shows ``base.forward``'s name,
    docstring and signature (``inspect.signature``), so torch.export's ``dynamic_shapes``, ONNX input names and
    anything else that reads the signature sees the original model's."""
    if base not in _fused_classes:
        def forward(self, *args, **kwargs):
            return FusedForward.forward(self, *args, **kwargs)
        functools.update_wrapper(forward, base.forward)
        forward.__qualname__ = f"{base.__qualname__}.forward"
        _fused_classes[base] = type(base.__name__, (FusedForward, base), {
            "__module__": base.__module__, "__qualname__": base.__qualname__,
            "__doc__": base.__doc__, "_pydlx_base": base, "forward": forward})
    return _fused_classes[base]


def _refuse(plain: nn.Module, state: FxState) -> nn.Module:
    """Unpickling / deepcopy: the model again with its fused class (specialisations re-traced on first use)."""
    plain.__dict__["_pydlx_fx"] = state
    plain.__class__ = fused_class(state.base)
    return plain


def install(model: nn.Module, allowed_fqns: frozenset) -> List[Specialisation]:
    """Fuse ``model``'s forward code in place (its class becomes the fused subclass) if a trace in the current
    training mode, or in the other one, fuses anything or makes a tensor on the device (``construct_on_device``);
    returns the specialisations made."""
    base = type(model)
    if isinstance(model, FusedForward):
        return []
    state = FxState(base, allowed_fqns)
    first = build(model, base, tuple(state.optional), lambda fqn: fqn in allowed_fqns)
    specs = [first]
    if any(name == "training" for _, name, _ in first.guards):  # ready for .eval() / .train() as well
        modes = {id(m): m.training for m in model.modules()}
        model.train(not model.training)
        try:
            specs.append(build(model, base, tuple(state.optional), lambda fqn: fqn in allowed_fqns))
        finally:
            for m in model.modules():
                m.training = modes[id(m)]
    if not any(s.fused or s.moved for s in specs):
        return specs
    state.specs = specs
    model.__dict__["_pydlx_fx"] = state
    model.__class__ = fused_class(base)
    return specs


def uninstall(model: nn.Module) -> None:
    """``install`` undone: ``model`` (if its forward code is fused) back to its own class and forward."""
    if isinstance(model, FusedForward):
        model.__class__ = model.__dict__.pop("_pydlx_fx").base


def relative(allowed_fqns: frozenset, prefix: str) -> frozenset:
    """The fqns in ``allowed_fqns`` (from the model's root; "": the model itself) as seen from the module at
    ``prefix``: its descendants', and "" if it is allowed itself (its own forward code may be rewritten)."""
    if not prefix:
        return frozenset(allowed_fqns)
    return frozenset([f[len(prefix) + 1:] for f in allowed_fqns if f.startswith(prefix + ".")]
                     + ([""] if prefix in allowed_fqns else []))


def install_tree(model: nn.Module, allowed_fqns: frozenset, prefix: str = "") -> List[str]:
    """``install`` on ``model``; where its forward cannot be traced in either mode (data-dependent control flow,
    ``len(x)``, ...), on each of its submodules instead, recursively (their forwards may trace even when the parent's
    does not). Returns the fqns of the modules whose forward code is now fused."""
    specs = install(model, relative(allowed_fqns, prefix))
    if isinstance(model, FusedForward):
        return [prefix or "(model)"]
    if not specs or not all(s.why for s in specs):  # traced (nothing to fuse in it, children included), or fused
        return []
    done, probe = [], fx.Tracer()
    for name, child in model.named_children():
        fqn = f"{prefix}.{name}" if prefix else name
        if not _is_leaf(probe, child, fqn):
            done += install_tree(child, allowed_fqns, fqn)
    return done


def current(model: nn.Module, *args, **kwargs) -> Optional[Specialisation]:
    """The specialisation a call ``model(*args, **kwargs)`` would run now, or None for a model whose forward code
    is not fused."""
    state = model.__dict__.get("_pydlx_fx")
    return state.lookup(model, args, kwargs) if state is not None else None
