"""Timing primitives shared by the benchmarks (pydlx.bench) and measuring on first use (pydlx/_measure.py):
``measure`` times functions interleaved with their spread, ``ratio`` is the one rule that compares two timings.
Imports nothing of pydlx."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch


class _Sampler:
    """Times single calls: CUDA events around each call with L2 flushed before it (as triton.testing.do_bench
    does), or the wall clock around a call and a device sync on the CPU. Events are read after the round's sync."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cache = (torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
                      if device.type == "cuda" else None)

    def __call__(self, fn: Callable[[], object]):
        if self.cache is None:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        self.cache.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        return (start, end)

    def ms(self, sample) -> float:
        return sample if self.cache is None else sample[0].elapsed_time(sample[1])


def _quantiles(times: Sequence[float]) -> Tuple[float, float, float]:
    if len(times) < 2:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def measure(fns: Dict[object, Callable[[], object]], device, warmup: Optional[int] = None,
            rep: Optional[int] = None, rounds: int = 10) -> Dict[object, Tuple[float, float, float]]:
    """{key: (median, p20, p80) in ms} of each ``fns[key]()``, the functions measured *interleaved*: after each has
    warmed up, ``rounds`` rounds each time every function (in a rotating order), so that warm-up drift, clock
    changes and a neighbour's load fall on all of them alike rather than on whichever ran first.

    CUDA: ``warmup`` and ``rep`` are milliseconds per function (default 25 and 100). CPU: numbers of calls per
    function (default 3 and 20; one call per function per round).
    """
    device = torch.device(device)
    keys = list(fns)
    sampler = _Sampler(device)
    gpu = device.type == "cuda"
    if gpu:
        warmup = 25 if warmup is None else warmup
        rep = 100 if rep is None else rep
        per_round = {}
        for k in keys:  # estimate a call's time, then warm up for ``warmup`` ms
            _sync(device)
            t0 = time.perf_counter()
            fns[k]()
            _sync(device)
            est = max((time.perf_counter() - t0) * 1e3, 1e-3)
            for _ in range(max(1, int(warmup / est))):
                fns[k]()
            per_round[k] = max(1, min(100, int(rep / rounds / est)))
        _sync(device)
    else:
        warmup = 3 if warmup is None else warmup
        rep = 20 if rep is None else rep
        for k in keys:
            for _ in range(warmup):
                fns[k]()
        rounds = max(1, rep)
        per_round = {k: 1 for k in keys}
    samples: Dict[object, list] = {k: [] for k in keys}
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        pending = []
        for k in order:
            for _ in range(per_round[k]):
                pending.append((k, sampler(fns[k])))
        _sync(device)
        for k, sample in pending:
            samples[k].append(sampler.ms(sample))
    return {k: _quantiles(v) for k, v in samples.items()}


def time_fn(fn: Callable[[], object], device, warmup: Optional[int] = None,
            rep: Optional[int] = None) -> Tuple[float, float, float]:
    """(median, p20, p80) of ``fn()`` in milliseconds, alone (``measure`` times several interleaved)."""
    return measure({0: fn}, device, warmup, rep)[0]


class Ratio(NamedTuple):
    """One timing over another (``ratio``): the medians' ratio, the lowest and highest ratio their p20..p80 ranges
    allow, and whether those ranges resolve it from 1."""
    median: float
    lo: float
    hi: float
    resolved: bool


# The one rule for comparing two timings: a ratio is resolved (stable) only when the two p20..p80 ranges do not
# overlap, i.e. 1 lies outside [num_p20 / den_p80, num_p80 / den_p20]; otherwise it could be 1 within the
# measurement's noise, and it is shown as such (marked, "within noise"), never plotted or reported as a speedup.
def ratio(num: Sequence[float], den: Sequence[float]) -> Ratio:
    """``num``'s time over ``den``'s, each a (median, p20, p80) as ``measure`` returns (all positive)."""
    (med, p20, p80), (d_med, d20, d80) = num, den
    return Ratio(med / d_med, p20 / d80, p80 / d20, p20 > d80 or p80 < d20)


def format_change(before: Sequence[float], after: Sequence[float], unit: str = "ms") -> str:
    """``before -> after`` of two (median, p20, p80) timings, each as ``median (p20-p80)``, then the speedup
    (before / after) only where the spreads resolve it from 1 (``ratio``), else ``same within noise (lo-hi)``: the
    range of ratios the two spreads allow."""
    r = ratio(before, after)
    digits = max(2, 2 - math.floor(math.log10(min(*before, *after))))  # 2 decimals, 3 significant digits at least
    fmt = lambda t: f"{t[0]:.{digits}f} ({t[1]:.{digits}f}-{t[2]:.{digits}f})"  # noqa: E731
    verdict = f"speedup {r.median:.2f}x" if r.resolved else f"same within noise ({r.lo:.2f}x-{r.hi:.2f}x)"
    return f"{fmt(before)} -> {fmt(after)} {unit}: {verdict}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
