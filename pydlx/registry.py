"""The registry: pydlx's op families and its backends, one row each. Everything that lists families or backends
(the dispatcher, measured policies, the benchmark CLI, the GPU check, the tests) derives its list from here.

A **family** (``Family``) is a group of ops that share their kernels' contract: its name, its *call descriptor* (a
NamedTuple of what a backend must know to say whether it can run a call: dtype, training or not, sizes, options),
the functions every implementation of it defines (``functions``, besides ``supports``), the *work measure* a
measured policy is keyed by, the format of its benchmark rows' shape column, and what ``auto`` runs on a GPU that
has no measured policy.

A **backend** (``Backend``) is one folder of implementations, ``pydlx/<backend>/<family>.py`` (or any package, or
objects given at registration), and one ``register_backend`` call. Each implementation module defines, for its
family, ``supports(call, device) -> reason or None`` (None: it can run that call) and the family's ``functions``
with the reference's signatures; the backend itself says which devices it runs on (``why_not_on``), which dtypes
its kernels take, and its line in ``pydlx.backends()``. The built-in backends register themselves in their
packages' ``__init__``: ``reference`` (eager PyTorch: the CPU fallback and the oracle), ``triton`` and ``cuda``.

Which backend runs a call is decided by the dispatcher (pydlx/_backend.py) from this registry, once per call
signature. docs/DEVELOPING.md has the recipes for adding an activation, a family and a backend.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import torch

from ._geometry import out_shape

# ----------------------------------------------------------------------------------------------- dtypes
DTYPE_NAMES: Dict[torch.dtype, str] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                                       torch.float64: "fp64"}
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton and C++/CUDA kernels compute in


# ----------------------------------------------------------------------------------------------- call descriptors
class LinearCall(NamedTuple):
    """act(x W^T + b) over M rows: K features in, N out (pydlx.ops.linear; the GEMM of linear_batchnorm's training
    form and of the LSTM's input projection run on the same backend)."""
    dtype: torch.dtype
    training: bool
    M: int
    N: int
    K: int


class MLPCall(NamedTuple):
    """The fused MLP over M rows, layer sizes (in, hidden..., out)."""
    dtype: torch.dtype
    training: bool
    M: int
    sizes: Tuple[int, ...]


class ConvCall(NamedTuple):
    """MaxPool2d(act(Conv2d(x))) (P = 1: no pool) of x (N, C, H, W) with strides ``strides``; K RxR filters."""
    dtype: torch.dtype
    training: bool
    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    stride: int
    padding: int
    P: int
    Q: int
    PP: int
    ceil_mode: bool
    activation: Optional[str]
    strides: Tuple[int, ...]

    def out_shape(self) -> Tuple[int, int, int, int]:
        """(HO, WO, HP, WP)."""
        return out_shape(self.H, self.W, self.R, self.stride, self.padding, self.P, self.Q, self.PP, self.ceil_mode)


class LSTMCall(NamedTuple):
    """One LSTM layer (or cell: T = 1, ``cell``) of T steps over B sequences, hidden H, output width P (proj_size,
    else H)."""
    dtype: torch.dtype
    training: bool
    T: int
    B: int
    H: int
    P: int
    cell: bool


# ----------------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    """One family's row. ``work(call)``: the size measured policies are keyed by; ``shape(**dims)`` / ``parse(text)``:
    a benchmark row's shape column and the work it stands for; ``policy_applies(call)``: whether measured rules speak
    for a call (variants no benchmark measured are left to the unmeasured default); ``auto``: the backends ``auto``
    runs on a GPU without a measured policy, best first (then eager PyTorch, the reference); ``bucket(call)``: the
    shape bucket of a call, named in the form of ``shape``, under which a decision measured on first use speaks for
    every call in it (the batch-like sizes rounded up to a power of two: ``pow2``)."""
    name: str
    call: type
    functions: Tuple[str, ...]
    work: Callable[..., float]
    shape: Callable[..., str]
    parse: Callable[[str], Optional[float]]
    auto: Tuple[str, ...] = ()
    policy_applies: Callable[..., bool] = lambda call: True
    bucket: Optional[Callable[..., str]] = None
    doc: str = ""

    def bucket_of(self, call) -> str:
        """The shape bucket a call's measured decision is kept under (pydlx/_measure.py): ``bucket(call)``, by default
        every field of the descriptor but dtype and training (which a decision is keyed by besides)."""
        if self.bucket is not None:
            return self.bucket(call)
        return ",".join(f"{k}={v}" for k, v in zip(call._fields, call) if k not in ("dtype", "training"))


def pow2(n: int) -> int:
    """``n`` rounded up to a power of two (0 stays 0): the batch-like sizes of a shape bucket."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _conv_bucket(c) -> str:
    layout = " channels_last" if len(c.strides) == 4 and c.strides[1] == 1 and c.C > 1 else ""
    return _conv_shape(pow2(c.N), c.C, c.H, c.W, c.K, c.R, c.stride, c.padding, c.P, c.Q, c.PP, c.ceil_mode,
                       c.activation or "none") + layout


def _lstm_bucket(c) -> str:
    return (f"cell {pow2(c.B)}x{c.H}" if c.cell else f"{pow2(c.T)}:{pow2(c.B)}x{c.H}") + \
        (f" proj{c.P}" if c.P != c.H else "")


def _ints(pattern: str, text: str) -> Optional[Tuple[int, ...]]:
    m = re.fullmatch(pattern, text)
    return tuple(int(v) for v in m.groups()) if m else None


def _parse_linear(text: str) -> Optional[float]:
    v = _ints(r"(\d+)x(\d+)x(\d+)", text)
    return float(v[0]) * v[1] * v[2] if v else None


def _mlp_work(M: int, sizes) -> float:
    return float(M) * sum(a * b for a, b in zip(sizes, sizes[1:]))


def _parse_mlp(text: str) -> Optional[float]:
    m = re.fullmatch(r"(\d+):(\d+(?:-\d+)+)", text)
    return _mlp_work(int(m.group(1)), [int(s) for s in m.group(2).split("-")]) if m else None


def _conv_work(N: int, C: int, H: int, W: int, K: int, R: int, stride: int, padding: int) -> float:
    HO, WO, _, _ = out_shape(H, W, R, stride, padding, 1, 1)
    return float(N) * K * C * R * R * HO * WO


def _conv_shape(N, C, H, W, K, R, stride, padding, P, Q, PP=0, ceil_mode=False, words=None) -> str:
    """``N,C,H,W->K RxR sS pP poolP/Q[pPP][ceil]`` (``nopool`` for P = 1), with ``words`` (the activation, a
    BatchNorm) before the pool when given."""
    base = f"{N},{C},{H},{W}->{K} {R}x{R} s{stride} p{padding}"
    pool = (f"pool{P}/{Q}" + (f"p{PP}" if PP else "") + ("ceil" if ceil_mode else "")) if P > 1 else "nopool"
    return f"{base} {pool}" if words is None else f"{base} {words} {pool}"


def _parse_conv(text: str) -> Optional[float]:
    m = re.match(r"(\d+),(\d+),(\d+),(\d+)->(\d+) (\d+)x\d+ s(\d+) p(\d+)", text)
    return _conv_work(*(int(v) for v in m.groups())) if m else None


def _parse_lstm(text: str) -> Optional[float]:
    v = _ints(r"(\d+):(\d+)x(\d+)", text)
    return float(v[0]) * v[1] * v[2] ** 2 if v else None


FAMILIES: Dict[str, Family] = {f.name: f for f in (
    Family("linear", LinearCall, ("linear_fwd", "linear_bwd"),
           work=lambda c: float(c.M) * c.N * c.K, shape=lambda M, N, K: f"{M}x{N}x{K}", parse=_parse_linear,
           # the Triton GEMM with the activation in its epilogue; then cuBLAS + a fused pointwise kernel
           auto=("triton", "cuda"), bucket=lambda c: f"{pow2(c.M)}x{c.N}x{c.K}",
           doc="act(x W^T + b): a GEMM with the activation in its epilogue"),
    Family("mlp", MLPCall, ("mlp_fwd", "mlp_bwd"),
           work=lambda c: _mlp_work(c.M, c.sizes), shape=lambda M, sizes: f"{M}:{'-'.join(map(str, sizes))}",
           parse=_parse_mlp, bucket=lambda c: f"{pow2(c.M)}:{'-'.join(map(str, c.sizes))}",
           # the fused MLP kernels; csrc/mlp.cu's forward only where a policy measured it faster
           auto=("triton",), doc="Linear -> act -> ... -> Linear, every layer in one kernel"),
    Family("conv_relu_pool", ConvCall, ("conv_relu_pool_fwd", "conv_relu_pool_bwd"),
           work=lambda c: _conv_work(c.N, c.C, c.H, c.W, c.K, c.R, c.stride, c.padding), shape=_conv_shape,
           parse=_parse_conv, bucket=_conv_bucket,
           # rules are measured on the ReLU + floor-mode unpadded pool blocks the benchmarks time
           policy_applies=lambda c: c.activation == "relu" and c.P > 1 and c.PP == 0 and not c.ceil_mode,
           doc="MaxPool2d(act(Conv2d(x))) writing only its output"),
    Family("lstm", LSTMCall, ("lstm_fwd", "lstm_bwd"),
           work=lambda c: float(c.T) * c.B * c.H * c.H, shape=lambda T, B, H: f"{T}:{B}x{H}", parse=_parse_lstm,
           bucket=_lstm_bucket,
           doc="one LSTM layer's recurrence over a whole sequence (the GEMMs around it: the same backend's linear)"),
)}


def register_family(family: Family) -> Family:
    """Add a family (a package outside pydlx; pydlx's own are rows of ``FAMILIES`` above). Registered backends whose
    package has a ``<package>.<family>`` module now offer it. Returns it."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", family.name):
        raise ValueError(f"pydlx.registry.register_family: a family name is lowercase letters, digits and _, got "
                         f"{family.name!r}")
    FAMILIES[family.name] = family
    for backend in list(BACKENDS.values()):
        register_backend(backend)  # (finds the new family's modules)
    return family


def unregister_family(name: str) -> None:
    """Remove a family added by ``register_family``."""
    FAMILIES.pop(name)
    for backend in list(BACKENDS.values()):
        backend.implementations = {f: i for f, i in backend.implementations.items() if f != name}
        register_backend(backend)


# ----------------------------------------------------------------------------------------------- backends
@dataclass
class Backend:
    """One backend's row. Implementations: ``implementations[family]`` when given, else the module
    ``<package>.<family>`` where it exists. ``why_not_on(device)``: why it cannot run on a device (None: it can);
    ``dtypes``: the dtypes it computes in (None: any floating dtype); ``status()``: its ``pydlx.backends()`` line;
    ``candidate``: whether a measured policy may choose it (the reference is the baseline every candidate is
    measured against)."""
    name: str
    package: Optional[str] = None
    implementations: Mapping[str, object] = field(default_factory=dict)
    why_not_on: Callable[[torch.device], Optional[str]] = lambda device: None
    dtypes: Optional[Tuple[torch.dtype, ...]] = None
    status: Callable[[], str] = lambda: "available"
    candidate: bool = True
    doc: str = ""
    _loaders: Dict[str, Callable[[], object]] = field(default_factory=dict, repr=False)
    _loaded: Dict[str, object] = field(default_factory=dict, repr=False)  # the loaders' modules, once imported

    def implements(self, family: str) -> bool:
        return family in self.implementations or family in self._loaders


BACKENDS: Dict[str, Backend] = {}
_listeners = []  # called after every registration (the dispatcher drops its kept decisions)
_FOUND: Dict[str, Dict[str, object]] = {}  # family -> {backend: implementation}, as ``implementation`` found them


def found(family: str) -> Dict[str, object]:
    """{backend: implementation} of ``family`` as ``implementation`` returned them to eager calls: one dictionary per
    family for the life of the process, emptied on every registration, so that an op's implementation can read
    ``found(family).get(backend)`` (a lookup, no call) and call ``implementation`` only when that misses."""
    return _FOUND.setdefault(family, {})


def _forget_found() -> None:
    for kept in _FOUND.values():
        kept.clear()


_listeners.append(_forget_found)


def _loader(module: str) -> Callable[[], object]:
    """A function importing ``module`` by an import statement: torch.compile traces it (importing the module when
    a compiled model's first call is the process's first pydlx call), which it would not do through importlib."""
    namespace: dict = {}
    exec(compile(f"def load():\n    import {module} as m\n    return m\n", f"<pydlx: import {module}>", "exec"),
         namespace)  # noqa: S102  (a fixed statement over a checked module name)
    return namespace["load"]


def register_backend(backend: Backend) -> Backend:
    """Add (or replace) a backend: ``pydlx.use_backend(backend.name)`` runs it, ``auto`` may choose it where a
    measured policy says so, and the benchmarks and the GPU check measure it. Its package's family modules are
    found now (not imported: a Triton module imports Triton on first use). Returns it."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", backend.name) or backend.name == "auto":
        raise ValueError(f"pydlx.registry.register_backend: a backend name is lowercase letters, digits and _ "
                         f"(not 'auto'), got {backend.name!r}")
    unknown = set(backend.implementations) - set(FAMILIES)
    if unknown:
        raise ValueError(f"pydlx.registry.register_backend: unknown families {sorted(unknown)} (known: "
                         f"{', '.join(FAMILIES)})")
    backend._loaders, backend._loaded = {}, {}
    if backend.package is not None:
        for family in FAMILIES:
            name = f"{backend.package}.{family}"
            if family not in backend.implementations and importlib.util.find_spec(name) is not None:
                backend._loaders[family] = _loader(name)
    BACKENDS[backend.name] = backend
    for fn in _listeners:
        fn()
    return backend


