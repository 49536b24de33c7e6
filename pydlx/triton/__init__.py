"""The ``triton`` backend: Triton kernels and their launchers, one module per family (pydlx/triton/<family>.py; no
autograd, no modules). This package registers the backend and says where it runs; it does not import Triton,
which the family modules import on first use (``import pydlx`` stays light, and Triton is optional).

It runs on CUDA tensors on sm_80 and newer GPUs, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1,
set before Triton is imported: how the kernels are tested on machines without a GPU)."""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from .. import registry


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton cannot be imported: {type(e).__name__}: {e}"
    return None


@functools.lru_cache(maxsize=None)
def _interpreter_error() -> Optional[str]:
    """Why Triton's interpreter (TRITON_INTERPRET=1) cannot run here, or None: it computes with numpy, and before
    triton-lang/triton#9171 was fixed (Triton 3.6 has it, 3.8 not) it fails with numpy >= 2.4, which no longer
    converts a 1-element array to a Python int ("only 0-dimensional arrays can be converted to Python scalars")."""
    try:
        import numpy
    except Exception as e:  # noqa: BLE001
        return (f"Triton's interpreter needs numpy, which cannot be imported ({type(e).__name__}: {e}); "
                "pip install numpy")
    if not _numpy_strict_scalars() or _interpreter_loops_work():
        return None  # numpy < 2.4: every Triton's interpreter runs; else this Triton's has the fix
    import triton

    return (f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} (>= 2.4 no longer "
            "converts 1-element arrays to scalars; triton-lang/triton#9171, fixed in later Triton): "
            "pip install 'numpy<2.4', or a newer triton")


def _numpy_strict_scalars() -> bool:
    """numpy >= 2.4: int() of a 1-element array raises."""
    import numpy

    try:
        int(numpy.array([1]))
        return False
    except TypeError:
        return True


def _interpreter_loops_work() -> bool:
    """A one-program kernel looping over a runtime bound, run by the interpreter (the construct #9171 breaks)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(x_ptr, n):
        for i in range(0, n):
            tl.store(x_ptr + i, i)

    from torch.utils._python_dispatch import _disable_current_modes

    # (outside any torch.func transform and dispatch mode the first triton call may run under: the answer is kept)
    with torch._C._DisableFuncTorch(), _disable_current_modes():
        x = torch.zeros(2, dtype=torch.int32)
        try:
            _probe[(1,)](x, 2)
        except Exception:  # noqa: BLE001
            return False
        return x.tolist() == [0, 1]


def status() -> str:
    err = _import_error()
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


def why_not_on(device: torch.device) -> Optional[str]:
    """None if the triton backend can run on tensors of ``device``, else the reason."""
    # (while torch.compile traces, past the cache: Dynamo traces through an lru_cache wrapper and warns about it)
    err = (_import_error.__wrapped__ if torch.compiler.is_compiling() else _import_error)()
    if err:
        return err
    if device.type == "cpu":
        if not triton_interpret():
            return "CPU tensors need TRITON_INTERPRET=1 for the triton backend"
        # (not while torch.compile traces: Dynamo cannot trace the numpy probe, and ignores the cache around it)
        return None if torch.compiler.is_compiling() else _interpreter_error()
    if device.type != "cuda":
        return f"device {device} is not supported by the triton backend"
    if triton_interpret():
        return "TRITON_INTERPRET=1 is set: the triton backend runs on CPU tensors only"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"the triton backend needs sm_80 or newer, device {device} is sm_{major}x"
    return None


BACKEND = registry.register_backend(registry.Backend(
    "triton", package=__name__, why_not_on=why_not_on, dtypes=registry.KERNEL_DTYPES, status=status,
    doc="Triton kernels: CUDA tensors on sm_80+, or CPU tensors under TRITON_INTERPRET=1"))
