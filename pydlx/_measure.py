"""Measured on first use, and the per-user cache of measured decisions.

Under the "measure" policy (``pydlx.use_policy("measure")``, ``PYDLX_POLICY=measure``, ``pydlx.optimize(model,
policy="measure")``), the first call of a (family, dtype, mode, shape bucket) on a GPU with no decision recorded for
it is measured before it runs (``first_use``): the family's *trial* (``pydlx/bench/<family>.py`` ``trial``: fresh
random inputs of the call's shapes, the fused entry point and the eager chain it replaces; the caller's tensors and
buffers are never touched, its random number streams are left as they were) runs

  1. in float64 through the eager chain: the reference;
  2. in the call's dtype through eager PyTorch and through each backend that can run the call: a backend whose
     output or gradients (training: forward + backward) are further from the reference than ``FACTOR`` times
     eager's error plus ``FLOOR_ULPS`` units in the last place is rejected as wrong on this card (``gate``), one
     that raises as failed;
  3. timed, eager and the correct backends interleaved (pydlx.bench ``measure``, CUDA events), and judged by the
     rule of policy files (``pydlx._policy.faster``): a backend wins when it is at least 1.05x eager by the medians
     and its p80 is below eager's median; else eager.

The decision (``Decision``) speaks for every call in its bucket (``registry.Family.bucket_of``: the batch-like sizes
rounded up to a power of two); later calls cost the dispatcher's dictionary lookup. It is written to the user cache
(``cache_dir()``: ``$PYDLX_CACHE_DIR``, else ``$XDG_CACHE_HOME/pydlx``, else ``~/.cache/pydlx``), one file per card,
stamped with what the timings depend on (``environment``: card, driver, CUDA, torch, Triton, pydlx and a digest of
its kernel sources): a file whose stamp differs is ignored and replaced by the next measurement; an unreadable or
unwritable one is left alone, with one warning, and decisions are kept in memory.

Nothing is timed while torch.compile or torch.export trace, under a dispatch mode or a torch.func transform, during
CUDA graph capture, under ``torch.use_deterministic_algorithms(True)``, in a distributed job (every rank must run the
same backend: ``share`` agrees on rank 0's decisions), or once the time budget is spent (``budget``: in total and per
bucket, wall time including compilation): those calls follow what is recorded, else eager. One measurement runs at a
time in a process (a lock); calls of other buckets do not wait.

Without "measure" (the default setting), ``auto`` still follows recorded decisions: those measured in this process
and the user cache's (written by first use or by ``python -m pydlx.tune``), exact bucket first, then the nearest
measured sizes (pydlx/_policy.py ``Policy.lookup``), then the policy shipped for the card.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib
import importlib.metadata
import json
import math
import os
import threading
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import registry
from ._env import getenv

VERSION = 1
FACTOR = 4.0  # a backend's largest error may be this many times eager's (same dtype, same inputs) ...
FLOOR_ULPS = 4.0  # ... plus this many units in the last place of the dtype at the tensor's largest magnitude
WARMUP_MS, REP_MS = 10, 50  # per timed function on a GPU (pydlx.bench.measure's warmup and rep)
SEED = 20261205  # the trials' inputs (a private generator)
LOCK_WAIT_S = 2.0  # how long a write waits for another process's lock on the user cache before giving up

Key = Tuple[str, str, str, str]  # (family, dtype name, mode, bucket)


# ----------------------------------------------------------------------------------------------- decisions
@dataclass(frozen=True)
class Decision:
    """One measured decision: ``backend`` ("reference": eager) for the calls of ``family`` in ``dtype`` and ``mode``
    whose shapes fall in ``bucket``; measured at ``shape`` (work ``size``) on ``device``. ``ratio``: eager's median
    time over the backend's (1.0 for eager), ``lo``..``hi`` the ratios the two p20..p80 spreads allow; ``checked``:
    each backend's verdict; ``spent_s``: what measuring it cost; ``source``: where the process got it."""
    family: str
    dtype: str
    mode: str
    bucket: str
    shape: str
    size: float
    backend: str
    ratio: float
    lo: float
    hi: float
    checked: Tuple[Tuple[str, str], ...]
    spent_s: float
    device: str
    capability: str
    source: str = "measured this process"

    @property
    def key(self) -> Key:
        return (self.family, self.dtype, self.mode, self.bucket)

    def describe(self) -> str:
        where = f"{self.device} (sm_{self.capability.replace('.', '')})"
        what = f"({self.family} {self.bucket} {self.dtype} {self.mode})"
        if self.backend != "reference":
            return (f"{self.backend}: {self.ratio:.2f}x eager ({self.lo:.2f}x-{self.hi:.2f}x), {self.source} on "
                    f"{where} {what}")
        verdicts = "; ".join(f"{b} {v}" for b, v in self.checked) or "no backend can run it"
        return f"eager: no backend measured faster, {self.source} on {where} {what}: {verdicts}"

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("source")
        d["checked"] = [list(c) for c in self.checked]
        return d

    @classmethod
    def from_json(cls, d: dict, source: str) -> "Decision":
        d = dict(d, checked=tuple(tuple(c) for c in d["checked"]), source=source)
        return cls(**d)


