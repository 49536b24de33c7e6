"""pytest-benchmark suite for the model family (the cases of pydlx/bench/model.py).

    pytest bench/bench_model.py                                             # cuda if available, else cpu (small)
    pytest bench/bench_model.py -k "eager or pydlx" --benchmark-disable     # a one-call smoke run

The compile provider is never skipped: if torch.compile cannot build, its tests fail.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _pytest_bench import params, run  # noqa: E402

from pydlx.bench.model import cases  # noqa: E402


@pytest.mark.parametrize("case,provider,mode", params(cases))
def test_model(benchmark, case, provider, mode):
    run(benchmark, case, provider, mode)
