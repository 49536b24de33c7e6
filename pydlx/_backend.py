"""The dispatcher: which backend runs one call of a pydlx op.

Backends and families are pydlx/registry.py's rows. The rules:
  * A forced backend (``use_backend`` or ``PYDLX_BACKEND``) runs every call, or raises ``BackendUnavailableError``
    saying why it cannot run that one. It never falls back silently.
  * ``auto``: CPU tensors get ``reference``; CUDA tensors get what the GPU's measured policy says for the call
    (pydlx/_policy.py), else the family's unmeasured default (``registry.FAMILIES[family].auto``), passing over a
    backend that cannot run the call, the reference last.

A decision (backend and reason) is made once per call signature -- family, call descriptor (dtype, training or not,
sizes, options), device, backend in force, policy in force -- and kept: later calls with the same signature cost a
dictionary lookup (``decide``). While torch.compile or torch.export traces, it is computed afresh (and becomes a
constant of the graph). ``clear_caches()`` forgets them (and the other kept caches); registering a backend does too.

The choice is per thread and per asyncio task (pydlx/_env.py ``Scope``): two server threads, or two tasks of one
event loop, can run different backends. A backward runs where its forward ran whatever thread autograd runs it on
(CUDA backward passes run on autograd's worker threads), because each op passes the forward's backend to its
backward op.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Dict, Iterator, Optional, Tuple

import torch

from . import _env, _measure, _policy, registry
from ._env import DATA as _ENV, Scope, getenv

_BACKENDS = Scope("backends")  # use_backend's stack in this thread and task


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this call (missing package, wrong device, unsupported option)."""


def choices() -> Tuple[str, ...]:
    """What ``use_backend`` and ``PYDLX_BACKEND`` take: ``auto`` and every registered backend."""
    return ("auto",) + registry.backend_names()


def _check_name(name: str) -> str:
    if name != "auto" and name not in registry.BACKENDS:
        raise ValueError(f"pydlx backend must be one of {choices()}, got {name!r}")
    return name