def key_of(family: str, call) -> Key:
    from ._policy import mode_name
    return (family, registry.DTYPE_NAMES.get(call.dtype, str(call.dtype)), mode_name(call.training),
            registry.FAMILIES[family].bucket_of(call))


@dataclass
class Budget:
    """What measuring on first use may spend, wall time including compilation: ``total_s`` in this process,
    ``per_shape_s`` per bucket (a backend not yet checked when it runs out is not measured). ``spent_s`` and
    ``measured`` count what it has spent."""
    total_s: float = 120.0
    per_shape_s: float = 15.0
    spent_s: float = 0.0
    measured: int = 0


_WARNED: set = set()


def _warn_once(what: str, message: str) -> None:
    if what not in _WARNED:
        _WARNED.add(what)
        warnings.warn(f"pydlx: {message}", RuntimeWarning, stacklevel=3)


def budget_from_env() -> Budget:
    """The budget PYDLX_MEASURE_BUDGET sets ("<total seconds>[,<seconds per bucket>]"), else the defaults."""
    text = (os.environ.get("PYDLX_MEASURE_BUDGET") or "").strip()
    if not text:
        return Budget()
    try:
        values = [float(v) for v in text.split(",")]
        if not 1 <= len(values) <= 2 or min(values) < 0:
            raise ValueError
    except ValueError:
        _warn_once("budget", f"PYDLX_MEASURE_BUDGET={text!r} is not '<total seconds>[,<seconds per bucket>]': the "
                             "defaults apply")
        return Budget()
    return Budget(*values)


BUDGET = budget_from_env()
_LOCK = threading.RLock()
_PROCESS: Dict[Key, Decision] = {}  # measured (or shared) in this process
_SHARED: List[Optional[int]] = [None]  # the rank whose decisions ``share`` installed (then the only recorded ones)
_generation = [0]  # bumped on every change of recorded decisions (the size-rule policies are rebuilt)


# set by pydlx/_backend.py (which imports this module): "force" is its use_backend (the trials run each backend
# forced), "changed" its clear_caches (a new decision must be seen by calls whose decision was kept); set by
# pydlx/tune.py while it measures a model: "watch(family, call)" sees each call's lookup, "exclude(family)" names
# backends to leave out, "progress(decision)" sees each decision recorded
HOOKS: Dict[str, Callable] = {}


def _changed() -> None:
    _generation[0] += 1
    HOOKS["changed"]()


