"""Backend selection: which implementation runs a pydlx op.

Backends:
  reference  eager PyTorch (pydlx/reference): runs anywhere, the CPU fallback and the test oracle.
  triton     Triton kernels (pydlx/triton): CUDA tensors on sm_80+, or CPU tensors under TRITON_INTERPRET=1.
  cuda       the C++/CUDA extension pydlx._C (csrc/): CUDA tensors, when the extension is built or JIT-built.

Rules (DESIGN.md):
  * ``auto`` picks per call from the call's device, dtype and shape; CPU tensors get ``reference``.
  * A forced backend (``use_backend`` or ``PYDLX_BACKEND``) that cannot run a call raises
    ``BackendUnavailableError`` saying why. It never falls back silently.

The choice is process-wide (a stack, not thread-local): autograd runs CUDA backward passes on its own
worker threads, and those must see the backend that the forward was called under.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Dict, Iterator, Optional

import torch

BACKENDS = ("reference", "triton", "cuda")
CHOICES = ("auto",) + BACKENDS

_stack: list = []


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this call (missing package, wrong device, unsupported option)."""


def _check_name(name: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"pydlx backend must be one of {CHOICES}, got {name!r}")
    return name


def current_backend() -> str:
    """The backend in force: the innermost ``use_backend``, else ``PYDLX_BACKEND``, else ``auto``."""
    if _stack:
        return _stack[-1]
    return _check_name(os.environ.get("PYDLX_BACKEND", "auto").strip().lower() or "auto")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run pydlx ops inside the block on backend ``name`` (``auto``, ``reference``, ``triton``, ``cuda``)."""
    _stack.append(_check_name(name))
    try:
        yield
    finally:
        _stack.pop()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton cannot be imported: {type(e).__name__}: {e}"
    return None


@functools.lru_cache(maxsize=None)
def _interpreter_error() -> Optional[str]:
    """Why Triton's interpreter (TRITON_INTERPRET=1) cannot run here, or None: it computes with numpy."""
    try:
        import numpy  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return (f"Triton's interpreter needs numpy, which cannot be imported ({type(e).__name__}: {e}); "
                "pip install numpy")
    return None


def triton_status() -> str:
    err = _triton_import_error()
    if err:
        return err
    import triton

    if triton_interpret():
        if _interpreter_error():
            return f"unavailable (triton {triton.__version__}, TRITON_INTERPRET=1): {_interpreter_error()}"
        return f"available (triton {triton.__version__}, TRITON_INTERPRET=1: CPU tensors via the interpreter)"
    if not torch.cuda.is_available():
        hint = ("set TRITON_INTERPRET=1 to run on CPU" if not _interpreter_error() else
                f"TRITON_INTERPRET=1 would run on CPU, but {_interpreter_error()}")
        return f"installed (triton {triton.__version__}) but no CUDA device; {hint}"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"installed (triton {triton.__version__}) but the GPU is sm_{major}{minor}; pydlx needs sm_80+"
    return f"available (triton {triton.__version__})"


def cuda_status() -> str:
    from . import _ext

    return _ext.status()


def backends() -> Dict[str, str]:
    """What each backend can do on this machine, and for those that cannot run, why."""
    return {"reference": "available", "triton": triton_status(), "cuda": cuda_status()}


def why_triton_cannot(t: torch.Tensor) -> Optional[str]:
    """None if the triton backend can run on tensors like ``t``, else the reason."""
    err = _triton_import_error()
    if err:
        return err
    if t.device.type == "cpu":
        if not triton_interpret():
            return "CPU tensors need TRITON_INTERPRET=1 for the triton backend"
        return _interpreter_error()
    if t.device.type != "cuda":
        return f"device {t.device} is not supported by the triton backend"
    if triton_interpret():
        return "TRITON_INTERPRET=1 is set: the triton backend runs on CPU tensors only"
    major, _ = torch.cuda.get_device_capability(t.device)
    if major < 8:
        return f"the triton backend needs sm_80 or newer, device {t.device} is sm_{major}x"
    return None


def why_cuda_cannot(t: torch.Tensor) -> Optional[str]:
    from . import _ext

    if t.device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got a tensor on {t.device}"
    if not _ext.load():
        return "the C++/CUDA extension pydlx._C is unavailable: " + _ext.status()
    return None


def choose(op: str, t: torch.Tensor, auto_order: Callable[[torch.Tensor], tuple],
           extra_check: Optional[Dict[str, Callable[[], Optional[str]]]] = None) -> str:
    """Pick the backend that runs one call of ``op`` on tensors like ``t``.

    ``auto_order(t)`` lists the backends to try under ``auto``, best first, from measurements;
    ``extra_check[backend]()`` returns why that backend cannot run this call's options (or None).
    """
    name = current_backend()
    checks = {
        "reference": lambda: None,
        "triton": lambda: why_triton_cannot(t),
        "cuda": lambda: why_cuda_cannot(t),
    }
    extra_check = extra_check or {}

    def why(b: str) -> Optional[str]:
        return checks[b]() or (extra_check[b]() if b in extra_check else None)

    if name != "auto":
        reason = why(name)
        if reason is not None:
            raise BackendUnavailableError(f"pydlx.{op}: backend {name!r} cannot run this call: {reason}")
        return name
    if t.device.type == "cpu":
        return "reference"
    for b in auto_order(t):
        if why(b) is None:
            return b
    return "reference"
