"""The torch.fx half of ``pydlx.optimize``: fusable chains written in a model's forward rather than as modules in an
``nn.Sequential`` — the seed CNN's ``self.pool(F.relu(self.conv1(x)))`` (one pool module reused twice) and
``F.relu(self.fc1(x))``, with ``torch.relu`` / ``F.gelu`` / ``x.relu()`` / in-place ``ReLU(True)`` variants.

The model is traced with ``torch.fx`` (pydlx's and torch's RNN modules are leaves). A match replaces the module at
its own name (so parameter names, and the state_dict, do not change) and removes the activation and pool nodes:
  Conv2d -> relu -> max_pool2d   becomes   pydlx.nn.ConvReLUPool2d.from_modules(conv, pool)
  Linear -> act -> Linear ...    becomes   one pydlx.ops.mlp call over the Linears' own parameters (get_attr nodes:
                                           the modules stay, so does the state_dict)
  Linear -> act                  becomes   pydlx.nn.Linear.from_module(linear, act)
A module called from several places is fused only if every call is followed by the same pattern. The result is a
``torch.fx.GraphModule`` holding the model's own submodules in their original order.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from .nn.conv_relu_pool import ConvReLUPool2d, unsupported as conv_unsupported
from .nn.linear import Linear
from .nn.lstm import LSTM, LSTMCell
from .nn.mlp import MLP, activation_name

_LEAVES = (Linear, MLP, ConvReLUPool2d, LSTM, LSTMCell, nn.RNNBase, nn.LSTMCell, nn.Sequential)

_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu", F.silu: "silu",
              torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid"}
_METHODS = {"relu": "relu", "relu_": "relu", "tanh": "tanh", "tanh_": "tanh", "sigmoid": "sigmoid",
            "sigmoid_": "sigmoid"}


class _Tracer(fx.Tracer):
    """Leaves: pydlx's modules, torch's recurrent modules, and MLP-shaped Sequentials already swapped."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _LEAVES) and not type(m) is nn.Sequential:
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> Tuple[Optional[fx.Graph], Optional[str]]:
    """(graph, None), or (None, why tracing failed)."""
    try:
        return _Tracer().trace(model), None
    except Exception as e:  # data-dependent control flow, unsupported calls, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, f"{type(e).__name__}: {msg[:200]}"


def _activation(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[str]:
    """pydlx's activation name for what ``node`` computes from its first argument alone, else None."""
    if node.op == "call_module":
        return activation_name(modules[node.target])
    if node.op == "call_function":
        t = node.target
        if t is F.gelu:
            approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            return {"none": "gelu", "tanh": "gelu_tanh"}.get(approx)
        if t in (F.relu, F.silu):  # (input, inplace=False): in place or not, the result is the same
            return _FUNCTIONS[t]
        if t in _FUNCTIONS and len(node.args) == 1 and not node.kwargs:
            return _FUNCTIONS[t]
        return None
    if node.op == "call_method" and len(node.args) == 1 and not node.kwargs:
        return _METHODS.get(node.target)
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


def _allowed(fqn: str, modules: Dict[str, nn.Module], filter_fn) -> bool:
    """filter_fn accepts the module and each of its ancestors."""
    if filter_fn is None:
        return True
    parts = fqn.split(".")
    return all(filter_fn(modules[p], p) for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)))


def _linear_chains(graph: fx.Graph, modules, calls, filter_fn):
    """Runs ``Linear -> act -> Linear [-> act ...] [-> last act]`` in forward code, one hidden activation, every
    Linear called once: [(linear nodes, act nodes, hidden act, last act node or None, last act)]."""
    def single_linear(node):
        return (node is not None and node.op == "call_module" and type(modules.get(node.target)) is nn.Linear
                and len(calls[node.target]) == 1 and _allowed(node.target, modules, filter_fn))

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


def _mlp_apply(graph: fx.Graph, model: nn.Module, linears, acts, hidden, last_node, last):
    """Replace the chain by one pydlx.ops.mlp call over the Linear modules' own parameters (get_attr: the modules
    stay where they are, so the state_dict does not change)."""
    from .ops.mlp import mlp

    first = linears[0]
    with graph.inserting_before(first):
        ws = [graph.get_attr(f"{n.target}.weight") for n in linears]
        bs = [graph.get_attr(f"{n.target}.bias") if model.get_submodule(n.target).bias is not None else None
              for n in linears]
        new = graph.call_function(mlp, (first.args[0], ws, bs), {"activation": hidden, "last_activation": last})
    tail = last_node if last_node is not None else linears[-1]
    tail.replace_all_uses_with(new)
    doomed = [last_node] if last_node is not None else []
    for i in reversed(range(len(linears))):  # from the tail back: each node's users are gone before it
        doomed += [linears[i]] + ([acts[i - 1]] if i > 0 else [])
    for n in doomed:
        graph.erase_node(n)


