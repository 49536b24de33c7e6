"""The GPU check's driver (scripts/gpu_check.py) end to end on the CPU (--dry-run: the Triton kernels under the
interpreter, tiny benchmark sizes), so that the one command to run first on a CUDA machine cannot rot between GPU
runs."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_tier(tmp_path):
    out = tmp_path / "report"
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--dry-run", "--minutes", "2.5",
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {"log.txt", "tier0.xml", "tier1.xml", "graphs.xml", "bench.csv", "summary.md"} <= names, names
    assert len(names) <= 8, f"the report is at most 8 files (easy to copy off a remote machine): {names}"
    summary = (out / "summary.md").read_text()
    for step in ("tier 0: every kernel once | 0", "tier 0: headline benchmarks | 0", "tier 0: host cost | 0",
                 "tier 1: GPU test suite | 0", "tier 1: CUDA graphs | 0"):
        assert step in summary, summary
    for family in ("linear", "mlp", "conv_relu_pool", "lstm", "lstm_cell"):  # every kernel ran, and passed
        assert f"| {family} | triton | 3 | 0 |" in summary, summary
    assert "| linear_relu | 256x256x256 | fp32 | fwd | pydlx |" in summary  # a headline row landed
    # the CUDA-graph tests ran on their own step: their CPU tests passed (the GPU ones skip on a CPU), and the suite
    # step left them out (no test of theirs in tier1.xml)
    assert re.search(r"\| cuda_graphs \| triton \| [1-9]\d* \| 0 \| [1-9]", summary), summary
    assert "test_cuda_graphs" not in (out / "tier1.xml").read_text()
    log = (out / "log.txt").read_text()
    assert "policy: skipped (dry run" in log and "done in" in log


def test_files_left_out_of_the_gpu_tier_hold_no_gpu_test():
    """The files tier 1 leaves out (their imports may be missing on a GPU machine) must not hold a GPU test, which
    would then never run."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    assert gpu_check.NO_GPU_TESTS
    for path in gpu_check.NO_GPU_TESTS:
        with open(os.path.join(ROOT, path)) as f:
            assert not re.search(r"\bmark\.gpu\b", f.read()), path
