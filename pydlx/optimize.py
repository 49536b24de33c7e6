"""``pydlx.optimize(model)`` and ``pydlx.explain(model)``: swap fused layers into an existing model.

What is swapped today (the families of later issues add their patterns here):
  * an ``nn.Sequential`` made only of Linear layers and one kind of fusable activation (``Linear, act, ...,
    Linear[, act]``, the seed autoencoder's encoder and decoder) becomes ``pydlx.nn.MLP.from_sequential`` of it:
    the same modules under the same names, computed by one ``pydlx.ops.mlp`` call;
  * otherwise, an ``nn.Linear`` followed inside an ``nn.Sequential`` by an activation module (ReLU, GELU, SiLU,
    Tanh, Sigmoid, LeakyReLU, ELU, Hardswish, Hardsigmoid, Mish, ReLU6) becomes ``pydlx.nn.Linear(activation=...)``
    sharing the same parameters, and the activation module becomes ``nn.Identity`` (a LeakyReLU with a negative
    slope or an ELU with alpha <= 0 is kept, and ``explain`` says why);
  * an ``nn.Conv2d, nn.ReLU, nn.MaxPool2d`` run inside an ``nn.Sequential`` becomes ``pydlx.nn.ConvReLUPool2d``
    over the conv's own parameters at the conv's place, the ReLU and pool becoming ``nn.Identity`` (padded and
    ceil-mode pools included); unsupported options (groups, dilation, non-square kernels, ...) are kept as they are
    and ``explain`` says why;
  * every ``nn.LSTM`` / ``nn.LSTMCell`` anywhere in the tree becomes ``pydlx.nn.LSTM`` / ``pydlx.nn.LSTMCell``
    over the same parameters.
  * chains written in the forward code rather than as modules (``self.pool(F.relu(self.conv1(x)))``,
    ``F.relu(self.fc1(x))``, ``fc2(F.relu(fc1(x)))`` as one ``pydlx.ops.mlp`` call, ``torch.relu`` / ``F.gelu`` /
    ``x.relu()`` / ``ReLU(True)`` modules called from forward): found by tracing the forward with torch.fx
    (pydlx/_fx_fuse.py) and run as pydlx op calls over the modules' own parameters, the model keeping its class
    (a subclass of it), modules and attributes; the fused code is kept per value of what the forward read
    (``self.training``, other attributes, optional arguments) and traced again when those change. Where the
    forward cannot be traced the module swaps above still apply, the forward runs as written, and ``explain``
    says why.
  * in traced forward code, a ``torch.zeros(...).to(x.device)`` (ones, empty, full: the tutorial RNN's initial
    states) is made on the device instead: the same values without a host-to-device copy and wait at every call,
    which CUDA graph capture refuses (``_fx_fuse.construct_on_device``); ``explain`` notes it.
Parameter names, and so the state_dict, are unchanged. The walk is explicit (setattr on the parent); nothing
global is patched. ``plan(model)`` returns what optimize would do as data (pydlx/_plan.py: blocks fused and kept,
with the reason, and notes), which ``optimize`` applies and ``explain`` renders.
"""
from __future__ import annotations

import contextvars
import copy
import dataclasses
from typing import Callable, List, Optional, Tuple

import torch
from torch import fx, nn

from . import _fx_fuse, _measure, _policy
from ._plan import Block, Note, Plan
from .nn.conv_relu_pool import ConvReLUPool2d, _square, fused_args, unsupported as conv_unsupported
from .nn.linear import Linear
from .nn.lstm import LSTM, LSTMCell
from .nn.mlp import MLP, _pattern_error, activation_name, not_fused_reason
from .reference.mlp import fuses_in_one_kernel

Filter = Optional[Callable[[nn.Module, str], bool]]


_PLAIN_PARAMS = (torch.Tensor, nn.Parameter)
# a module's state_dict / load_state_dict hooks: a swap would drop them with the module (the forward-code pass keeps
# the module objects, and so their hooks)
_STATE_HOOK_DICTS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks")


