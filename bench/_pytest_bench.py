"""Shared body of the pytest-benchmark files bench/bench_<family>.py: one test per case x provider x mode,
grouped by (op, shape, dtype, mode) so pydlx, eager and compile sit side by side. Standalone: no conftest."""
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

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMALL = DEVICE.type == "cpu"  # CPU: the small shapes
ROUNDS = 50 if DEVICE.type == "cuda" else 5


def params(cases_fn):
    return [pytest.param(case, provider, mode, id=f"{case.op}-{case.shape}-{case.dtype_name}-{provider}-{mode}",
                         marks=pytest.mark.benchmark(group=f"{case.op}-{case.shape}-{case.dtype_name}-{mode}"))
            for case in cases_fn(DEVICE, small=SMALL) for provider in PROVIDERS for mode in MODES]


def run(benchmark, case, provider, mode):
    fwd, fwdbwd = case.make(provider)
    fn = fwd if mode == "fwd" else fwdbwd

    def call():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    benchmark.extra_info.update(op=case.op, shape=case.shape, dtype=case.dtype_name, provider=provider,
                                mode=mode, device=str(DEVICE))
    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1)