def current_backend() -> str:
    """The backend in force: the innermost ``use_backend``, else ``PYDLX_BACKEND``, else ``auto``."""
    stack = _BACKENDS.get()
    if stack:
        return stack[-1]
    value = getenv("PYDLX_BACKEND")
    return "auto" if value is None else _check_name(value.strip().lower() or "auto")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run pydlx ops inside the block on backend ``name`` (``auto``, ``reference``, ``triton``, ``cuda``, or any
    registered one)."""
    with _BACKENDS.push(_check_name(name)):
        yield


def backends() -> Dict[str, str]:
    """What each registered backend can do on this machine, and for those that cannot run, why; the policy ``auto``
    follows on this machine's GPU (or why there is none); and, on a GPU, the decisions measured on it that ``auto``
    follows ("decisions": measured in this process, the user cache's, or shared by a rank)."""
    out = {name: b.status() for name, b in registry.BACKENDS.items()}
    out["policy"] = _policy.status()
    if torch.cuda.is_available() and _policy.setting() in ("default", _policy.MEASURE):
        out["decisions"] = _measure.status(None)
    return out


def cpu_auto(t: torch.Tensor) -> bool:
    """A CPU tensor under ``auto``: the entry points call the reference directly (plain eager PyTorch: a custom
    op's Python dispatch costs ~0.1 ms a call, which would make a swapped-in model slower on the CPU)."""
    return t.device.type == "cpu" and current_backend() == "auto"


def runs_eager(backend: str) -> bool:
    """``auto`` chose the reference for a call (no kernel is measured faster on this device): ``linear`` and ``mlp``
    then run plain eager PyTorch, with autograd's own C++ nodes, not the reference inside the op, which saves what
    eager saves and costs the host a custom autograd Function (~10 µs a call: the cost a kernel has to pay, not
    eager's). The conv block keeps its op there: it saves the pooled output and int8 window indices, not the conv
    and activation maps. A forced ``reference`` runs the op."""
    return backend == "reference" and current_backend() == "auto"


# ----------------------------------------------------------------------------------------------- decisions
MAX_DECISIONS = 4096  # kept decisions; past that they are dropped and made again (a workload of ever-new shapes)
_decisions: Dict[tuple, Tuple[str, str]] = {}


CACHES: list = []  # the other caches' clear functions (the eval-mode BatchNorm folds)
# set in this thread when a decision is not kept (made during CUDA graph capture, under deterministic algorithms:
# measuring on first use must happen later); the entry point's next Plans.keep then keeps no plan either
_UNKEPT = threading.local()


def clear_caches() -> None:
    """Forget every kept decision, plan and fold (``pydlx.clear_caches``): for a change no key can see (an in-place
    change of a parameter through ``.data``)."""
    _decisions.clear()
    for plans in Plans.every:
        plans.kept.clear()
    for clear in CACHES:
        clear()


def state() -> tuple:
    """What a kept plan depends on beyond the call itself: what decides the backend and the policy in force (the
    innermost ``use_backend`` / ``use_policy``, and PYDLX_BACKEND / PYDLX_POLICY as set now: read on every call,
    unparsed, so that a change is seen by the next call at the cost of two lookups). Eager calls only: plans are
    not kept while torch.compile / torch.export trace."""
    # (written out with no Python call, the variables' values as the environment's bytes: this runs on every op call)
    stack, override = _BACKEND_STACK.get(), _POLICY_STACK.get()
    if _ENV is None:
        return stack[-1] if stack else getenv("PYDLX_BACKEND"), override[-1] if override else None, \
            getenv("PYDLX_POLICY")
    return stack[-1] if stack else _ENV.get(_BACKEND_KEY), override[-1] if override else None, _ENV.get(_POLICY_KEY)


_BACKEND_STACK, _POLICY_STACK = _BACKENDS.var, _policy._POLICIES.var
_BACKEND_KEY, _POLICY_KEY = _env.key("PYDLX_BACKEND"), _env.key("PYDLX_POLICY")


class Plans:
    """An entry point's plans, kept per call signature: what a call that passed the entry point's checks runs (its
    backend and the op's derived arguments), so that a repeated call skips the checks, the argument derivation and
    the dispatcher. The key holds everything the plan was derived from -- each tensor's shape, dtype, device and
    requires_grad, the options, grad mode, and ``state()`` -- so any change makes a new plan. Never used while
    torch.compile / torch.export trace (pydlx._tracing.traced): symbolic sizes are not kept. At most
    MAX_DECISIONS plans; ``clear_caches()`` forgets them."""

    every: list = []

    def __init__(self):
        self.kept: Dict[tuple, object] = {}
        Plans.every.append(self)

    def get(self, key):
        try:
            return self.kept.get(key)
        except TypeError:  # (an unhashable option: no plan is kept for it)
            return None

    def keep(self, key, plan):
        if getattr(_UNKEPT, "flag", False):  # the decision under the plan was not to be kept: nor is the plan
            _UNKEPT.flag = False
            return plan
        try:
            if len(self.kept) >= MAX_DECISIONS:
                self.kept.clear()
            self.kept[key] = plan
        except TypeError:
            pass
        return plan


registry._listeners.append(clear_caches)
_measure.HOOKS.update(force=use_backend, changed=clear_caches)


def decide(family: str, device: torch.device, call, op: Optional[str] = None) -> Tuple[str, str]:
    """(backend, why) for one call of ``family`` (``call``: its ``registry.FAMILIES[family].call`` descriptor) on
    ``device``; ``op`` names the op in errors. Raises BackendUnavailableError when a forced backend cannot run it."""
    name = current_backend()
    if torch.compiler.is_compiling():
        return _decide(name, family, device, call, op)[:2]
    if name == "auto" and torch._C._functorch.peek_interpreter_stack() is not None:
        return "reference", _UNDER_TORCH_FUNC
    key = (family, call, device, name, _policy.in_force())
    try:
        hit = _decisions.get(key)
    except TypeError:  # (a symbolic size: traced by torch.export's non-strict mode)
        return _decide(name, family, device, call, op)[:2]
    if hit is None:
        backend, why, keep = _decide(name, family, device, call, op)
        hit = (backend, why)
        if not keep:
            _UNKEPT.flag = True
        else:
            if len(_decisions) >= MAX_DECISIONS:
                _decisions.clear()
            _decisions[key] = hit
    return hit


# ``auto`` under a torch.func transform: a kernel's Function has no vmap or jvp rule and its backward runs under one
# level of grad / vjp only (jacrev vmaps over a backward), while the reference's PyTorch ops go through every
# transform as the chain as written does; a forced backend runs its kernels (grad, vjp) or raises torch's error
_UNDER_TORCH_FUNC = "reference: under a torch.func transform (the reference's PyTorch ops go through every transform)"


def choose(family: str, device: torch.device, call, op: Optional[str] = None) -> str:
    """The backend of one call (``decide`` without its reason)."""
    return decide(family, device, call, op)[0]


def _runs(backend: str, family: str, device: torch.device, call) -> bool:
    return backend == "reference" or registry.why_not(backend, family, device, call) is None


def _decide(name: str, family: str, device: torch.device, call, op: Optional[str]) -> Tuple[str, str, bool]:
    """(backend, why, whether the decision may be kept for the call's signature)."""
    if name != "auto":
        reason = registry.why_not(name, family, device, call)
        if reason is not None:
            raise BackendUnavailableError(f"pydlx.{op or family}: backend {name!r} cannot run this call: {reason}")
        return name, f"{name}: forced", True
    if device.type != "cuda":
        return "reference", "reference: not a CUDA tensor", True
    setting = _policy.setting()
    if _symbolic(call):  # (torch.export / compile with dynamic sizes: no size is known to look up)
        return _defaults(family, device, call, setting, "the sizes are symbolic")
    if torch.compiler.is_compiling():
        return _auto_in_trace(family, device, type(call), tuple(call), setting)
    return _auto(family, device, call, setting, False)


def _symbolic(call) -> bool:
    return any(isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)) or
               (isinstance(v, tuple) and any(isinstance(u, torch.SymInt) for u in v)) for v in call)