def _hooked(*modules: nn.Module) -> Optional[str]:
    """Why modules a swap would replace stay as they are: one of them has hooks (forward, forward-pre or module
    backward hooks fire only where the module itself is called), or parameters of a tensor subclass (DTensor: FSDP2
    or tensor parallelism manage them on that module object, swapping in the unsharded ones there before each
    forward, so a new module holding them would compute on the shards); None if neither."""
    for m in modules:
        if _fx_fuse.has_hooks(m):
            return "it has hooks: it runs as written, so that they fire"
        if any(getattr(m, d, None) for d in _STATE_HOOK_DICTS):
            return "it has state_dict hooks: it is kept, so that they run"
        if any(type(p) not in _PLAIN_PARAMS for p in m.parameters(recurse=False)):
            return ("its parameters are a tensor subclass (DTensor: sharded): it runs as written; optimize before "
                    "sharding to fuse it")
    return None


def _mlp_plan(model: nn.Module, filter_fn: Filter) -> List[Tuple[str, nn.Sequential]]:
    """(fqn, Sequential) for each plain nn.Sequential that is an MLP with at least one fusable activation (and no
    hooks on it or its children: the Linear-by-Linear pass below then reports them)."""
    found = []
    for fqn, mod in model.named_modules():
        if type(mod) is not nn.Sequential:
            continue
        children = list(mod.named_children())
        linears = [i for i, (_, m) in enumerate(children) if type(m) is nn.Linear]
        if len(linears) == len(children) or _pattern_error(children, linears) is not None:
            continue  # no activation to fuse, or not an MLP
        if (filter_fn is None or filter_fn(mod, fqn)) and _hooked(mod, *mod.children()) is None:
            found.append((fqn, mod))
    return found


def _linear_plan(model: nn.Module, filter_fn: Filter, skip: List[str]):
    """(fqn, parent Sequential, index, activation, skip reason) for each Linear inside a Sequential that is not
    swapped whole as an MLP."""
    found = []
    for fqn, mod in model.named_modules():
        if not isinstance(mod, nn.Sequential) or isinstance(mod, MLP) or fqn in skip:
            continue
        children = list(mod.children())
        names = [n for n, _ in mod.named_children()]
        parent_excluded = filter_fn is not None and not filter_fn(mod, fqn)
        for i, child in enumerate(children):
            if type(child) is not nn.Linear:
                continue
            child_fqn = f"{fqn}.{names[i]}" if fqn else names[i]
            if parent_excluded or (filter_fn is not None and not filter_fn(child, child_fqn)):
                found.append((child_fqn, mod, i, None, "excluded by filter_fn"))
                continue
            if i + 1 >= len(children):
                found.append((child_fqn, mod, i, None, "no activation follows it"))
                continue
            act = activation_name(children[i + 1])
            why = None if act else not_fused_reason(children[i + 1])
            if act and _hooked(child, children[i + 1]):
                act, why = None, _hooked(child, children[i + 1])
            if type(children[i + 1]) is nn.BatchNorm1d:
                why = "followed by a BatchNorm1d: folded in eval mode by the forward-code pass (below)"
            found.append((child_fqn, mod, i, act, why))
    return found


def _conv_plan(model: nn.Module, filter_fn: Filter):
    """(fqn, parent Sequential, index, skip reason) for each Conv2d followed by ReLU and MaxPool2d inside an
    nn.Sequential (reason None: fusable)."""
    found = []
    for fqn, mod in model.named_modules():
        if type(mod) is not nn.Sequential:
            continue
        names, children = zip(*mod.named_children()) if len(mod) else ((), ())
        parent_excluded = filter_fn is not None and not filter_fn(mod, fqn)
        for i, child in enumerate(children):
            if type(child) is not nn.Conv2d:
                continue
            child_fqn = f"{fqn}.{names[i]}" if fqn else names[i]
            nxt = children[i + 1:i + 3]
            if len(nxt) < 2 or type(nxt[0]) is not nn.ReLU or type(nxt[1]) is not nn.MaxPool2d:
                continue  # not the pattern: nothing to report
            if parent_excluded or (filter_fn is not None and not filter_fn(child, child_fqn)):
                found.append((child_fqn, mod, i, "excluded by filter_fn"))
            else:
                found.append((child_fqn, mod, i, _hooked(child, *nxt) or conv_unsupported(child, nxt[1])))
    return found