# ----------------------------------------------------------------------------------------------- environment
def cache_dir() -> Path:
    """Where measured decisions persist: ``$PYDLX_CACHE_DIR``, else ``$XDG_CACHE_HOME/pydlx``, else
    ``~/.cache/pydlx``."""
    env = getenv("PYDLX_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = getenv("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "pydlx"


def _driver() -> str:
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"{version.value // 1000}.{version.value % 1000 // 10}"
    except OSError:
        pass
    return "unknown"


_KERNELS: List[str] = []


def _kernels_digest() -> str:
    """A digest of the kernels' sources (the triton and cuda backends' modules, the built extension's size and
    time): a kernel changed without a version change still invalidates its timings."""
    if not _KERNELS:
        root = Path(__file__).resolve().parent
        h = hashlib.sha1()
        for path in sorted([*root.glob("triton/*.py"), *root.glob("cuda/*.py")]):
            h.update(path.name.encode())
            h.update(path.read_bytes())
        for path in sorted(root.glob("_C*")):
            st = path.stat()
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        _KERNELS.append(h.hexdigest()[:12])
    return _KERNELS[0]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def environment(device) -> Dict[str, str]:
    """What a measured decision depends on besides the call: it is valid only where all of this is the same."""
    from ._policy import device_key
    from ._version import __version__
    name, cc = device_key(device)
    return {"device": name, "capability": cc, "driver": _driver(), "cuda": torch.version.cuda or "none",
            "torch": torch.__version__, "triton": _version("triton"), "pydlx": __version__,
            "kernels": _kernels_digest()}


# ----------------------------------------------------------------------------------------------- the user cache
class UserCache:
    """The user cache's file for one card: its decisions, and its state in words (``state``)."""

    def __init__(self, env: Dict[str, str]):
        from ._policy import file_name
        self.env = env
        self.path = cache_dir() / "decisions" / file_name(env["device"], env["capability"])
        self.decisions: Dict[Key, Decision] = {}
        self.state = "empty"
        self.writable = True
        self._read()

    def _read(self) -> None:
        try:
            text = self.path.read_text()
        except (FileNotFoundError, NotADirectoryError):  # (nothing written yet)
            return
        except OSError as e:
            self._unusable(f"unreadable ({e})")
            return
        try:
            data = json.loads(text)
            if data.get("version") != VERSION:
                self.state = f"ignored: format version {data.get('version')!r}, this pydlx writes {VERSION}"
                return
            stale = {k: (v, self.env.get(k)) for k, v in data["env"].items() if self.env.get(k) != v}
            if stale:
                self.state = "invalidated (" + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in sorted(stale.items())) \
                             + "): remeasured"
                return
            for d in data["decisions"]:
                decision = Decision.from_json(d, "user cache")
                self.decisions[decision.key] = decision
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            self.decisions = {}
            self._unusable(f"corrupt ({type(e).__name__}: {e})")
            return
        self.state = f"{len(self.decisions)} decisions"

    def _unusable(self, why: str) -> None:
        self.state, self.writable = why, False
        _warn_once(("cache", str(self.path)), f"the user cache {self.path} is {why}; decisions are measured and "
                                                 "kept in memory (delete the file, or set PYDLX_CACHE_DIR)")

    def add(self, decisions: Sequence[Decision]) -> None:
        """Record ``decisions`` and write the file (merged with what another process wrote meanwhile)."""
        for d in decisions:
            self.decisions[d.key] = replace(d, source="user cache")
        if not self.writable:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.path.with_name(self.path.name + ".lock")):
                merged: Dict[Key, dict] = {}
                try:
                    data = json.loads(self.path.read_text())
                    if data.get("version") == VERSION and data.get("env") == self.env:
                        merged = {Decision.from_json(d, "").key: d for d in data["decisions"]}
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    pass  # (absent, stale or corrupt: replaced)
                for d in decisions:
                    merged[d.key] = d.to_json()
                tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                tmp.write_text(json.dumps({"version": VERSION, "env": self.env,
                                           "decisions": sorted(merged.values(), key=lambda d: (
                                               d["family"], d["dtype"], d["mode"], d["size"]))}, indent=1) + "\n")
                os.replace(tmp, self.path)
            self.state = f"{len(self.decisions)} decisions"
        except (OSError, TimeoutError) as e:
            self.writable = False
            self.state = f"unwritable ({e}); {len(self.decisions)} decisions in memory"
            _warn_once(("cache", str(self.path)), f"the user cache {self.path} cannot be written ({e}); decisions "
                                                     "are kept in memory (set PYDLX_CACHE_DIR to a writable folder)")


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock between processes (``flock``: released by the system when its holder dies, so it is never
    stale); waits at most LOCK_WAIT_S."""
    try:
        import fcntl
    except ImportError:  # (not POSIX: no lock; os.replace keeps the file whole)
        yield
        return
    with open(path, "a") as f:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} stayed locked for {LOCK_WAIT_S} s") from None
                time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_CACHES: Dict[tuple, UserCache] = {}


def user_cache(device) -> UserCache:
    """The user cache's file for ``device``'s card (read once per process and cache folder)."""
    env = environment(device)
    k = (str(cache_dir()), tuple(sorted(env.items())))
    with _LOCK:
        if k not in _CACHES:
            _CACHES[k] = UserCache(env)
        return _CACHES[k]


def forget(cache: bool = False) -> None:
    """Forget the decisions recorded in this process (and re-read the user cache on next use); ``cache``: also delete
    the user cache's files for every card."""
    with _LOCK:
        _PROCESS.clear()
        _SHARED[0] = None
        if cache:
            for path in (cache_dir() / "decisions").glob("*.json"):
                path.unlink()
        _CACHES.clear()
        _NEARBY.clear()
        BUDGET.spent_s, BUDGET.measured = 0.0, 0
    _changed()


