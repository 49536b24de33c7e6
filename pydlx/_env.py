"""Reads of pydlx's environment variables (PYDLX_BACKEND, PYDLX_POLICY) cheap enough for every call.

``os.environ.get`` of an unset variable costs about a microsecond (a KeyError raised and caught inside), which the
dispatcher would pay twice per op call. On CPython for POSIX, ``os.environ`` keeps its values in ``posix.environ``
(bytes keys), updated by every assignment through ``os.environ``: a plain dictionary lookup there sees the same
values. Elsewhere, ``os.environ.get``.
"""
from __future__ import annotations

import os
from typing import Optional

try:
    import posix
    _DATA = posix.environ if getattr(os.environ, "_data", None) is posix.environ else None
except ImportError:  # (not POSIX)
    _DATA = None


def getenv(name: str) -> Optional[str]:
    """``os.environ.get(name)``."""
    if _DATA is None:
        return os.environ.get(name)
    value = _DATA.get(_KEYS.get(name) or _key(name))
    return None if value is None else os.fsdecode(value)


_KEYS: dict = {}


def _key(name: str) -> bytes:
    _KEYS[name] = os.fsencode(name)
    return _KEYS[name]
