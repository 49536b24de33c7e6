"""``python -m pydlx.tune``: measure on this GPU which backend ``auto`` runs, ahead of time, into the user cache.

    python -m pydlx.tune --minutes 10                           # the benchmark grid's shapes, every family
    python -m pydlx.tune --model mypkg.models:make_cnn --input-shape 256,1,28,28 [--dtype bf16] [--inference]
    python -m pydlx.tune --show                                 # what auto follows on this GPU, and why
    python -m pydlx.tune --forget                               # delete this machine's measured decisions

Every shape is measured as on first use under ``pydlx.use_policy("measure")`` (pydlx/_measure.py): each backend
that can run the call is checked against a float64 reference and timed against eager PyTorch, interleaved; the
fastest correct one that beats eager beyond the spread is recorded, else eager. The decisions go to the user cache
(``$PYDLX_CACHE_DIR``, default ``~/.cache/pydlx``), which ``auto`` then follows in every process on this machine
(same card, driver, CUDA, torch, Triton and pydlx). ``--model`` measures the shapes of your own model: ``factory``
is called with no arguments, the model is optimized (pydlx.optimize), moved to the GPU and the dtype, and run on
random inputs of ``--input-shape`` (forward and backward, or forward only with ``--inference``). In a source
checkout, ``--tests`` first runs the GPU test suite and leaves out every backend whose GPU tests failed.

From Python: ``pydlx.tune.tune_model(model, *inputs)``, ``pydlx.tune.decisions()``, ``pydlx.tune.budget(...)``,
``pydlx.tune.share()`` (a distributed job's ranks agree on rank 0's decisions), ``pydlx.tune.forget()``.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from . import _measure, _policy, registry
from ._measure import Budget, Decision, cache_dir, share  # noqa: F401  (the API)
from .optimize import optimize

__all__ = ["tune_model", "tune_calls", "decisions", "budget", "share", "forget", "cache_dir", "format_table"]


def _device(device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if not torch.cuda.is_available():
        raise RuntimeError("pydlx.tune measures on a GPU: no CUDA device is available")
    return torch.device("cuda", torch.cuda.current_device())


def decisions(device=None) -> List[Decision]:
    """The measured decisions ``auto`` follows on ``device``'s card (this process's over the user cache's)."""
    return _measure.in_force(_device(device))


def budget(total_s: Optional[float] = None, per_shape_s: Optional[float] = None) -> Budget:
    """Set what measuring on first use may spend in this process (wall seconds: in total, per shape bucket); returns
    the budget with what it has spent."""
    if total_s is not None:
        _measure.BUDGET.total_s = float(total_s)
    if per_shape_s is not None:
        _measure.BUDGET.per_shape_s = float(per_shape_s)
    if total_s is not None or per_shape_s is not None:
        _measure.HOOKS["changed"]()  # (calls decided eager for want of budget decide again)
    return _measure.BUDGET


def forget(cache: bool = False) -> None:
    """Forget this process's measured decisions; ``cache``: also delete the user cache's (every card's)."""
    _measure.forget(cache)


def tune_calls(calls: Iterable[Tuple[str, object]], device=None, deadline: Optional[float] = None,
               exclude=None, progress=None) -> List[Decision]:
    """Measure each ``(family, call descriptor)`` afresh and record it (this process and the user cache); stops at
    ``deadline`` (time.monotonic()). ``exclude(family) -> {backend: why}`` leaves backends out."""
    device = _device(device)
    done = []
    for family, call in calls:
        if deadline is not None and time.monotonic() > deadline:
            break
        d = _measure.measure(family, device, call, exclude(family) if exclude else None)
        if d is not None:
            _measure.record([d], device)
            done.append(d)
            if progress:
                progress(d)
    return done