def plan(graph: fx.Graph, model: nn.Module, filter_fn) -> List[Tuple[str, str, Optional[str], Callable]]:
    """(module fqn, description, skip reason or None, apply) for each functional candidate in ``graph``."""
    modules = dict(model.named_modules())
    calls: Dict[str, List[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and type(modules.get(node.target)) in (nn.Conv2d, nn.Linear):
            calls.setdefault(node.target, []).append(node)
    found = []
    for linears, acts, hidden, last_node, last in _linear_chains(graph, modules, calls, filter_fn):
        mods = [modules[n.target] for n in linears]
        sizes = [mods[0].in_features] + [m.out_features for m in mods]
        how = ("one fused kernel on GPUs" if max(sizes[1:]) <= 128 and len(mods) <= 16 else
               "a chain of fused Linear GEMMs: a layer is wider than 128")
        desc = (f"Linear chain (forward code) -> pydlx.ops.mlp(sizes={sizes}, activation={hidden!r}, "
                f"last_activation={last!r}) over the Linears' own parameters, {how}")
        found.append((", ".join(n.target for n in linears), desc, None,
                      lambda c=(linears, acts, hidden, last_node, last): _mlp_apply(graph, model, *c)))
        for n in linears:
            del calls[n.target]
    for fqn, nodes in calls.items():
        mod = modules[fqn]
        matches = []
        for node in nodes:
            act_node = _only_user(node)
            act = _activation(act_node, modules) if act_node is not None else None
            if type(mod) is nn.Conv2d:
                pool_node = _only_user(act_node) if act == "relu" else None
                pool = _max_pool(pool_node, modules) if pool_node is not None else None
                matches.append((node, act_node, pool_node, pool) if pool is not None else None)
            else:
                matches.append((node, act_node, None, act) if act is not None else None)
        if not any(matches):
            continue
        kind = "Conv2d + ReLU + MaxPool2d" if type(mod) is nn.Conv2d else "Linear + activation"
        why = None
        if not all(matches):
            why = f"{fqn} is called {len(nodes)} times and not every call is followed by the pattern"
        elif type(mod) is nn.Conv2d:
            pools = [(m[3].kernel_size, m[3].stride, m[3].ceil_mode) for m in matches]
            why = conv_unsupported(mod, matches[0][3]) or (
                None if len(set(map(str, pools))) == 1 else f"{fqn}'s calls use different pools")
        elif len({m[3] for m in matches}) != 1:
            why = f"{fqn}'s calls use different activations"
        if why is None and not _allowed(fqn, modules, filter_fn):
            why = "excluded by filter_fn"
        if type(mod) is nn.Conv2d:
            desc = f"{kind} (forward code) -> pydlx.nn.ConvReLUPool2d"
        else:
            desc = f"{kind} (forward code) -> pydlx.nn.Linear(activation={matches[0][3]!r})" if all(matches) \
                else kind

        def apply(fqn=fqn, mod=mod, matches=matches):
            if type(mod) is nn.Conv2d:
                new = ConvReLUPool2d.from_modules(mod, matches[0][3])
            else:
                new = Linear.from_module(mod, activation=matches[0][3])
            parent, _, name = fqn.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, new)
            for node, act_node, pool_node, _ in matches:
                last = pool_node if pool_node is not None else act_node
                last.replace_all_uses_with(node)
                graph.erase_node(last)
                if pool_node is not None:
                    graph.erase_node(act_node)

        found.append((fqn, desc, why, apply))
    return found


def graph_module(model: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule running ``graph`` over ``model``'s own submodules, parameters and buffers, registered in their
    original order (so the state_dict's keys and their order are the model's)."""
    graph.lint()
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm._modules.clear()
    gm._modules.update(model._modules)
    gm._parameters.clear()
    gm._parameters.update(model._parameters)
    gm._buffers.clear()
    gm._buffers.update(model._buffers)
    gm.train(model.training)
    return gm
