"""Benchmark cases for the linear family: act(x @ w.T + b) for relu and gelu.

Shapes are M x N x K: x[M, K], weight[N, K], bias[N]. Providers: ``pydlx`` (pydlx.ops.linear, backend auto),
``eager`` (act(F.linear(x, w, b))) and ``compile`` (torch.compile of the eager function, compiled once per case).
"""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F

from .. import registry
from . import Case, Trial, pick

OPS = {"linear_relu": "relu", "linear_gelu": "gelu"}
GPU_SHAPES = [(4096, 4096, 4096), (256, 4096, 1024), (65536, 256, 256)]
GPU_DTYPES = [torch.bfloat16, torch.float32]  # bf16 first: the time-boxed GPU check measures it first
# CPU: scaled-down shapes, float32 only (bfloat16 matmul on CPU is very slow)
CPU_SHAPES = [(256, 256, 256), (64, 512, 128), (2048, 64, 64)]
CPU_DTYPES = [torch.float32]

_EAGER_ACT = {"relu": torch.relu, "gelu": F.gelu}


def _make_case(device: torch.device, op: str, act: str, M: int, N: int, K: int, dtype: torch.dtype) -> Case:
    state = {}  # the compiled function, built on first use and shared by both modes and later makes

    def provider_fn(provider: str) -> Callable:
        act_fn = _EAGER_ACT[act]

        def eager(x, w, b):
            return act_fn(F.linear(x, w, b))

        def fused():
            import pydlx
            return lambda x, w, b: pydlx.ops.linear(x, w, b, activation=act)

        return pick(provider, state, eager, fused)

    def make(provider: str) -> Tuple[Callable[[], object], Callable[[], object]]:
        f = provider_fn(provider)
        gen = torch.Generator(device=device).manual_seed(0)
        rnd = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype)  # noqa: E731
        x, w, b, g = rnd(M, K), rnd(N, K) * K ** -0.5, rnd(N), rnd(M, N)
        # the fwdbwd leaves share storage with the fwd inputs
        xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))

        def fwd():
            return f(x, w, b)

        def fwdbwd():
            y = f(xg, wg, bg)
            xg.grad = wg.grad = bg.grad = None
            y.backward(g)
            return y

        return fwd, fwdbwd

    return Case(family="linear", op=op, shape=registry.FAMILIES["linear"].shape(M, N, K), dtype=dtype, make=make)


def cases(device, small: bool) -> List[Case]:
    """The linear family's cases on ``device``; ``small``: CPU-sized shapes, float32 only."""
    device = torch.device(device)
    shapes, dtypes = (CPU_SHAPES, CPU_DTYPES) if small else (GPU_SHAPES, GPU_DTYPES)
    return [_make_case(device, op, act, M, N, K, dtype)
            for dtype in dtypes for op, act in OPS.items() for M, N, K in shapes]


def trial(call: registry.LinearCall, device, gen: torch.Generator) -> Trial:
    """A call of the family's descriptor (its activation is not part of it: ReLU, as the benchmarks time)."""
    rnd = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=call.dtype)  # noqa: E731
    inputs = (rnd(call.M, call.K), rnd(call.N, call.K) * max(call.K, 1) ** -0.5, rnd(call.N))

    def fused(x, w, b):
        import pydlx
        return pydlx.ops.linear(x, w, b, activation="relu")

    return Trial(inputs, fused, lambda x, w, b: torch.relu(F.linear(x, w, b)))


def tune_calls(dtypes) -> List[registry.LinearCall]:
    """The calls ``python -m pydlx.tune`` measures for this family: the GPU benchmark's shapes, training first."""
    return [registry.LinearCall(dt, training, M, N, K) for dt in dtypes for training in (True, False)
            for M, N, K in GPU_SHAPES]