def tune_model(model: torch.nn.Module, *inputs, training: bool = True, seconds: Optional[float] = None
               ) -> List[Decision]:
    """Measure the shapes ``model`` calls pydlx with on ``inputs`` (a copy of the model runs one forward, and with
    ``training`` a backward of the sum of its outputs, under the "measure" policy) and record them; ``seconds``:
    the measuring budget for this (default: what is left of the process's). Returns the decisions in force for the
    shapes it called, measured now or recorded before."""
    model = copy.deepcopy(model).train(training)
    seen: List[Tuple[str, object]] = []
    saved = _measure.BUDGET.total_s
    if seconds is not None:
        _measure.BUDGET.total_s = _measure.BUDGET.spent_s + seconds
    watch = _measure.HOOKS.get("watch")
    _measure.HOOKS["watch"] = lambda family, call: seen.append((family, call))
    _measure.HOOKS["changed"]()  # (no call skips the dispatcher on a decision kept before)
    try:
        with _policy.use_policy(_policy.MEASURE), torch.set_grad_enabled(training):
            out = model(*inputs)
            if training:
                leaves = [t for t in _tensors(out) if t.requires_grad]
                if leaves:
                    sum(t.float().sum() for t in leaves).backward()
    finally:
        _measure.BUDGET.total_s = saved
        _measure.HOOKS.pop("watch")
        if watch is not None:
            _measure.HOOKS["watch"] = watch
    found = {}
    for family, call in seen:
        d = _measure.recorded(family, inputs[0].device if inputs else _device(), call)
        if d is not None:
            found[d.key] = d
    return list(found.values())


def _tensors(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    data = getattr(out, "data", None)  # (a PackedSequence)
    return [data] if isinstance(data, torch.Tensor) else []


def format_table(rows: Sequence[Decision]) -> str:
    """The decisions as a table: what each bucket runs, its speedup over eager with the spread, where it came from,
    what measuring it took, and every backend's verdict."""
    header = ("family", "dtype", "mode", "shape bucket", "runs", "vs eager", "source", "took", "why")
    lines = []
    for d in rows:
        ratio = f"{d.ratio:.2f}x ({d.lo:.2f}-{d.hi:.2f})" if d.backend != "reference" else "-"
        lines.append((d.family, d.dtype, d.mode, d.bucket, "eager" if d.backend == "reference" else d.backend, ratio,
                      d.source, f"{d.spent_s:.1f} s", "; ".join(f"{b}: {v}" for b, v in d.checked)))
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)] if lines else [len(h) for h in header]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells[:-1], widths)) + "  " + cells[-1]  # noqa
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


# ----------------------------------------------------------------------------------------------- the command
def grid(families: Sequence[str], dtypes: Sequence[torch.dtype]) -> List[Tuple[str, object]]:
    """The benchmark grid's calls (``pydlx/bench/<family>.py`` ``tune_calls``), bf16 first."""
    calls = []
    for family in families:
        module = importlib.import_module(f"pydlx.bench.{family}")
        calls += [(family, c) for c in module.tune_calls(dtypes)]
    calls.sort(key=lambda fc: fc[1].dtype != torch.bfloat16)
    return calls