# ----------------------------------------------------------------------------------------------- lookups
def distributed() -> bool:
    """A multi-process job (torch.distributed initialized, more than one rank)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sources(device) -> List[Dict[Key, Decision]]:
    """The recorded decisions, most specific first: this process's, then the user cache's; after ``share``, the
    shared ones only; in a distributed job that has not shared, none (ranks measure, and keep caches, apart)."""
    if _SHARED[0] is not None:
        return [_PROCESS]
    if distributed():
        return []
    return [_PROCESS, user_cache(device).decisions]


def recorded(family: str, device, call) -> Optional[Decision]:
    """The decision recorded for ``call``'s bucket, or None."""
    watch = HOOKS.get("watch")
    if watch is not None:
        watch(family, call)
    k = key_of(family, call)
    for table in _sources(device):
        d = table.get(k)
        if d is not None:
            return d
    return None


_NEARBY: Dict[tuple, object] = {}


def nearby(family: str, device, call):
    """The rule the recorded decisions of ``call``'s family, dtype and mode give it by size (pydlx/_policy.py
    ``Policy.lookup``: between two measured sizes their backend when they agree, else eager; within a factor of 2
    beyond them the nearest), or None."""
    from . import _policy
    tables = _sources(device)
    k = (_generation[0], tuple(id(t) for t in tables), tuple(len(t) for t in tables))
    policy = _NEARBY.get(k)
    if policy is None:
        merged: Dict[Key, Decision] = {}
        for table in reversed(tables):
            merged.update(table)
        if not merged:
            return None
        name, cc = _policy.device_key(device)
        policy = _policy.Policy({"version": _policy.VERSION, "device": name, "capability": cc,
                                 "commit": "nearby measured shapes (recorded)",
                                 "rules": [{"family": d.family, "dtype": d.dtype, "mode": d.mode, "size": d.size,
                                            "shape": d.bucket, "backend": d.backend, "ratio": d.ratio}
                                           for d in merged.values()]})
        _NEARBY.clear()
        _NEARBY[k] = policy
    return _policy.lookup(family, device, call, policy)


# ----------------------------------------------------------------------------------------------- first use
def _capturing(device) -> bool:
    try:
        return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    except (RuntimeError, AssertionError, AttributeError):
        return False


def why_not_now(device) -> Tuple[Optional[str], bool]:
    """(why a call cannot be measured now, whether that passes), or (None, False) if it can."""
    from ._tracing import traced
    if torch.compiler.is_compiling():
        return "torch.compile is tracing: it follows recorded decisions only", True
    if traced():
        return "traced or transformed (torch.export, a dispatch mode, torch.func): recorded decisions only", True
    if _capturing(device):
        return "a CUDA graph is being captured: recorded decisions only", True
    if torch.are_deterministic_algorithms_enabled():
        return "torch.use_deterministic_algorithms(True): recorded decisions only, never a fresh timing", True
    if distributed():
        return ("a distributed job: ranks time nothing and follow the decisions pydlx.tune.share() gave them all "
                "(measure before the job with python -m pydlx.tune)"), False
    if BUDGET.spent_s >= BUDGET.total_s:
        return f"the measuring budget is spent ({BUDGET.spent_s:.1f} s of {BUDGET.total_s:g} s)", False
    return None, False