def unregister_backend(name: str) -> None:
    """Remove a backend added by ``register_backend``."""
    BACKENDS.pop(name)
    for fn in _listeners:
        fn()


def backend_names() -> Tuple[str, ...]:
    return tuple(BACKENDS)


def candidates() -> Tuple[str, ...]:
    """The backends a measured policy may choose (all but the reference, the baseline)."""
    return tuple(b.name for b in BACKENDS.values() if b.candidate)


def implementation(family: str, backend: str):
    """The object (a module) implementing ``family`` on ``backend``, or None if the backend has none. A package's
    module is imported on first use: the Triton kernels' modules import Triton, which ``import pydlx`` does not."""
    b = BACKENDS[backend]
    impl = b.implementations.get(family)
    compiling = torch.compiler.is_compiling()  # (a trace imports through ``load``: no guard on the kept modules)
    if impl is None and not compiling:
        impl = b._loaded.get(family)
    if impl is None:
        load = b._loaders.get(family)
        if load is None:
            return None
        impl = load()
        if not compiling:
            b._loaded[family] = impl
    if not compiling:
        _FOUND.setdefault(family, {})[backend] = impl  # (``found``, written out)
    return impl


def why_not(backend: str, family: str, device: torch.device, call) -> Optional[str]:
    """None if ``backend`` can run ``call`` (a ``FAMILIES[family].call``) on ``device``, else why not: the backend's
    device, its dtypes, whether it implements the family, and its implementation's ``supports(call, device)``."""
    b = BACKENDS.get(backend)
    if b is None:
        return f"no backend {backend!r} is registered (registered: {', '.join(BACKENDS)})"
    reason = b.why_not_on(device)
    if reason is not None:
        return reason
    if b.dtypes is not None and call.dtype not in b.dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in b.dtypes)
        return f"dtype {call.dtype} is not supported by the {backend} backend (supported: {names})"
    impl = implementation(family, backend)
    if impl is None:
        return f"the {backend} backend has no {family} implementation"
    return impl.supports(call, device)


__all__ = ["Family", "Backend", "FAMILIES", "BACKENDS", "LinearCall", "MLPCall", "ConvCall", "LSTMCall",
           "DTYPE_NAMES", "KERNEL_DTYPES", "register_family", "unregister_family", "register_backend",
           "unregister_backend", "backend_names", "candidates", "implementation", "why_not"]