def _gpu_tests(deadline: float) -> Optional[dict]:
    """{family: backends whose GPU tests passed} from the source checkout's test suite, or None without one."""
    tests = Path(__file__).resolve().parent.parent / "tests"
    if not (tests / "conftest.py").exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "gpu.xml"
        cmd = [sys.executable, "-m", "pytest", str(tests), "-m", "gpu", "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
        print("running the GPU tests:", " ".join(cmd), flush=True)
        try:
            subprocess.run(cmd, timeout=max(60.0, deadline - time.monotonic()), check=False)
        except subprocess.TimeoutExpired:
            print("the GPU tests ran out of time: backends whose tests did not finish are left out", flush=True)
        return _policy.passed_backends([junit]) if junit.exists() else {}


def _shape(text: str) -> Tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape takes sizes like 256,1,28,28; got {text!r}") from None


def _factory(text: str):
    module, _, name = text.partition(":")
    if not module or not name:
        raise argparse.ArgumentTypeError(f"--model takes module:factory (e.g. mypkg.models:make_cnn); got {text!r}")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pydlx.tune", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--minutes", type=float, default=10.0, help="the time box (default 10)")
    p.add_argument("--family", default="all", choices=[*registry.FAMILIES, "all"], help="with the grid: one family")
    p.add_argument("--dtype", default=None, choices=[n for n in _policy.DTYPES],
                   help="the grid: only this dtype (default bf16 and fp32); --model: the model's dtype (default fp32)")
    p.add_argument("--model", type=_factory, default=None, help="module:factory of a model whose shapes to measure")
    p.add_argument("--input-shape", type=_shape, action="append", default=None,
                   help="with --model: the shape of a random input (repeat for a model taking several)")
    p.add_argument("--inference", action="store_true", help="with --model: forward only (eval mode, no gradients)")
    p.add_argument("--tests", action="store_true", help="first run the GPU tests (a source checkout) and leave out "
                                                        "backends whose tests failed")
    p.add_argument("--cache-dir", default=None, help="the user cache's folder (default: $PYDLX_CACHE_DIR, else "
                                                     "~/.cache/pydlx)")
    p.add_argument("--show", action="store_true", help="print what auto follows on this GPU and exit")
    p.add_argument("--forget", action="store_true", help="delete the measured decisions (this cache folder) and exit")
    args = p.parse_args(argv)
    if args.cache_dir:
        import os
        os.environ["PYDLX_CACHE_DIR"] = args.cache_dir
    if args.forget:
        forget(cache=True)
        print(f"deleted the measured decisions under {cache_dir()}")
        return 0
    if not torch.cuda.is_available():
        print("python -m pydlx.tune: no CUDA device here; it measures on a GPU", file=sys.stderr)
        return 2
    device = _device()
    if args.show:
        print(_measure.status(device))
        print(format_table(decisions(device)))
        return 0
    if args.model is not None and not args.input_shape:
        p.error("--model needs --input-shape")
    t0 = time.monotonic()
    deadline = t0 + 60 * args.minutes
    passed = _gpu_tests(deadline) if args.tests else None

    def exclude(family):
        if passed is None:
            return None
        return {b: "its GPU tests failed or did not run" for b in registry.candidates()
                if b not in passed.get(family, set())}

    print(f"pydlx.tune on {_policy.device_key(device)[0]}: the decisions go to {_measure.user_cache(device).path}",
          flush=True)
    if args.model is not None:
        dtype = _policy.DTYPES[args.dtype or "fp32"]
        model = optimize(args.model()).to(device=device, dtype=dtype)
        inputs = [torch.randn(s, device=device, dtype=dtype) for s in args.input_shape]
        if passed is not None:
            _measure.HOOKS["exclude"] = exclude
        _measure.HOOKS["progress"] = lambda d: print(f"  {d.describe()}", flush=True)  # (a run cut short says it)
        try:
            got = tune_model(model, *inputs, training=not args.inference,
                             seconds=max(1.0, deadline - time.monotonic()))
        finally:
            _measure.HOOKS.pop("exclude", None)
            _measure.HOOKS.pop("progress", None)
    else:
        families = list(registry.FAMILIES) if args.family == "all" else [args.family]
        dtypes = [_policy.DTYPES[args.dtype]] if args.dtype else [torch.bfloat16, torch.float32]
        got = tune_calls(grid(families, dtypes), device, deadline, exclude,
                         progress=lambda d: print(f"  {d.describe()}", flush=True))
    print()
    print(format_table(got))
    spent = time.monotonic() - t0
    print(f"\n{len(got)} decisions in {spent:.0f} s, written to {_measure.user_cache(device).path}; auto follows them "
          "in every process on this machine (pydlx.backends()['decisions'], pydlx.explain(model) say so)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
