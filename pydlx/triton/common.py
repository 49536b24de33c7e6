"""Shared pieces of pydlx's Triton kernels: activation functions and their derivatives, the dot and the cast
(with the interpreter's bf16 workarounds), and the host-side launch rule (Tuned: autotune / fixed config)."""
from __future__ import annotations

import collections
import contextlib
import sys
import weakref
from typing import Callable, Dict, Iterator, List, Sequence

import torch
import triton
import triton.language as tl
try:  # (Triton's launch internals the direct launch reads, Triton >= 3.4; without them every launch takes its run)
    from triton import knobs as _knobs
    from triton.runtime.driver import driver as _driver
    from triton.runtime.jit import JITFunction, compute_cache_key as _cache_key
except ImportError:  # pragma: no cover (an older Triton)
    _knobs = _driver = _cache_key = None
    JITFunction = ()

from . import triton_interpret
from .. import _backend, activations
from .._env import DATA, getenv, key as env_key

# An activation reaches a kernel as a code and its parameter (ACT, ALPHA: a float constexpr, leaky_relu's slope, elu's
# alpha, 0.0 for the others): ``act_args(spec)``. The codes are pydlx/activations.py's table; the formulas below are
# keyed by the names bound here from it.
act_args = activations.code
NONE = tl.constexpr(activations.NONE_CODE)
RELU, GELU, GELU_TANH, SILU, TANH, SIGMOID, LEAKY_RELU, ELU, HARDSWISH, HARDSIGMOID, MISH, RELU6, SELU = (
    tl.constexpr(activations.BY_NAME[n].code) for n in ("relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid",
                                                          "leaky_relu", "elu", "hardswish", "hardsigmoid", "mish",
                                                          "relu6", "selu"))
SELU_SCALE = tl.constexpr(activations.SELU_SCALE)
SELU_SCALE_ALPHA = tl.constexpr(activations.SELU_SCALE * activations.SELU_ALPHA)
# Activations whose derivative needs z; for the others the saved tensor is y.
PREACT_CODES = tuple(a.code for a in activations.TABLE if a.saves_preact)


@triton.jit
def _sigmoid(x):
    """1 / (1 + e^-x): relative accuracy at every magnitude (e^-x overflows to inf below -88: 0, as in torch)."""
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _one_minus_exp_neg_series(y):
    """1 - e^-y = -expm1(-y) for 0 <= y < 0.25 from its series (6 terms; the next is 5e-8 of the value below 0.25),
    where 1 - exp(-y) would cancel."""
    return y * (1.0 - y * (0.5 - y * (0.16666666666666666 - y * (0.041666666666666664 - y * (
        0.008333333333333333 - y * 0.001388888888888889)))))


