"""The host time of a Triton kernel launch, in two parts.

1. The Python before Triton's JIT runs the kernel: pydlx's launcher (pydlx/triton/common.py ``Tuned``, the config
   kept per call key) against Triton's autotuner with its choice cached, and the rule before it (the shipped configs
   pruned again on every launch, then the autotuner), and the launch call alone (the floor of both); then the whole
   Triton backend call of a Linear forward and backward (checks, allocations, grids, every launch) with the launches
   stubbed. The JIT's run is replaced by a no-op.
2. Triton's own run, compiled kernels: the kernels compiled for sm_90 and each launch recorded by a driver that
   stands in for the GPU's (``launches_recorded``), so ``JITFunction.run`` (binding, specialisation, the kernel
   cache, the checks of the globals the kernel read, the launch metadata) runs as on a GPU. The whole backend calls
   again, with pydlx's direct launch of a repeated key (``Tuned._direct``) against every launch through Triton's
   run. Needs TRITON_INTERPRET unset (the kernels compiled: a few seconds the first time).

Neither part needs a GPU, and neither times the launch itself (Triton's launcher, the driver's launch): on a CUDA
machine ``python -m pydlx.bench --host`` times the real calls, its ``pydlx-triton`` and ``pydlx-triton-run`` rows
the two launch paths.

    python bench/launch_host.py        # the Linear launches and calls at the autoencoder's first layer

Providers interleaved, 2000 launches a sample, median (p20-p80) per launch."""
import os

import torch

import pydlx.triton.common as common
import pydlx.triton.linear as linear
from pydlx.triton.common import cdiv
from pydlx._timing import measure


def _calls(M: int = 64, K: int = 784, N: int = 400):
    """(name, launcher, grid, args, kwargs) of the two Linear launches of one training step's layer, fp32 + ReLU."""
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    y, dx = torch.empty(M, N), torch.empty(M, K)
    fwd = (x, w, b, y, y, M, N, K, *x.stride(), *w.stride(), *y.stride())
    fwd_kw = dict(ACT=1, ALPHA=0.0, HAS_BIAS=True, SAVE_PREACT=False, PRECISION="tf32")
    bwd = (y, y, w, dx, dx, M, K, N, N, *y.stride(), *w.stride(), 0, *dx.stride())
    bwd_kw = dict(ACT=1, ALPHA=0.0, ROWSUM=False, PRECISION="tf32")
    return [("linear fwd", linear._linear_fwd, lambda m: (cdiv(M, m["BLOCK_M"]) * cdiv(N, m["BLOCK_N"]),),
             fwd, fwd_kw),
            ("linear bwd dx", linear._linear_bwd, lambda m: (cdiv(M, m["BLOCK_M"]) * cdiv(K, m["BLOCK_N"]),
                                                             1), bwd, bwd_kw)]


def main(launches: int = 2000, rounds: int = 15) -> None:
    with common.kernels_stood_in([linear]):  # (no card: the shipped sm_90 configs, the interpreter off)
        _main(launches, rounds)
    if common.INTERPRETED:
        print("compiled launches: not timed (TRITON_INTERPRET is set: the kernels cannot be compiled)")
        return
    autotune = os.environ.get("PYDLX_TRITON_AUTOTUNE")
    os.environ["PYDLX_TRITON_AUTOTUNE"] = "0"  # (a first launch is not timed: there is no GPU to time it on)
    try:
        with common.launches_recorded([linear], keep=False):
            _compiled(launches, rounds)
    finally:
        if autotune is None:
            del os.environ["PYDLX_TRITON_AUTOTUNE"]
        else:
            os.environ["PYDLX_TRITON_AUTOTUNE"] = autotune


def _loop(fn, n):
    def run():
        for _ in range(n):  # (results dropped at once: a list of them would keep every allocation alive)
            fn()
    return run


def _report(timed, launches):
    for (name, provider), (med, p20, p80) in timed.items():
        f = 1e3 / launches
        print(f"{name:14s} {provider:28s} {med * f:6.2f} us ({p20 * f:.2f}-{p80 * f:.2f})")


def _compiled(launches: int, rounds: int) -> None:
    """The whole Linear backend calls with Triton's run: pydlx's direct launch against Triton's run every time."""
    M, K, N = 64, 784, 400
    x, w, b, dy = torch.randn(M, K), torch.randn(N, K), torch.randn(N), torch.randn(M, N)
    y, _ = linear.linear_fwd(x, w, b, "relu", False)  # (compiled, kept)
    linear.linear_bwd(dy, x, w, y, "relu", True, True, True)
    fwd = lambda: linear.linear_fwd(x, w, b, "relu", False)  # noqa: E731
    bwd = lambda: linear.linear_bwd(dy, x, w, y, "relu", True, True, True)  # noqa: E731

    def through_run(fn):
        def run():
            with common.through_tritons_run():
                fn()
        return run
    fns = {}
    for name, fn in (("linear_fwd", fwd), ("linear_bwd", bwd)):
        fns[(name, "compiled, pydlx direct")] = _loop(fn, launches)
        fns[(name, "compiled, Triton's run")] = through_run(_loop(fn, launches))
    _report(measure(fns, torch.device("cpu"), rep=rounds), launches)


def _main(launches: int, rounds: int) -> None:
    fns = {}
    loop = lambda fn: _loop(fn, launches)  # noqa: E731
    for name, tuned, grid, args, kwargs in _calls():
        tuned(grid, args, kwargs)  # the first call of the key: pruned, "timed", kept
        fns[(name, "pydlx (config kept)")] = loop(lambda t=tuned, g=grid, a=args, k=kwargs: t(g, a, k))
        fns[(name, "triton autotuner (cached)")] = loop(lambda t=tuned, g=grid, a=args, k=kwargs: t.tuned[g](*a, **k))
        fns[(name, "prune + autotuner (before)")] = loop(lambda t=tuned, g=grid, a=args, k=kwargs: (
            t.prune(t.configs, dict(zip(t.kernel.arg_names, a)), **k), t.tuned[g](*a, **k)))
        cfg, extra, _ = next(iter(tuned.kept.values()))
        fns[(name, "the launch call alone")] = loop(lambda t=tuned, g=grid, a=args, k=kwargs, c=cfg, e=extra: (
            t.kernel[g(c)](*a, **k, **e)))
    # the whole backend call around those launches (argument checks, allocations, grids, dw splits), launches stubbed:
    # the Triton backend's host cost per Linear forward and backward (CPU tensors: the backward's dw split follows
    # the CPU rule, two splits, as under the interpreter)
    M, K, N = 64, 784, 400
    x, w, b, dy = torch.randn(M, K), torch.randn(N, K), torch.randn(N), torch.randn(M, N)
    y, _ = linear.linear_fwd(x, w, b, "relu", False)
    linear.linear_bwd(dy, x, w, y, "relu", True, True, True)
    fns[("linear_fwd", "whole backend call")] = loop(lambda: linear.linear_fwd(x, w, b, "relu", False))
    fns[("linear_bwd", "whole backend call")] = loop(lambda: linear.linear_bwd(dy, x, w, y, "relu", True, True, True))
    _report(measure(fns, torch.device("cpu"), rep=rounds), launches)


if __name__ == "__main__":
    main()