def first_use(family: str, device, call) -> Tuple[Optional[Decision], Optional[str], bool]:
    """The "measure" policy's decision for a call with none recorded: (decision, None, False) when measured now, else
    (None, why not, whether that passes: a decision made without it must not be kept)."""
    why, passing = why_not_now(device)
    if why is not None:
        return None, why, passing
    with _LOCK:
        hit = recorded(family, device, call)  # (another thread may have measured it meanwhile)
        if hit is not None:
            return hit, None, False
        why, passing = why_not_now(device)
        if why is not None:
            return None, why, passing
        exclude = HOOKS.get("exclude")
        decision = measure(family, device, call, exclude(family) if exclude else None)
        if decision is None:
            return None, "measuring failed (see the warning)", False
        record([decision], device)
    return decision, None, False


def record(decisions: Sequence[Decision], device) -> None:
    """Keep ``decisions`` in this process and write them to the user cache (python -m pydlx.tune, first use)."""
    with _LOCK:
        for d in decisions:
            _PROCESS[d.key] = d
        user_cache(device).add(decisions)
    _changed()
    progress = HOOKS.get("progress")
    if progress is not None:
        for d in decisions:
            progress(d)


def trial_device(device) -> torch.device:
    """Where a call's trial runs: on its own device."""
    return torch.device(device)


def clock(fns: Dict[str, Callable[[], object]], device) -> Dict[str, Tuple[float, float, float]]:
    """{name: (median, p20, p80) ms} of the functions, timed interleaved (pydlx/_timing.py ``measure``)."""
    from ._timing import measure as timed
    device = torch.device(device)
    if device.type == "cuda":
        return timed(fns, device, warmup=WARMUP_MS, rep=REP_MS)
    return timed(fns, device)


def trial_of(family: str) -> Optional[Callable]:
    """The family's trial maker (``pydlx/bench/<family>.py`` ``trial(call, device, generator)``), or None."""
    try:
        module = importlib.import_module(f"pydlx.bench.{family}")
    except ImportError:
        return None
    return getattr(module, "trial", None)


def measure(family: str, device, call, exclude: Optional[Dict[str, str]] = None) -> Optional[Decision]:
    """Measure one call's bucket now (see the module docstring); None if the trial itself failed (warned once).
    ``exclude``: {backend: why} backends not to consider (python -m pydlx.tune --tests: their GPU tests failed)."""
    from ._policy import device_key
    t0 = time.perf_counter()
    eligible, checked = [], {}
    for b in registry.candidates():
        why = registry.why_not(b, family, device, call)
        if exclude and b in exclude:
            checked[b] = f"excluded: {exclude[b]}"
        elif why is None:
            eligible.append(b)
        else:
            checked[b] = f"cannot run it: {why}"
    name, cc = device_key(device)
    fam = registry.FAMILIES[family]
    k = key_of(family, call)
    base = dict(family=family, dtype=k[1], mode=k[2], bucket=k[3], shape=fam.bucket_of(call), size=fam.work(call),
                device=name, capability=cc)
    make = trial_of(family)
    try:
        winner, ratios = "reference", (1.0, 1.0, 1.0)
        if eligible and make is not None:
            winner, ratios = _run_trial(make, family, device, call, eligible, checked, t0)
        elif make is None and eligible:
            checked.update((b, "not measured: the family has no trial") for b in eligible)
    except Exception as e:  # noqa: BLE001  (a measurement never breaks the call: it runs eager)
        BUDGET.spent_s += time.perf_counter() - t0
        _warn_once(("measure", k), f"measuring {family} {k[3]} {k[1]} {k[2]} failed ({type(e).__name__}: {e}); "
                                   "that call runs eager")
        return None
    spent = time.perf_counter() - t0
    BUDGET.spent_s += spent
    BUDGET.measured += 1
    return Decision(**base, backend=winner, ratio=ratios[0], lo=ratios[1], hi=ratios[2],
                    checked=tuple((b, checked[b]) for b in sorted(checked)), spent_s=round(spent, 3))


