"""The benchmark families build their cases (GPU lists too, without allocating) and each family's first CPU case
runs for pydlx and eager, forward and forward+backward, through the runner the main job uses."""
import pytest
import torch

from pydlx import bench
from pydlx.bench.__main__ import FAMILIES


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_cases_build_and_run(family):
    gpu_cases = FAMILIES[family](torch.device("cpu"), small=False)
    small = FAMILIES[family](torch.device("cpu"), small=True)
    assert gpu_cases and small and all(c.family == family for c in gpu_cases + small)
    assert any(c.dtype == torch.bfloat16 for c in gpu_cases)
    rows = bench.run_cases(small[:1], providers=("pydlx", "eager"), modes=bench.MODES, device="cpu",
                           progress=False, warmup=1, rep=1)
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in ("pydlx", "eager") for m in bench.MODES}
    assert all(float(r["median_ms"]) > 0 for r in rows)
