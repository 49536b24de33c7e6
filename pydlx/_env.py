"""Reads of pydlx's environment variables (PYDLX_BACKEND, PYDLX_POLICY) cheap enough for every call.

``os.environ.get`` of an unset variable costs about a microsecond (a KeyError raised and caught inside), which the
dispatcher would pay twice per op call. On CPython for POSIX, ``os.environ`` keeps its values in ``posix.environ``
(bytes keys), updated by every assignment through ``os.environ``: a plain dictionary lookup there sees the same
values. Elsewhere, ``os.environ.get``.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from typing import Iterator, Optional

import torch

try:
    import posix
    # the environment as os.environ keeps it (bytes keys and values; None off POSIX): ``DATA.get(key(name))``
    DATA = posix.environ if getattr(os.environ, "_data", None) is posix.environ else None
except ImportError:  # (not POSIX)
    DATA = None


def getenv(name: str) -> Optional[str]:
    """``os.environ.get(name)``."""
    if DATA is None:
        return os.environ.get(name)
    value = DATA.get(_KEYS.get(name) or key(name))
    return None if value is None else os.fsdecode(value)


def key(name: str) -> bytes:
    """The variable's name as ``DATA``'s key."""
    _KEYS[name] = os.fsencode(name)
    return _KEYS[name]


# the variables read on every call, encoded up front: filled lazily, the dictionary would change between a
# torch.compile trace that reads it and the next call, and Dynamo's guard on it would recompile the model once
_KEYS: dict = {name: os.fsencode(name) for name in ("PYDLX_BACKEND", "PYDLX_POLICY")}


# ----------------------------------------------------------------------------------------------- scoped choices
class Scope:
    """A stack of choices made by a ``with`` block (``use_backend``, ``use_policy``) that holds for the code inside it
    in this thread and asyncio task only: kept in a context variable (a new thread starts empty; each asyncio task
    runs in a copy of its creator's context). Under torch.compile, a Dynamo that cannot read context variables
    (torch < 2.14: "call_method ContextVar get" is unsupported) reads a per-thread mirror instead, which it guards;
    with tasks interleaving inside blocks on one thread, a compiled region there may see another task's choice.

    The readers on the hot path write ``get`` out (``var.get()`` / ``getattr(mirror, "stack", ())``)."""

    def __init__(self, name: str):
        self.var: contextvars.ContextVar = contextvars.ContextVar(f"pydlx_{name}", default=())
        self.mirror = threading.local()  # .stack

    def get(self) -> tuple:
        if DYNAMO_READS_CONTEXTVARS or not torch.compiler.is_compiling():
            return self.var.get()
        return getattr(self.mirror, "stack", ())

    @contextlib.contextmanager
    def push(self, value) -> Iterator[None]:
        token = self.enter(value)
        try:
            yield
        finally:
            self.leave(token)

    def enter(self, value):
        """``push`` without the ``with``: returns the token ``leave`` takes (a hook pair around a forward)."""
        stack = self.var.get() + (value,)
        token = self.var.set(stack)
        self.mirror.stack = stack
        return token

    def leave(self, token) -> None:
        self.var.reset(token)
        self.mirror.stack = self.var.get()  # (this task's again: tasks may leave their blocks in any order)


DYNAMO_READS_CONTEXTVARS = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)