@triton.jit
def _tanh(x):
    """tanh keeping its relative accuracy near zero, where 2 sigmoid(2x) - 1 cancels (1e-8: 100% off):
    sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) <= 1 (no overflow), and 1 - e = -expm1(-2|x|) from its series
    below |x| = 0.125, where 1 - e would cancel. NaN stays NaN."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    y = 2.0 * a
    num = tl.where(a < 0.125, _one_minus_exp_neg_series(y), 1.0 - e)
    t = num / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _expm1_nonpos(z):
    """e^z - 1 for z <= 0 with relative accuracy: its series above z = -0.125 (where exp(z) - 1 cancels), else
    exp(z) - 1 (at most a factor 8.5 of cancellation: 1 - e^-0.125 = 0.12). NaN stays NaN."""
    return tl.where(z > -0.125, -_one_minus_exp_neg_series(-z), tl.exp(z) - 1.0)


@triton.jit
def _mish_parts(z):
    """(n, 1 - n, sigmoid(z)) with n = tanh(softplus(z)), from t = exp(-|z|) <= 1 (no overflow) as exact fractions
    that do not cancel (pydlx/reference/linear.py's mish_parts): for z <= 0, n = t(t+2) / (t(t+2) + 2),
    1 - n = 2 / (t(t+2) + 2), sigmoid = t / (1 + t); for z > 0, n = (1+2t) / (1+2t+2t^2), 1 - n = 2t^2 / (...),
    sigmoid = 1 / (1 + t)."""
    t = tl.exp(-tl.abs(z))
    neg = z <= 0.0
    num = tl.where(neg, t * (t + 2.0), 1.0 + 2.0 * t)
    rest = tl.where(neg, 2.0, 2.0 * t * t)
    den = num + rest
    return num / den, rest / den, tl.where(neg, t, 1.0) / (1.0 + t)


@triton.jit
def _clamp(x, lo, hi):
    """min(max(x, lo), hi) keeping NaN (tl.minimum / tl.maximum may drop it on GPUs)."""
    x = tl.where(x < lo, lo, x)
    return tl.where(x > hi, hi, x)


@triton.jit
def _erfc_pos(x):
    """erfc(x) for x >= 0 with relative accuracy (fractional error of the approximation < 1.2e-7, Numerical
    Recipes' Chebyshev fit), where 1 - erf(x) would round to 0 beyond x = 3.9 in fp32."""
    t = 1.0 / (1.0 + 0.5 * x)
    p = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (
        0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    return t * tl.exp(p - x * x)


@triton.jit
def _normal_cdf(z):
    """Phi(z) from one erfc of |z| / sqrt 2: e = 0.5 erfc(|z| / sqrt 2) is Phi(-|z|), small and exact in relative
    terms (0.5 (1 + erf(z / sqrt 2)) cancels for z << 0); Phi(z) = 1 - e for z >= 0 (no cancellation, e <= 0.5)."""
    e = 0.5 * _erfc_pos(tl.abs(z) * 0.7071067811865476)
    return tl.where(z >= 0.0, 1.0 - e, e)


@triton.jit
def _act_fwd(z, ACT: tl.constexpr, ALPHA: tl.constexpr):
    """act(z) in fp32, in forms that keep relative accuracy at every magnitude and do not overflow
    (tests/test_activations.py sweeps 1e-8 .. 1e2, both signs). NaN propagates (relu keeps NaN like torch.relu).
    ALPHA: leaky_relu's negative slope, elu's alpha (unused by the others)."""
    if ACT == RELU:
        return tl.where(z < 0.0, 0.0, z)
    elif ACT == GELU:
        return z * _normal_cdf(z)
    elif ACT == GELU_TANH:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        return z * _sigmoid(2.0 * inner)  # 0.5 z (1 + tanh(u)) == z sigmoid(2u), which does not cancel for z << 0
    elif ACT == SILU:
        return z * _sigmoid(z)
    elif ACT == TANH:
        return _tanh(z)
    elif ACT == SIGMOID:
        return _sigmoid(z)
    elif ACT == LEAKY_RELU:
        return tl.where(z > 0.0, z, z * ALPHA)
    elif ACT == ELU:
        return tl.where(z > 0.0, z, ALPHA * _expm1_nonpos(tl.where(z > 0.0, 0.0, z)))
    elif ACT == HARDSWISH:
        return z * _clamp(z + 3.0, 0.0, 6.0) / 6.0  # torch's order: (z * clamp) / 6
    elif ACT == HARDSIGMOID:
        return _clamp(z + 3.0, 0.0, 6.0) / 6.0
    elif ACT == MISH:
        n, _, _ = _mish_parts(z)
        return z * n
    elif ACT == RELU6:
        return _clamp(z, 0.0, 6.0)
    elif ACT == SELU:
        return tl.where(z > 0.0, SELU_SCALE * z, SELU_SCALE_ALPHA * _expm1_nonpos(tl.where(z > 0.0, 0.0, z)))
    else:
        return z


@triton.jit
def _act_bwd(g, s, ACT: tl.constexpr, ALPHA: tl.constexpr):
    """dL/dz from g = dL/dy in fp32; s is z for gelu/gelu_tanh/silu/hardswish/mish (PREACT_CODES), y for the
    others. 1 - sigmoid(v) is taken as sigmoid(-v) and 1 - y^2 as (1 - y)(1 + y), which do not cancel. At the kinks
    and for NaN, torch's conventions (pydlx/reference/linear.py's activation_backward)."""
    if ACT == RELU:
        return tl.where(s <= 0.0, 0.0, g)  # torch's threshold_backward: a NaN y passes the gradient
    elif ACT == GELU:
        pdf = tl.exp(-0.5 * s * s) * 0.3989422804014327
        return g * (_normal_cdf(s) + s * pdf)
    elif ACT == GELU_TANH:
        v = 1.5957691216057308 * (s + 0.044715 * s * s * s)  # 2u
        dv = 1.5957691216057308 * (1.0 + 0.134145 * s * s)
        sg = _sigmoid(v)
        return g * (sg + s * dv * sg * _sigmoid(-v))
    elif ACT == SILU:
        return g * _sigmoid(s) * (1.0 + s * _sigmoid(-s))
    elif ACT == TANH:
        return g * ((1.0 - s) * (1.0 + s))
    elif ACT == SIGMOID:
        return g * s * (1.0 - s)
    elif ACT == LEAKY_RELU:
        return tl.where(s > 0.0, g, g * ALPHA)
    elif ACT == ELU:
        return tl.where(s <= 0.0, g * (s + ALPHA), g)  # y <= 0 exactly where z <= 0: alpha e^z = y + alpha
    elif ACT == HARDSWISH:
        return tl.where(s <= -3.0, 0.0, tl.where(s < 3.0, g * (s / 3.0 + 0.5), g))
    elif ACT == HARDSIGMOID:
        return tl.where((s > 0.0) & (s < 1.0), g / 6.0, 0.0)
    elif ACT == MISH:
        n, one_minus_n, sg = _mish_parts(s)
        return g * (n + s * one_minus_n * (1.0 + n) * sg)
    elif ACT == RELU6:
        return tl.where((s <= 0.0) | (s >= 6.0), 0.0, g)
    elif ACT == SELU:
        return tl.where(s <= 0.0, g * (s + SELU_SCALE_ALPHA), g * SELU_SCALE)  # from y, as elu
    else:
        return g


# Whether the kernels run under Triton's interpreter: decided as ``triton.jit`` decides it, when the kernels' modules
# are imported (the launchers read this, not the environment, on every launch).
INTERPRETED = triton_interpret()
# The interpreter's workarounds, in this one place (off on GPUs, where the branches compile away): Triton's
# interpreter computes a bf16 tl.dot wrongly and truncates fp32 -> bf16 instead of rounding to nearest even.
INTERPRETING = tl.constexpr(INTERPRETED)


@triton.jit
def _cast(x, DT: tl.constexpr):
    """fp32 x to DT, rounding to nearest even (the GPU's conversion). The interpreter truncates fp32 -> bf16,
    one ulp low (which shows in y(1 - y) near y = 1), so there the rounding is done by hand on the bits."""
    if INTERPRETING and DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(DT)  # exact: the low 16 bits are zero
    return x.to(DT)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    if INTERPRETING and a.dtype == tl.bfloat16:  # the interpreter's bf16 dot is wrong: upcast the tiles
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


# In-tile offsets are 32-bit (each tile's or block's base offset is 64-bit) and a tile spans at most 256 rows or columns
# of an operand, so no stride may exceed this: larger strides are made contiguous, larger sizes refused.
MAX_STRIDE = (2**31 - 1) // 256

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory one block may use, by arch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' grids and splits: ``triton.cdiv`` is a constexpr function, whose wrapper costs
    the host ~1.7 µs a call outside a kernel (several calls a launch)."""
    return -(-a // b)


def arch() -> int:
    major, _ = torch.cuda.get_device_capability()
    return 90 if major >= 9 else 80


def precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored by tl.dot for fp16/bf16 operands


_forced: list = []


@contextlib.contextmanager
def forced_config(cfg: triton.Config) -> Iterator[None]:
    """Within the block every Tuned launch runs ``cfg`` (the GPU tests of every shipped config)."""
    _forced.append(cfg)
    try:
        yield
    finally:
        _forced.pop()


_AUTOTUNE = env_key("PYDLX_TRITON_AUTOTUNE")  # (read on every launch: a change is seen by the next one)
# Whether a kept key's repeated launch may skip JITFunction.run's Python (``Tuned._direct``); tests patch this
DIRECT = getenv("PYDLX_TRITON_DIRECT") != "0" and _knobs is not None


@contextlib.contextmanager
def through_tritons_run() -> Iterator[None]:
    """Within the block every launch goes through Triton's ``JITFunction.run``, as with PYDLX_TRITON_DIRECT=0 (the
    host benchmark's ``pydlx-triton-run`` provider). Process-wide: for a benchmark's loop, not for threads."""
    global DIRECT
    saved, DIRECT = DIRECT, False
    try:
        yield
    finally:
        DIRECT = saved


class Tuned:
    """A kernel with its shipped configs, launched by one rule through Triton's public autotune API: autotuned over
    the configs ``prune(configs, named_args, **constexprs)`` keeps for the call (the ones tests/aot_compile.py
    compiles spill-free for the chip and dtype); under the interpreter, its small ``interpret_config``; with
    PYDLX_TRITON_AUTOTUNE=0 (the GPU test suite: correctness, not speed, and a fraction of the compile time) the
    first config kept. A kernel with one config a call (the LSTM's) is launched with it, never timed: nothing to
    tune, and kernels that update buffers in place must not be re-run by the autotuner's timing.

    The config a call runs is kept per call key (``key``'s values, every constexpr, the tensors' dtypes and device,
    the autotune switch): a repeated call launches the kernel with it directly, without pruning again or going
    through the autotuner's own per-call Python (host time on every launch; the autotuner keeps its choice per key
    and dtypes too, so the config is the one it would pick). At most MAX_KEPT keys (then emptied)."""

    MAX_KEPT = 4096

    def __init__(self, kernel, configs: Sequence[triton.Config], key: Sequence[str],
                 prune: Callable[..., List[triton.Config]], interpret_config: triton.Config):
        self.kernel, self.configs, self.prune = kernel, list(configs), prune
        self.interpret_config = interpret_config
        self.tuned = triton.autotune(self.configs, key=list(key),
                                     prune_configs_by={"early_config_prune": prune})(kernel)
        self.key_at = tuple(i for i, n in enumerate(kernel.arg_names) if n in key)  # key values passed positionally
        self.kept: dict = {}  # call key -> (the config's kwargs, everything the launch adds to the call's kwargs)

    @property
    def __name__(self) -> str:
        return self.kernel.__name__

    def __call__(self, grid, args: Sequence, kwargs: dict) -> None:
        if _forced:
            launch = self._launch(_forced[-1])
        elif INTERPRETED:
            launch = self._launch(self.interpret_config)
        else:
            key = (tuple([args[i] for i in self.key_at if i < len(args)]), tuple(kwargs.items()),
                   tuple([a.dtype for a in args if isinstance(a, torch.Tensor)]), args[0].device,
                   DATA.get(_AUTOTUNE) if DATA is not None else getenv("PYDLX_TRITON_AUTOTUNE"))
            try:
                launch = self.kept.get(key)
            except TypeError:  # (an unhashable constexpr: nothing is kept for the call)
                key, launch = None, None
            if launch is None:
                kept = self.prune(self.configs, dict(zip(self.kernel.arg_names, args)), **kwargs)
                if len(kept) > 1 and getenv("PYDLX_TRITON_AUTOTUNE") != "0":
                    self.tuned[grid](*args, **kwargs)  # (times the configs on the first call of a key; launches)
                    self._keep(key, self._launch(self.tuned.best_config))
                    return
                # one config (or tuning off): launched as is -- Triton's autotuner would time even a single config,
                # re-running a kernel that updates buffers in place (the LSTM backward's dh / dc)
                launch = self._keep(key, self._launch(kept[0]))
        cfg_kwargs, extra, bound = launch
        if bound is not None and DIRECT:
            self._direct(bound, grid(cfg_kwargs) if callable(grid) else grid, args, kwargs, extra)
        else:
            self.kernel[grid(cfg_kwargs) if callable(grid) else grid](*args, **kwargs, **extra)

    def _direct(self, bound: dict, grid: tuple, args: Sequence, kwargs: dict, extra: dict) -> None:
        """The launch of a kept key, skipping the Python of Triton's ``JITFunction.run`` where it would change
        nothing: the compiled kernel Triton chose for the same arguments, called as Triton calls it.

        Each repeated launch binds its arguments with Triton's own binder (its specialisation rules: dtypes, 16-byte
        alignment of pointers, integers equal to 1 or divisible by 16), and launches directly when the result and
        the options equal those of the launch that went through ``JITFunction.run`` on this device. What else that
        run does is checked to be a no-op: no pre-run hooks, no launch hooks (empty hook chains: Triton calls them
        with the launch's metadata, so a profiler that adds one gets the full path), no pass-pipeline hook, and the
        globals the kernel read the same objects. Otherwise -- and on a key's first launch per device -- the launch
        goes through ``JITFunction.run``, which compiles, checks and launches, and whose kernel is then kept
        (``_bind``). PYDLX_TRITON_DIRECT=0 (read at import) launches every call through it."""
        k, rt = self.kernel, _knobs.runtime
        enter, exit = rt.launch_enter_hook, rt.launch_exit_hook  # (idle: unset, or a hook chain with no hooks)
        if k.pre_run_hooks or not (enter is None or getattr(enter, "calls", None) == []) or \
                not (exit is None or getattr(exit, "calls", None) == []) or \
                getattr(rt, "add_stages_inspection_hook", None) is not None:
            k[grid](*args, **kwargs, **extra)
            return
        device = _driver.active.get_current_device()
        # (the options JITFunction.run adds before it binds: a change of either recompiles there)
        debug, mode = k.debug or rt.debug, _knobs.compilation.instrumentation_mode
        hit = bound.get(device)
        if hit is not None:
            values, spec, options = hit[0](*args, **kwargs, **extra, debug=debug, instrumentation_mode=mode)
            if spec == hit[1] and options == hit[2] and _same_globals(hit[6]):
                n = len(grid)
                hit[3](grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                       _driver.active.get_current_stream(device), hit[4], hit[5], None, None, None, *values.values())
                return
        compiled = k[grid](*args, **kwargs, **extra)
        self._bind(bound, device, compiled, args, kwargs, dict(extra, debug=debug, instrumentation_mode=mode))

    def _bind(self, bound: dict, device, compiled, args: Sequence, kwargs: dict, options: dict) -> None:
        """Keep ``compiled`` (what ``JITFunction.run`` just launched on ``device``) for ``_direct``, if binding the
        same arguments again finds it in Triton's kernel cache under Triton's own cache key. A Triton whose run adds
        anything else to the key (another option, a hook's field) finds nothing there: nothing is kept, and its
        launches keep going through ``JITFunction.run``."""
        if hasattr(compiled, "result"):  # (a compile future)
            compiled = compiled.result()
        try:
            kernel_cache, key_cache, _, _, binder = self.kernel.device_caches[device]
            _, spec, opts = binder(*args, **kwargs, **options)
            if kernel_cache.get(_cache_key(key_cache, spec, opts)) is not compiled:
                return
            run = compiled.run
        except Exception:  # (a Triton whose internals differ: launched through its run, as before)
            return
        # the globals as they are now (the run just checked them against the compiled values, which it copied)
        used = tuple((g, name, g.get(name)) for (name, _), (_, g) in self.kernel.used_global_vals.items())
        bound[device] = (binder, spec, opts, run, compiled.function, compiled.packed_metadata, used)

    @staticmethod
    def _launch(cfg: triton.Config) -> tuple:
        extra = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if getattr(cfg, "maxnreg", None):
            extra["maxnreg"] = cfg.maxnreg
        return cfg.kwargs, extra, None

    def _keep(self, key, launch: tuple) -> tuple:
        if key is None:
            return launch
        if len(self.kept) >= self.MAX_KEPT:
            self.kept.clear()
        # (a kept key's compiled kernels, by device, for ``_direct``: only a JIT function has them)
        launch = (*launch[:2], {} if isinstance(self.kernel, JITFunction) else None)
        self.kept[key] = launch
        return launch


def _same_globals(used: tuple) -> bool:
    """Whether every global a compiled kernel read is still the object it was when ``JITFunction.run`` last checked
    it (else the launch goes through that run, which compares the values and raises if one changed)."""
    for g, name, value in used:
        if g.get(name) is not value:
            return False
    return True


_ABSENT = object()


class _NoRun:
    """Stands in for a Triton kernel, and for the autotuner's: ``kernel[grid](*args, **kwargs)`` does nothing."""

    def __init__(self, arg_names):
        self.arg_names = arg_names

    def __getitem__(self, grid):
        return self.run

    def run(self, *args, **kwargs):
        return None


@contextlib.contextmanager
def _restored() -> Iterator[Callable]:
    """A block whose ``put(obj, name, value)`` settings are undone after it, in reverse order."""
    saved = []  # (object, attribute, its own value, or _ABSENT: it had none, its class's showed through)

    def put(obj, name, value):
        saved.append((obj, name, vars(obj).get(name, _ABSENT)))
        setattr(obj, name, value)
    try:
        yield put
    finally:
        for obj, name, value in reversed(saved):
            if value is _ABSENT:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


def _as_on_chip(put: Callable, modules: Sequence, cc: int) -> None:
    """On a machine without a GPU: the launchers not interpreted, and ``arch`` answering ``cc``."""
    if not torch.cuda.is_available():
        here = sys.modules[__name__]
        put(here, "INTERPRETED", False)
        for m in (here, *modules):
            if hasattr(m, "arch"):
                put(m, "arch", lambda: cc)


def _tuned(modules: Sequence) -> List[Tuned]:
    return [t for m in modules for t in list(vars(m).values()) if isinstance(t, Tuned)]


@contextlib.contextmanager
def kernels_stood_in(modules: Sequence, cc: int = 90) -> Iterator[None]:
    """Within the block every ``Tuned`` launcher of ``modules`` (pydlx.triton.<family> modules) runs as on a GPU --
    not interpreted, the shipped configs pruned on a key's first call (for sm_<cc> on a machine without a GPU) and
    kept per key, the autotuner's timing stood in for (a config's num_warps) -- and each kernel's run does
    nothing: what a launch costs the host before Triton's JIT runs it, measurable on any machine
    (bench/launch_host.py, tests/test_host_path.py). Outputs are left unwritten. The launchers' kept configs start
    empty inside; everything is restored after."""
    with _restored() as put:
        _as_on_chip(put, modules, cc)
        for tuned in _tuned(modules):
            stand_in = _NoRun(tuned.kernel.arg_names)
            put(tuned, "kernel", stand_in)
            put(tuned, "kept", {})
            put(tuned.tuned, "fn", stand_in)
            put(tuned.tuned, "_bench", lambda *a, config=None, **k: [float(config.num_warps)])
        yield


class _Recorder:
    """Stands in for Triton's active GPU driver (``launches_recorded``): kernels compile for sm_<cc> as they would
    for the chip, and each launch is recorded instead of run."""

    def __init__(self, cc: int, keep: bool):
        from triton.backends.compiler import GPUTarget
        self.target, self.device, self.stream, self.launches = GPUTarget("cuda", cc, 32), 0, 0, []
        self.count = 0
        self.utils = _RecorderUtils(cc)
        recorder = self

        class Launcher:  # (Triton's launcher's call: the launch hooks get the launch's metadata, as there)
            def __init__(self, src, metadata):
                self.name = metadata.name

            def __call__(self, gx, gy, gz, stream, function, packed, metadata, enter, exit, *args):
                if enter is not None:
                    enter(metadata)
                recorder.count += 1
                if keep:
                    recorder.launches.append((self.name, (gx, gy, gz), stream, function, packed, args))
                if exit is not None:
                    exit(metadata)
        self.launcher_cls = Launcher

    def get_current_device(self):
        return self.device

    def set_current_device(self, device) -> None:
        self.device = device

    def get_current_stream(self, device):
        return self.stream

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("kernels are not timed while launches are recorded (PYDLX_TRITON_AUTOTUNE=0)")


class _RecorderUtils:
    def __init__(self, cc: int):
        self.cc = cc

    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": SMEM_LIMIT[self.cc], "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32}

    def load_binary(self, name, binary, shared, device):
        return object(), object(), 0, 0, 1024  # (module, function: a handle of its own per kernel, regs, spills,
        # the most threads a block)

    def unload_module(self, module) -> None:
        pass


@contextlib.contextmanager
def launches_recorded(modules: Sequence = (), cc: int = 90, keep: bool = True) -> Iterator[_Recorder]:
    """Within the block Triton compiles kernels for sm_<cc> and records each launch instead of running it -- (kernel
    name, grid, stream, function handle, packed metadata, arguments) in the ``launches`` of the driver the block
    gets (its ``device`` and ``stream``: the current device and stream Triton sees; ``count``: how many), a driver
    that stands in for the GPU's: Triton's whole launch path runs (``JITFunction.run``: binding, specialisation,
    the kernel cache, the launch call) and pydlx's (``Tuned``), on any machine; ``modules``' launchers (pydlx.triton.
    <family> modules) start with no kept configs and empty kernel caches inside, restored after (the recorded
    kernels never reach a real GPU). Needs Triton's compiler (TRITON_INTERPRET unset) and PYDLX_TRITON_AUTOTUNE=0 (a
    first launch is not timed). Tensors may stay on the CPU: nothing reads or writes them. ``keep=False``: the
    launches are counted (``count``), not kept (a benchmark's loop: a kept launch keeps its tensors alive)."""
    recorder = _Recorder(cc, keep)
    with _restored() as put:
        _as_on_chip(put, modules, cc)
        put(_driver, "_active", recorder)
        for tuned in _tuned(modules):
            put(tuned, "kept", {})
            put(tuned.kernel, "device_caches", collections.defaultdict(tuned.kernel.create_binder))
        yield recorder


_LAYOUTS: Dict[tuple, tuple] = {}  # (id of a tensor, make) -> (weakref to it, its version, data_ptr, layout)
_backend.CACHES.append(_LAYOUTS.clear)  # (pydlx.clear_caches(): after an in-place change through .data)


def kept_layout(t: torch.Tensor, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``make(t)`` (a copy of a weight in a kernel's layout), kept for ``t`` until it changes: an in-place update
    (its version counter), new data behind it (``.data =``, its data pointer) or its end (a weak reference; the
    copy is freed with it). A repeated inference call then launches no copy; a training step, whose optimizer
    updates the weight, makes one copy per step as before, and its backward's recompute reuses it. While a CUDA
    graph is being captured the copy is made afresh and not kept, so that the graph copies the weight on every
    replay (its optimizer steps update the weight in place). An inference tensor (no version counter): afresh.
    A change through ``.data`` (no version counter sees it) needs ``pydlx.clear_caches()``, as the kept
    BatchNorm folds do."""
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return make(t)
    try:
        version = t._version
    except RuntimeError:  # (an inference-mode tensor tracks no version)
        return make(t)
    key = (id(t), make)
    hit = _LAYOUTS.get(key)
    if hit is not None and hit[0]() is t and hit[1] == version and hit[2] == t.data_ptr():
        return hit[3]
    with torch.no_grad():
        out = make(t.detach())

    def forget(ref, key=key):
        if _LAYOUTS.get(key, (None,))[0] is ref:
            _LAYOUTS.pop(key, None)
    _LAYOUTS[key] = (weakref.ref(t, forget), version, t.data_ptr(), out)
    return out
