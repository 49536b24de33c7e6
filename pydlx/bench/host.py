"""Host cost: what one call of a pydlx op costs the host against the eager chain it replaces, at tiny shapes where
the device's work is negligible (``python -m pydlx.bench --host``).

At the three seed models' sizes every eager kernel runs for a few microseconds, so the time the host spends per call
(Python, argument checks, the dispatcher, torch.library's dispatch, autograd) decides the result before any kernel
does; a fused op replaces several eager ops, so its host cost should be lower than the chain's.

* On a CPU the op path is forced: the reference backend, which takes the path a GPU call takes (argument checks, the
  dispatcher's decision, the torch.library op, its autograd) with eager PyTorch's math inside, which at these sizes
  costs next to nothing. (Under ``auto`` a CPU call skips the op and runs plain eager PyTorch.) Before timing, each
  case checks that a pydlx op's implementation really runs, on the eager path the loop times (the LSTM's reference is ATen's
  LSTM itself: no op).
* On a GPU three pydlx providers: ``pydlx``, what ``auto`` picks there; ``pydlx-triton``, the Triton backend
  forced (its launch path for every family, whatever ``auto`` picks; a case the backend cannot run has no row); and
  ``pydlx-triton-run``, the same with every kernel launched through Triton's own ``JITFunction.run`` (what pydlx's
  repeated launches skip), so that one run measures what skipping it saves.

Every sample times ``calls`` calls in a row (the per-call time is the sample over ``calls``); the providers (``eager``,
``pydlx``) and modes (``fwd``: inference, no gradients; ``fwdbwd``: forward and backward) of a case are timed
interleaved in rounds (pydlx.bench.measure), and each row keeps the median with p20/p80. The rows use the benchmark
CSV schema (family ``host``, times in milliseconds per call).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import pydlx
from pydlx.ops._common import _OPS

from . import MODES, env_info, measure, ratio, row_times

MODE_WORDS = {"fwd": "inference", "fwdbwd": "training (fwd + bwd)"}


@dataclass
class HostCase:
    """One chain: ``make(device) -> (eager, pydlx, x, modules)``: the two as functions of the input x, over the same
    modules' parameters;
    ``ops``: how many eager ops the chain runs (what one fused call replaces); ``has_op``: whether pydlx's path runs
    a ``pydlx::`` op on a CPU (checked before timing)."""
    name: str
    shape: str
    ops: int
    make: Callable
    modes: Tuple[str, ...] = MODES
    has_op: bool = True


def _linear(device):
    lin = nn.Linear(16, 8, device=device)
    x = torch.randn(4, 16, device=device)
    return (lambda t: torch.relu(lin(t)), lambda t: pydlx.ops.linear(t, lin.weight, lin.bias, "relu"), x, lin)


def _mlp(device):
    seq = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).to(device)
    ws, bs = [seq[i].weight for i in (0, 2, 4)], [seq[i].bias for i in (0, 2, 4)]
    x = torch.randn(4, 16, device=device)
    return seq, lambda t: pydlx.ops.mlp(t, ws, bs, "relu"), x, seq


def _conv(device):
    conv = nn.Conv2d(3, 4, 3, padding=1, device=device)
    x = torch.randn(1, 3, 8, 8, device=device)
    return (lambda t: F.max_pool2d(torch.relu(conv(t)), 2),
            lambda t: pydlx.ops.conv_relu_pool2d(t, conv.weight, conv.bias, 1, 1, 2), x, conv)


def _conv_bn(training: bool):
    def make(device):
        conv, bn = nn.Conv2d(3, 4, 3, padding=1, device=device), nn.BatchNorm2d(4, device=device)
        bn.train(training)
        # batch 1: on a CPU ATen's conv2d takes a ~7x slower path from batch 2 (42 against 6 us at this size), so a
        # larger batch would time the convolution's math (the training form runs it twice), not the host path
        x = torch.randn(1, 3, 8, 8, device=device)

        def fused(t):
            return pydlx.ops.conv_bn_act_pool2d(t, conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                bn.weight, bn.bias, bn.eps, 1, 1, "relu", training=bn.training,
                                                momentum=bn.momentum, num_batches_tracked=bn.num_batches_tracked)
        return lambda t: torch.relu(bn(conv(t))), fused, x, nn.ModuleList([conv, bn])
    return make


def _lstm(device):
    ref = nn.LSTM(8, 8, device=device)
    mine = pydlx.nn.LSTM.from_module(ref)
    x = torch.randn(4, 2, 8, device=device)
    return (lambda t: ref(t)[0]), (lambda t: mine(t)[0]), x, ref


CASES = [
    HostCase("linear_relu", "4x16->8", 2, _linear),
    HostCase("mlp3", "4:16-16-16-8", 5, _mlp),
    HostCase("conv_relu_pool", "1,3,8,8->4 3x3 pool2", 3, _conv),
    HostCase("conv_bn_relu_eval", "1,3,8,8->4 3x3", 3, _conv_bn(False), modes=("fwd",)),
    HostCase("conv_bn_relu_train", "1,3,8,8->4 3x3", 3, _conv_bn(True), modes=("fwdbwd",)),
    HostCase("lstm", "T4 B2 8->8", 1, _lstm, has_op=False),
]


@contextlib.contextmanager
def _count_op_calls():
    """Count the calls of every pydlx op's implementation on the eager path (pydlx.ops._common.Op), which is the
    path the timed loop takes (a dispatch mode would divert calls to the torch.library op: not what is timed)."""
    count = [0]
    saved = {name: op.impl for name, op in _OPS.items()}

    def counting(impl):
        def call(*args):
            count[0] += 1
            return impl(*args)
        return call
    for op in _OPS.values():
        op.impl = counting(op.impl)
    try:
        yield count
    finally:
        for name, impl in saved.items():
            _OPS[name].impl = impl


def _loop(fn: Callable, x: torch.Tensor, training: bool, calls: int, backend: Optional[str],
          through_run: bool = False) -> Callable[[], None]:
    """One sample: ``calls`` calls of ``fn`` (and its backward when ``training``), under ``backend`` if given;
    ``through_run``: every Triton launch through Triton's own run (pydlx.triton.common ``through_tritons_run``)."""
    def run():
        ctx = pydlx.use_backend(backend) if backend else contextlib.nullcontext()
        launches = contextlib.nullcontext()
        if through_run:
            from pydlx.triton.common import through_tritons_run
            launches = through_tritons_run()
        with ctx, launches, torch.set_grad_enabled(training):
            for _ in range(calls):
                y = fn(x)
                if training:
                    y.sum().backward()
    return run