def _lstm_plan(model: nn.Module, filter_fn: Filter):
    """(fqn, module, reason) for each nn.LSTM / nn.LSTMCell (reason None: swapped)."""
    found = []
    for fqn, mod in model.named_modules():
        if type(mod) in (nn.LSTM, nn.LSTMCell) and fqn:
            excluded = filter_fn is not None and not filter_fn(mod, fqn)
            found.append((fqn, mod, "excluded by filter_fn" if excluded else _hooked(mod)))
    return found


def _set(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, name = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    _record(model, parent, [name])
    setattr(parent, name, new)


_SWAPS = "_pydlx_swaps"  # an optimized model's record of its module swaps: [(parent, {child name: original})]


def _record(model: nn.Module, parent: Optional[nn.Module], names: List[str], originals=None) -> None:
    """Keep the modules a swap replaces (``parent``'s children ``names``; ``originals`` for the model itself),
    so that ``restore`` can put them back."""
    kept = originals if originals is not None else {n: getattr(parent, n) for n in names}
    model.__dict__.setdefault(_SWAPS, []).append((parent, kept))


def restore(model: nn.Module) -> nn.Module:
    """Undo ``optimize``: the original modules back in place of pydlx's, and every forward fused by the
    forward-code pass back to its class's own; returns the plain model (the same object, or the original
    nn.Sequential where ``optimize`` turned the model itself into a pydlx.nn.MLP). The parameters and buffers are
    the optimized model's current ones (the same tensors: an optimizer over them goes on working), and each module's
    train/eval mode is kept. For a tool pydlx does not support; hooks registered on pydlx's own modules after
    ``optimize`` go with them."""
    _unfollow(model)
    for m in model.modules():
        _fx_fuse.uninstall(m)
    for parent, originals in reversed(model.__dict__.pop(_SWAPS, [])):
        if parent is None:  # the model itself was swapped for a pydlx.nn.MLP
            (original,) = originals.values()
            _adopt(original, dict(model.state_dict(keep_vars=True)), model.training)
            model = original
            continue
        held = {f"{n}.{k}": v for n in originals for k, v in getattr(parent, n).state_dict(keep_vars=True).items()}
        for n, original in originals.items():
            original.train(getattr(parent, n).training)
            setattr(parent, n, original)
        _adopt(parent, held, None)
    return model


def _adopt(root: nn.Module, tensors, training: Optional[bool]) -> None:
    """Put ``tensors`` ({state_dict key: tensor}, as the optimized model holds them) into ``root``'s modules."""
    for key, t in tensors.items():
        path, _, leaf = key.rpartition(".")
        m = root.get_submodule(path)
        if leaf in m._parameters:
            m._parameters[leaf] = t
        elif leaf in m._buffers:
            m._buffers[leaf] = t
    if training is not None:
        root.train(training)


def _module_blocks(model: nn.Module, filter_fn: Filter) -> List[Tuple[Block, Optional[Callable[[], nn.Module]]]]:
    """(block, apply) for each module-chain candidate: an MLP-shaped Sequential, a Linear + activation module pair,
    a Conv2d, ReLU, MaxPool2d run (inside nn.Sequentials), an LSTM / LSTMCell. ``apply()`` swaps the block's
    modules in place and returns the model (a new pydlx.nn.MLP when the model itself is the Sequential); None for a
    kept block."""
    out: List[Tuple[Block, Optional[Callable[[], nn.Module]]]] = []
    mlps = _mlp_plan(model, filter_fn)
    for fqn, parent, i, act, why in _linear_plan(model, filter_fn, [f for f, _ in mlps]):
        if i + 1 < len(parent) and type(parent[i + 1]) is nn.BatchNorm1d:
            continue  # the forward-code pass (which sees the same Sequential) names it with the BatchNorm's mode
        if act is None:
            out.append((Block((fqn,), ("Linear",), "module", reason=why), None))
            continue

        def swap(parent=parent, i=i, act=act):
            names = [n for n, _ in parent.named_children()]
            _record(model, parent, names[i:i + 2])
            setattr(parent, names[i], Linear.from_module(getattr(parent, names[i]), activation=act))
            setattr(parent, names[i + 1], nn.Identity())
            return model
        out.append((Block((fqn,), ("Linear", act), "module", "pydlx.nn.Linear", "linear", (("activation", act),)),
                    swap))
    for fqn, parent, i, why in _conv_plan(model, filter_fn):
        if why is not None:
            continue  # the forward-code pass explains it (and may still fuse the conv and its activation)

        def swap(parent=parent, i=i):
            names = [n for n, _ in parent.named_children()]
            conv, pool = getattr(parent, names[i]), getattr(parent, names[i + 2])
            _record(model, parent, names[i:i + 3])
            setattr(parent, names[i], ConvReLUPool2d.from_modules(conv, pool))
            setattr(parent, names[i + 1], nn.Identity())
            setattr(parent, names[i + 2], nn.Identity())
            return model
        conv, pool = parent[i], parent[i + 2]
        args = (("in_channels", conv.in_channels), ("out_channels", conv.out_channels),
                ("kernel_size", _square(conv.kernel_size)), *fused_args(conv, pool).items())
        out.append((Block((fqn,), ("Conv2d", "relu", "MaxPool2d"), "module", "pydlx.nn.ConvReLUPool2d",
                          "conv_relu_pool", args, detail="pydlx.use_backend('triton') forces the kernel"), swap))
    for fqn, mod, why in _lstm_plan(model, filter_fn):
        kind = type(mod).__name__
        if why is not None:
            out.append((Block((fqn,), (kind,), "module", reason=why), None))
            continue

        def swap(fqn=fqn, mod=mod):
            _set(model, fqn, (LSTM if type(mod) is nn.LSTM else LSTMCell).from_module(mod))
            return model
        out.append((Block((fqn,), (kind,), "module", f"pydlx.nn.{kind}", "lstm",
                          detail="pydlx.use_backend('triton') forces the kernels"), swap))
    for fqn, seq in mlps:
        m = MLP.from_sequential(seq)
        linears = [layer for layer in m if isinstance(layer, nn.Linear)]
        sizes = [layer.in_features for layer in linears] + [linears[-1].out_features]
        one = fuses_in_one_kernel(sizes)

        def swap(fqn=fqn, seq=seq):
            new = MLP.from_sequential(seq)
            if fqn == "":
                _record(new, None, [], {"": seq})
                return new
            _set(model, fqn, new)
            return model
        out.append((Block((fqn,), ("MLP",), "module", "pydlx.nn.MLP", "mlp" if one else "linear",
                          (("sizes", sizes), ("activation", m.activation), ("last_activation", m.last_activation)),
                          detail="one fused kernel on GPUs" if one else
                          "a chain of fused Linear GEMMs: a layer is wider than 128"), swap))
    return out


def _module_pass(model: nn.Module, filter_fn: Filter) -> nn.Module:
    """The module-chain swaps, in place (a model that is itself an MLP-shaped Sequential comes back new)."""
    for block, apply in _module_blocks(model, filter_fn):
        if apply is not None:
            model = apply()
    return model


def _allowed_fqns(model: nn.Module, filter_fn: Filter) -> frozenset:
    """The modules the forward-code pass may fuse (and whose forward code it may rewrite): those that
    ``filter_fn`` accepts with all their ancestors; "" stands for the model itself."""
    ok = {"": filter_fn is None or filter_fn(model, "")}
    for fqn, mod in model.named_modules():
        if fqn:
            parent = fqn.rpartition(".")[0]
            ok[fqn] = ok.get(parent, True) and (filter_fn is None or filter_fn(mod, fqn))
    return frozenset(f for f, v in ok.items() if v)


def optimize(model: nn.Module, *, inplace: bool = False, filter_fn: Filter = None, policy=None) -> nn.Module:
    """Return ``model`` with fusable chains replaced by pydlx layers; state_dict keys and values unchanged.

    inplace=False (default) works on a deep copy and leaves ``model`` untouched. ``filter_fn(module, fqn)``
    returning False keeps that module as it is (an excluded nn.Sequential keeps its children too). Chains found in
    the forward code (torch.fx) are fused by switching the model's class to a subclass of its own whose forward
    runs the fused code (pydlx/_fx_fuse.py): the result is still an instance of the model's class, with all its
    attributes and methods, and follows ``.train()``/``.eval()``, attribute changes and optional arguments
    exactly as the original forward does. If ``model`` itself is an MLP-shaped nn.Sequential, the result is a new
    pydlx.nn.MLP over its modules.

    ``policy``: what ``auto`` follows during this model's forward calls, as ``pydlx.use_policy(policy)`` would:
    "measure" (each new shape measured on first use on this GPU: pydlx/_measure.py), "off", or a policy file; None
    (default): the policy in force where it is called. It is held by a forward pre-hook and hook on the model
    (``pydlx.restore`` removes them); a compiled model follows the policy in force around the compiled call.
    """
    enter = None if policy is None else _PolicyHook(policy, True)  # (before any work: a bad policy file raises)
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except Exception as e:
            e.add_note("pydlx.optimize(model) works on a copy of the model; a model that cannot be copied (sharded by "
                       "FSDP2, for one) is optimized with pydlx.optimize(model, inplace=True)")
            raise
    model = _module_pass(model, filter_fn)
    if not isinstance(model, MLP) and _sharded(model) is None:
        _fx_fuse.install_tree(model, _allowed_fqns(model, filter_fn))
    if enter is not None:
        _follow(model, enter)
    return model


_HELD = contextvars.ContextVar("pydlx_model_policies", default=())  # the tokens of the policies models hold now


class _PolicyHook:
    """The forward pre-hook (``enter``) or the always-called forward hook (leaving) that hold a model's policy
    (optimize's ``policy``) during its forward calls. A module-level class, so that a model holding it pickles
    (``torch.save(model)``) and deep-copies; it keeps the policy as given (a name, or a Policy object, re-held under
    a fresh setting name wherever it is unpickled)."""

    def __init__(self, policy, enter: bool):
        self.policy, self.enter = policy, enter
        self._setting = _policy._setting_value(policy) if enter else None  # (loads a policy file: raises if bad)

    def __getstate__(self):
        return {"policy": self.policy, "enter": self.enter}

    def __setstate__(self, state):
        self.__init__(state["policy"], state["enter"])

    def __call__(self, module, args, output=None):
        if torch.compiler.is_compiling():
            return None
        if self.enter:
            _HELD.set(_HELD.get() + (_policy._POLICIES.enter(self._setting),))
            return None
        held = _HELD.get()
        if held:
            _HELD.set(held[:-1])
            _policy._POLICIES.leave(held[-1])
        return None


def _follow(model: nn.Module, enter: _PolicyHook) -> None:
    """Hold ``enter``'s policy as the policy in force during ``model``'s forward calls (the hooks are found again by
    their type, not by handles: a deep copy of the model copies its hooks and can be restored too)."""
    _unfollow(model)
    model.register_forward_pre_hook(enter)
    model.register_forward_hook(_PolicyHook(enter.policy, False), always_call=True)


def _unfollow(model: nn.Module) -> None:
    """Remove the hooks ``_follow`` registered on ``model``."""
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, fn in hooks.items() if isinstance(fn, _PolicyHook)]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)