@contextlib.contextmanager
def _isolated(device: torch.device):
    """The trial's surroundings: the caller's random number streams restored afterwards, autocast off (the call's
    dtype is already the one autocast chose), normal tensors even under inference_mode."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode(False), \
            torch.autocast(device.type, enabled=False):
        yield


def _run_trial(make, family, device, call, eligible, checked, t0) -> Tuple[str, Tuple[float, float, float]]:
    from ._policy import faster
    from ._timing import ratio
    use_backend = HOOKS["force"]
    run_on = trial_device(device)
    with _isolated(run_on):
        gen = torch.Generator(device=run_on).manual_seed(SEED)
        trial = make(call, run_on, gen)
        training = call.training
        wide = [t.double() for t in trial.inputs]
        grad = None
        if training:
            with torch.no_grad():
                shape = trial.eager(*wide).shape
            grad = torch.randn(shape, generator=gen, device=run_on, dtype=call.dtype)
        ref = _outputs(trial.eager, wide, training, None if grad is None else grad.double())
        eager_err = [_error(o, r) for o, r in zip(_outputs(trial.eager, trial.inputs, training, grad), ref)]
        correct = []
        for b in eligible:
            if time.perf_counter() - t0 > BUDGET.per_shape_s:
                checked[b] = f"not measured: the per-shape budget ({BUDGET.per_shape_s:g} s) ran out"
                continue
            try:
                with use_backend(b):
                    out = _outputs(trial.fused, trial.inputs, training, grad)
            except Exception as e:  # noqa: BLE001
                checked[b] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                continue
            bad = gate(out, ref, eager_err, call.dtype)
            if bad is not None:
                checked[b] = f"wrong: {bad}"
                continue
            correct.append(b)
        if not correct:
            return "reference", (1.0, 1.0, 1.0)
        fns = {"eager": _step(trial.eager, trial.inputs, training, grad, None)}
        fns.update((b, _step(trial.fused, trial.inputs, training, grad, b)) for b in correct)
        times = clock(fns, run_on)
    best, best_ratio = "reference", (1.0, 1.0, 1.0)
    for b in correct:
        r = ratio(times["eager"], times[b])
        checked[b] = f"correct, {r.median:.2f}x eager ({r.lo:.2f}x-{r.hi:.2f}x)"
        wins = faster(times["eager"], times[b])
        if wins is not None and wins > best_ratio[0]:
            best, best_ratio = b, (r.median, r.lo, r.hi)
    return best, best_ratio


def _outputs(fn, inputs, training: bool, grad) -> List[torch.Tensor]:
    """[output] of ``fn(*inputs)``, then (training) the gradient of every input for output gradient ``grad``."""
    if not training:
        with torch.no_grad():
            return [fn(*inputs)]
    leaves = [t.detach().requires_grad_() for t in inputs]
    with torch.enable_grad():
        y = fn(*leaves)
        if grad is None:
            return [y.detach()]
        grads = torch.autograd.grad(y, leaves, grad, allow_unused=True)
    return [y.detach(), *(g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves))]


def _step(fn, inputs, training: bool, grad, backend: Optional[str]) -> Callable[[], object]:
    """One timed call: the forward (inference), or forward and backward (training), on ``backend`` (None: eager)."""
    use_backend = HOOKS["force"]
    leaves = [t.detach().requires_grad_() for t in inputs] if training else inputs
    scope = (lambda: use_backend(backend)) if backend is not None else contextlib.nullcontext

    def run():
        with scope():
            if not training:
                with torch.no_grad():
                    return fn(*leaves)
            with torch.enable_grad():
                return torch.autograd.grad(fn(*leaves), leaves, grad, allow_unused=True)
    return run


def _error(out: torch.Tensor, ref: torch.Tensor) -> float:
    d = (out.double() - ref).abs()
    return float(d.nan_to_num(math.inf).max()) if d.numel() else 0.0


def gate(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor], eager_err: Sequence[float],
         dtype: torch.dtype) -> Optional[str]:
    """Why a backend's outputs (output, then each input's gradient) are wrong, or None: each tensor's largest error
    against the float64 reference may be FACTOR times eager's on the same inputs, plus FLOOR_ULPS units in the last
    place of ``dtype`` at the tensor's largest magnitude. A check against wrong kernels, not a precision test:
    the test suite's tolerances are tighter."""
    eps = torch.finfo(dtype).eps
    for i, (o, r, e) in enumerate(zip(outs, refs, eager_err)):
        if o.shape != r.shape:
            return f"{_name(i)}: shape {tuple(o.shape)}, expected {tuple(r.shape)}"
        err = _error(o, r)
        allow = FACTOR * e + FLOOR_ULPS * eps * (float(r.abs().max()) if r.numel() else 0.0)
        if not err <= allow:
            return f"{_name(i)} max error {err:.3g} > {allow:.3g} (eager's {e:.3g})"
    return None


