"""pytest-benchmark suite for the linear family (the cases of pydlx/bench/linear.py).

    pytest bench/bench_linear.py                          # cuda if available, else cpu with small shapes
    pytest bench/bench_linear.py -k "eager or pydlx" --benchmark-disable     # a one-call smoke run

One group per (op, shape, dtype, mode), so pydlx, eager and compile are compared side by side. Standalone: no
conftest needed. The compile provider is never skipped: if torch.compile cannot build (no C++ compiler on CPU,
no Triton on CUDA), its tests fail.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

try:
    import pydlx  # noqa: F401
except ImportError:  # run from a checkout without PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydlx.bench import MODES, PROVIDERS  # noqa: E402
from pydlx.bench.linear import cases  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMALL = DEVICE.type == "cpu"
ROUNDS = 50 if DEVICE.type == "cuda" else 5

CASES = cases(DEVICE, small=SMALL)
PARAMS = [
    pytest.param(case, provider, mode,
                 id=f"{case.op}-{case.shape}-{case.dtype_name}-{provider}-{mode}",
                 marks=pytest.mark.benchmark(group=f"{case.op}-{case.shape}-{case.dtype_name}-{mode}"))
    for case in CASES for provider in PROVIDERS for mode in MODES
]


@pytest.mark.parametrize("case,provider,mode", PARAMS)
def test_linear(benchmark, case, provider, mode):
    fwd, fwdbwd = case.make(provider)
    fn = fwd if mode == "fwd" else fwdbwd
    if DEVICE.type == "cuda":
        def run():
            fn()
            torch.cuda.synchronize(DEVICE)
    else:
        run = fn
    benchmark.extra_info.update(op=case.op, shape=case.shape, dtype=case.dtype_name, provider=provider,
                                mode=mode, device=str(DEVICE))
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