@torch._dynamo.assume_constant_result
def _auto_in_trace(family: str, device: torch.device, kind: type, fields: tuple, setting: str
                   ) -> Tuple[str, str, bool]:
    """``_auto`` while torch.compile traces: Dynamo calls it once and the decision becomes a constant of the graph
    (recorded decisions and policy files are read in plain Python, never traced; nothing is measured). The setting
    is read by the traced caller, so that the compiled code guards on it. (The call descriptor comes as its type
    and fields: Dynamo passes plain constants faithfully, not a NamedTuple built in traced code.)"""
    return _auto(family, device, kind(*fields), setting, True)


def _auto(family: str, device: torch.device, call, setting: str, tracing: bool) -> Tuple[str, str, bool]:
    """``auto``'s decision for a call on a GPU: recorded decisions (pydlx/_measure.py), measured now under "measure",
    the nearest measured sizes, the policy file, then the family's unmeasured default (eager under "measure")."""
    fam = registry.FAMILIES[family]
    recorded = setting in ("default", _policy.MEASURE) and call.dtype in registry.KERNEL_DTYPES
    not_now, passing = None, False
    if recorded:  # decisions measured on this card: this process's, the user cache's
        d = _measure.recorded(family, device, call)
        if d is not None and _runs(d.backend, family, device, call):
            return d.backend, d.describe(), True
        if setting == _policy.MEASURE:
            if tracing:
                not_now, passing = "torch.compile is tracing: it follows recorded decisions only", True
            else:
                d, not_now, passing = _measure.first_use(family, device, call)
                if d is not None and _runs(d.backend, family, device, call):
                    return d.backend, d.describe(), True
    policy = _policy.for_device(device, setting)
    if fam.policy_applies(call):
        for rule in ((_measure.nearby(family, device, call) if recorded else None),
                     _policy.lookup(family, device, call, policy) if policy is not None else None):
            if rule is not None and _runs(rule.backend, family, device, call):
                return rule.backend, rule.describe(), not_now is None or not passing
    if not_now is not None:
        return "reference", f"eager: not measured ({not_now})", not passing
    return _defaults(family, device, call, setting, None, policy)


def _defaults(family, device, call, setting: str, why: Optional[str], policy=None) -> Tuple[str, str, bool]:
    """The family's unmeasured default (the first of ``auto`` that can run the call), or eager under "measure"."""
    if setting == _policy.MEASURE and why is not None:
        return "reference", f"eager: not measured ({why})", True
    for b in registry.FAMILIES[family].auto:
        if b in registry.BACKENDS and registry.why_not(b, family, device, call) is None:
            return b, f"{b}: {'no rule of the policy for this call' if policy else 'not measured on this GPU'} " \
                      "(default)", True
    return "reference", ("eager: not measured on this GPU" if policy is None else
                         "eager: the policy measured no faster implementation for this call"), True