def _name(i: int) -> str:
    return "output" if i == 0 else f"gradient of input {i - 1}"


# ----------------------------------------------------------------------------------------------- reports
def in_force(device) -> List[Decision]:
    """Every recorded decision ``auto`` follows on ``device`` (this process's over the user cache's)."""
    merged: Dict[Key, Decision] = {}
    for table in reversed(_sources(device)):
        merged.update(table)
    return sorted(merged.values(), key=lambda d: (d.family, d.dtype, d.mode, d.size))


def summary(family: str, dtype: torch.dtype, device=None) -> Optional[str]:
    """explain()'s line for a fused block of ``family`` in ``dtype`` from the decisions recorded on this GPU (the
    calls' shapes are not known before they run: every bucket measured), or None when none is recorded and the
    policy is not "measure"."""
    from ._policy import MEASURE, device_key, setting
    if not torch.cuda.is_available():
        return None
    current = setting()
    if current not in ("default", MEASURE):
        return None
    name, cc = device_key(device)
    dt = registry.DTYPE_NAMES.get(dtype)
    mine = [d for d in in_force(device) if d.family == family and d.dtype == dt]
    where = f"auto on {name} (sm_{cc.replace('.', '')})"
    if not mine:
        return f"{where}: measured on first use of each shape (none recorded yet)" if current == MEASURE else None
    parts = [f"{d.backend if d.backend != 'reference' else 'eager'} at {d.bucket} {d.mode}"
             + (f" ({d.ratio:.2f}x eager, {d.lo:.2f}x-{d.hi:.2f}x)" if d.backend != "reference" else "")
             + f" [{d.source}]" for d in mine]
    return f"{where}: measured: " + "; ".join(parts)


def status(device) -> str:
    """The recorded decisions' part of ``pydlx.backends()["policy"]``."""
    parts = []
    if BUDGET.measured or _PROCESS:
        parts.append(f"{sum(d.source == 'measured this process' for d in _PROCESS.values())} measured in this "
                     f"process ({BUDGET.spent_s:.1f} s of the {BUDGET.total_s:g} s budget)")
    if _SHARED[0] is not None:
        parts.append(f"{len(_PROCESS)} shared by rank {_SHARED[0]} (the user cache is not used)")
    elif distributed():
        parts.append("none followed: a distributed job follows recorded decisions once pydlx.tune.share() agreed on "
                     "them")
    else:
        cache = user_cache(device)
        parts.append(f"user cache {cache.path}: {cache.state}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------- ranks
def share(group=None, src: int = 0, device=None) -> int:
    """Agree on the decisions of a distributed job: a collective (every rank of ``group`` calls it, after
    ``init_process_group`` and before the first pydlx call that should follow them) that installs rank ``src``'s
    recorded decisions (its process's and its user cache's for its card) on every rank, as the only recorded
    decisions of the process. Ranks on another card than ``src``'s install none (and warn). Returns how many were
    installed here."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("pydlx.tune.share: torch.distributed is not initialized (call init_process_group first)")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    payload: list = [None]
    if dist.get_rank(group) == src:
        if device is None:
            payload[0] = {"env": None, "decisions": []}
        else:
            with _LOCK:
                tables = [_PROCESS] if _SHARED[0] is not None else [_PROCESS, user_cache(device).decisions]
                merged: Dict[Key, Decision] = {}
                for table in reversed(tables):
                    merged.update(table)
            payload[0] = {"env": environment(device), "decisions": [d.to_json() for d in merged.values()]}
    global_src = dist.get_global_rank(group, src) if group is not None else src
    dist.broadcast_object_list(payload, src=global_src, group=group)
    data = payload[0]
    mine = environment(device) if device is not None else None
    same = data["env"] is not None and mine is not None and (mine["device"], mine["capability"]) == (
        data["env"]["device"], data["env"]["capability"])
    with _LOCK:
        _PROCESS.clear()
        _SHARED[0] = src
        if same:
            for d in data["decisions"]:
                decision = Decision.from_json(d, f"shared by rank {src}")
                _PROCESS[decision.key] = decision
        elif data["decisions"]:
            _warn_once("share", f"pydlx.tune.share: rank {src}'s decisions were measured on another card "
                                f"({data['env']['device']}); this rank follows none")
    _changed()
    return len(_PROCESS)