def _sharded(model: nn.Module) -> Optional[str]:
    """Why the forward-code pass leaves ``model`` as it is: a parameter is a tensor subclass (DTensor: sharded by
    FSDP2 or tensor parallelism, whose hooks gather it per module); None if none is."""
    for fqn, p in model.named_parameters():
        if type(p) not in _PLAIN_PARAMS:
            return (f"the forward code is not analysed: parameters are a tensor subclass ({fqn} is a "
                    f"{type(p).__name__}: sharded), so it runs as written; optimize before sharding to fuse it")
    return None


def _auto(block: Block, model: nn.Module) -> Optional[str]:
    """What auto runs for a fused block's calls on this machine, and why: the decisions measured on this GPU
    (pydlx/_measure.py ``summary``), else the policy file's (pydlx/_policy.py ``summary``)."""
    if block.family is None:
        return None
    weight = next(model.get_submodule(block.modules[0]).parameters(), None)
    if weight is None:
        return None
    return _measure.summary(block.family, weight.dtype) or _policy.summary(block.family, weight.dtype)


def plan(model: nn.Module, filter_fn: Filter = None) -> Plan:
    """What ``optimize(model, filter_fn=filter_fn)`` would fuse and keep, as data (pydlx/_plan.py): the module-chain
    swaps, then the chains in forward code (traced on a copy, where its forward does not trace its submodules'
    forwards, recursively), each block with what ``auto`` runs for it here; notes for forwards not traced and the
    attributes a fused forward is specialised on. Never fails on a model: a part that cannot be analysed becomes
    a note."""
    result = Plan()
    blocks: List[Block] = result.blocks
    try:
        blocks.extend(b for b, _ in _module_blocks(model, filter_fn))
    except Exception as e:  # noqa: BLE001
        result.notes.append(Note("", "error", f"the module chains could not be analysed ({type(e).__name__}: {e}); "
                                              "optimize keeps them as they are"))
    allowed = _allowed_fqns(model, filter_fn)

    def forward_tree(mod: nn.Module, prefix: str):
        """The forward code's candidates of ``mod``; where it does not trace, its submodules', recursively."""
        base = type(mod)._pydlx_base if isinstance(mod, _fx_fuse.FusedForward) else type(mod)
        optional = tuple(_fx_fuse._forward_parameters(base)[2])
        with _fx_fuse._as(mod, base):
            try:
                graph, guards = _fx_fuse.trace(mod, optional)
            except _fx_fuse.TraceFailed as e:
                result.notes.append(Note(prefix, "not traced", e.why))
                probe = fx.Tracer()
                for child_name, child in mod.named_children():
                    fqn = f"{prefix}.{child_name}" if prefix else child_name
                    if not _fx_fuse._is_leaf(probe, child, fqn):
                        forward_tree(child, fqn)
                return
            local = _fx_fuse.relative(allowed, prefix)
            found = [b for b, _ in _fx_fuse.plan(graph, mod, lambda f: f in local)]
            moved = _fx_fuse.construct_on_device(graph) if "" in local else []
        kept = {b.modules for b in blocks if not b.fused}
        for b in found:
            full = tuple(f"{prefix}.{f}" if prefix else f for f in b.modules)
            if b.fused or full not in kept:  # (a kept block is said once)
                blocks.append(dataclasses.replace(b, modules=full))
        if moved:
            counts = {m: moved.count(m) for m in moved}
            result.notes.append(Note(prefix, "device", ", ".join(m + (f" ({n} times)" if n > 1 else "")
                                                                  for m, n in counts.items())))
        read = _fx_fuse.describe_guards(guards)
        if read and (any(b.fused for b in found) or moved):
            result.notes.append(Note(prefix, "guards", read))

    try:
        if _sharded(model) is not None:
            result.notes.append(Note("", "sharded", _sharded(model)))
        else:
            swapped = _module_pass(copy.deepcopy(model), filter_fn)
            if not isinstance(swapped, MLP):
                forward_tree(swapped, "")
    except Exception as e:  # noqa: BLE001
        result.notes.append(Note("", "error", f"the forward code could not be analysed ({type(e).__name__}: {e}); "
                                              "optimize keeps it as it is"))
    result.blocks[:] = [dataclasses.replace(b, auto=_auto(b, model)) if b.fused else b for b in blocks]
    return result


def explain(model: nn.Module) -> str:
    """What ``optimize`` would fuse, and for each candidate it skips, why: ``plan(model)`` rendered as text, a line
    per block and note."""
    return str(plan(model))