# the providers whose Triton launches all go through Triton's JITFunction.run: the Triton backend as it launched
# before pydlx skipped that run on a repeated launch (pydlx.triton.common ``Tuned._direct``), timed beside it
THROUGH_RUN = ("pydlx-triton-run",)


def providers_for(device: torch.device) -> Dict[str, Optional[str]]:
    """pydlx's providers on ``device`` and the backend each forces (None: auto): on a CPU the op path forced (the
    reference backend); on a GPU auto, the Triton backend forced, and the same with every launch through Triton's
    own run (``THROUGH_RUN``)."""
    if device.type == "cpu":
        return {"pydlx": "reference"}
    return {"pydlx": None, "pydlx-triton": "triton", "pydlx-triton-run": "triton"}


def run(device, calls: int = 100, rounds: Optional[int] = None, cases: Sequence[HostCase] = CASES,
        progress: bool = True, providers: Optional[Dict[str, Optional[str]]] = None) -> List[Dict]:
    """CSV rows (pydlx.bench.CSV_COLUMNS; family "host", times per call) for every case x provider x mode;
    ``providers``: pydlx's, by name, with the backend each forces (default ``providers_for(device)``)."""
    device = torch.device(device)
    providers = providers_for(device) if providers is None else providers
    env = env_info(device)
    rows = []
    for case in cases:
        eager, fused, x, params = case.make(device)
        fns = {}
        for mode in case.modes:
            training = mode == "fwdbwd"  # (inference runs under no_grad: the parameters' flags do not matter)
            xm = x.detach().requires_grad_(training)
            fns[("eager", mode)] = _loop(eager, xm, training, calls, None)
            for provider, backend in providers.items():
                if backend is not None:
                    try:
                        with _count_op_calls() as count, pydlx.use_backend(backend), \
                                torch.set_grad_enabled(training):
                            fused(xm)
                    except pydlx.BackendUnavailableError:  # (this backend cannot run the case: no row)
                        continue
                    if case.has_op and count[0] == 0:
                        raise RuntimeError(f"host benchmark {case.name}: pydlx's path ran no pydlx op ({provider})")
                fns[(provider, mode)] = _loop(fused, xm, training, calls, backend, provider in THROUGH_RUN)
        timed = measure(fns, device, rep=rounds) if device.type == "cpu" else measure(fns, device)
        for (provider, mode), (med, p20, p80) in timed.items():
            rows.append({"family": "host", "op": case.name, "provider": provider, "mode": mode, "dtype": "fp32",
                         "shape": case.shape, "median_ms": f"{med / calls:.6f}", "p20_ms": f"{p20 / calls:.6f}",
                         "p80_ms": f"{p80 / calls:.6f}", **env})
        if progress:
            print(f"host: {case.name} done", flush=True)
    return rows


def ratios(rows: Sequence[Dict]) -> List[Tuple[str, str, str, Dict, Dict, float, bool]]:
    """(op, shape, mode, eager row, a pydlx provider's row, its time / eager's, resolved) for each case, mode and
    pydlx provider: ``resolved`` is False when the two p20..p80 ranges do not separate the ratio from 1
    (``pydlx.bench.ratio``: then it is within the noise)."""
    by = {(r["op"], r["mode"], r["provider"]): r for r in rows if r["family"] == "host"}
    out = []
    for (op, mode, provider), r in by.items():
        e = by.get((op, mode, "eager"))
        if provider == "eager" or e is None:
            continue
        q = ratio(row_times(r), row_times(e))
        out.append((op, r["shape"], mode, e, r, q.median, q.resolved))
    return out


def print_table(rows: Sequence[Dict]) -> None:
    """Per case, mode and pydlx provider: eager's and the provider's time per call in microseconds (p20-p80) and
    their ratio (the goal: at most 1.0; ``?``: the spreads do not resolve it from 1)."""
    header = ("chain", "shape", "mode", "provider", "eager us (p20-p80)", "pydlx us (p20-p80)", "pydlx / eager")
    us = lambda r: (f"{1e3 * float(r['median_ms']):.1f} ({1e3 * float(r['p20_ms']):.1f}-"  # noqa: E731
                    f"{1e3 * float(r['p80_ms']):.1f})")
    lines = [(op, shape, MODE_WORDS[mode], r["provider"], us(e), us(r), f"{q:.2f}x" + ("" if ok else "?"))
             for op, shape, mode, e, r, q, ok in ratios(rows)]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print(fmt(header))
    print("  ".join("-" * w for w in widths))
    for cells in lines:
        print(fmt(cells))
    print(flush=True)
