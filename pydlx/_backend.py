"""Backend selection: which implementation runs a pydlx op.

Backends:
  reference  eager PyTorch (pydlx/reference): runs anywhere, the CPU fallback and the test oracle.
  triton     Triton kernels (pydlx/triton): CUDA tensors on sm_80+, or CPU tensors under TRITON_INTERPRET=1.
  cuda       the C++/CUDA extension pydlx._C (csrc/): CUDA tensors, when the extension is built or JIT-built.

Rules:
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
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Dict, Iterator, Optional, Tuple

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

    x = torch.zeros(2, dtype=torch.int32)
    try:
        _probe[(1,)](x, 2)
    except Exception:  # noqa: BLE001
        return False
    return x.tolist() == [0, 1]


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
    """What each backend can do on this machine, and for those that cannot run, why; and the measured policy
    ``auto`` follows on this machine's GPU (or why there is none)."""
    from . import _policy

    return {"reference": "available", "triton": triton_status(), "cuda": cuda_status(), "policy": _policy.status()}


def why_triton_cannot(t: torch.Tensor) -> Optional[str]:
    """None if the triton backend can run on tensors like ``t``, else the reason."""
    err = _triton_import_error()
    if err:
        return err
    if t.device.type == "cpu":
        if not triton_interpret():
            return "CPU tensors need TRITON_INTERPRET=1 for the triton backend"
        # (not while torch.compile traces: Dynamo cannot trace the numpy probe, and ignores the cache around it)
        return None if torch.compiler.is_compiling() else _interpreter_error()
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


# ------------------------------------------------------------------------------------------------ the dispatcher
@dataclass(frozen=True)
class Family:
    """One family's table row: its implementations are pydlx/{reference,triton,cuda}/<name>.py (one signature per
    family, e.g. linear_fwd / linear_bwd in each), and what ``auto`` runs on a GPU that has no measured policy."""
    name: str
    unmeasured_auto: Tuple[str, ...]  # best first; then the reference (eager PyTorch: cuDNN / cuBLAS)


FAMILIES: Dict[str, Family] = {
    # the Triton GEMM with the activation in its epilogue; the cuda backend is cuBLAS + a fused pointwise kernel
    "linear": Family("linear", ("triton", "cuda")),
    # the fused MLP kernels (layers <= 128 wide); csrc/mlp.cu's forward is not chosen until measured
    "mlp": Family("mlp", ("triton",)),
    # eager (cuDNN) until measured: the kernels run when forced or when a policy measured them faster
    "conv_relu_pool": Family("conv_relu_pool", ()),
    "lstm": Family("lstm", ()),
}


def implementation(family: str, backend: str) -> ModuleType:
    """The module implementing ``family`` on ``backend``: pydlx/<backend>/<family>.py (imported on first use, by
    import statements that torch.compile can trace)."""
    if backend == "reference":
        from .reference import MODULES
        return MODULES[family]
    if backend == "triton":
        from .triton import conv_relu_pool, linear, lstm, mlp
    elif backend == "cuda":
        from .cuda import conv_relu_pool, linear, lstm, mlp
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return {"linear": linear, "mlp": mlp, "conv_relu_pool": conv_relu_pool, "lstm": lstm}[family]


def on_gpu(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def cpu_auto(t: torch.Tensor) -> bool:
    """A CPU tensor under ``auto``: the entry points call the reference directly (plain eager PyTorch: a custom
    op's Python dispatch costs ~0.1 ms a call, which would make a swapped-in model slower on the CPU)."""
    return t.device.type == "cpu" and current_backend() == "auto"


def choose(family: str, t: torch.Tensor, op: Optional[str] = None,
           checks: Optional[Dict[str, Callable[[], Optional[str]]]] = None,
           call: Optional["CallKey"] = None) -> str:
    """The backend that runs one call of ``family`` on tensors like ``t``.

    ``checks[backend]()`` says why that backend cannot run this call's options (or None). Forced backend: that
    one, or BackendUnavailableError with the reason. ``auto``: CPU tensors -> reference; CUDA tensors -> what the
    GPU's measured policy says for ``call`` (dtype, mode, size; pydlx/_policy.py) when it has a rule, else the
    family's unmeasured default; a backend that cannot run the call is passed over, the reference last.
    """
    return decide(family, t, op, checks, call)[0]


def decide(family: str, t: torch.Tensor, op: Optional[str] = None,
           checks: Optional[Dict[str, Callable[[], Optional[str]]]] = None,
           call: Optional["CallKey"] = None) -> Tuple[str, str]:
    """(backend, why): ``choose`` with its reason, in words (explain() shows it)."""
    name = current_backend()
    base = {"reference": lambda: None, "triton": lambda: why_triton_cannot(t), "cuda": lambda: why_cuda_cannot(t)}
    checks = checks or {}

    def why(b: str) -> Optional[str]:
        return base[b]() or (checks[b]() if b in checks else None)

    if name != "auto":
        reason = why(name)
        if reason is not None:
            raise BackendUnavailableError(f"pydlx.{op or family}: backend {name!r} cannot run this call: {reason}")
        return name, f"{name}: forced"
    if not on_gpu(t):
        return "reference", "reference: not a CUDA tensor"
    from . import _policy

    rule = _policy.lookup(family, t.device, call) if call is not None else None
    if rule is not None:
        if rule.backend == "reference" or why(rule.backend) is None:
            return rule.backend, rule.describe()
    for b in FAMILIES[family].unmeasured_auto:
        if why(b) is None:
            reason = "no rule of the policy for this call" if _policy.for_device(t.device) else \
                "not measured on this GPU"
            return b, f"{b}: {reason} (default)"
    return "reference", "eager: not measured on this GPU" if not _policy.for_device(t.device) else \
        "eager: the policy measured no faster implementation for this call"


@dataclass(frozen=True)
class CallKey:
    """What the measured policy is keyed by: the computing dtype, inference or training, and a size (the
    family's work measure: pydlx/_policy.py ``size_of``)."""
    dtype: torch.dtype
    mode: str  # "inference" | "training"
    size: float
