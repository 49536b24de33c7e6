"""The benchmark families build their cases (GPU lists too, without allocating) and each family's first CPU case
runs for pydlx and eager, forward and forward+backward, through the runner the main job uses."""
import os
import time

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


def test_providers_are_measured_interleaved_so_drift_falls_on_all_alike():
    """Identical work: a slow phase (warm-up, a neighbour's load) must not show up as a speedup of one provider."""
    state = {"calls": 0, "slow_until": 0}

    def work():
        state["calls"] += 1
        time.sleep(0.004 if state["calls"] <= state["slow_until"] else 0.001)

    def a():
        work()

    def b():
        work()

    state.update(calls=0, slow_until=2 + 30)  # the two warm-up calls, then the first 30 timed calls are slow
    t = bench.measure({"a": a, "b": b}, "cpu", warmup=1, rep=40)
    assert 0.8 < t["a"][0] / t["b"][0] < 1.25, t
    # measured one after the other (what the runner did before): every slow call falls on a
    state.update(calls=0, slow_until=1 + 30)
    ta, tb = bench.time_fn(a, "cpu", warmup=1, rep=40), bench.time_fn(b, "cpu", warmup=1, rep=40)
    assert ta[0] / tb[0] > 2


def _row(provider, med, p20, p80):
    return {"op": "linear_relu", "shape": "8x8x8", "dtype": "fp32", "mode": "fwd", "provider": provider,
            "median_ms": med, "p20_ms": p20, "p80_ms": p80, "gpu": "cpu", "torch": "t", "triton": "t", "cuda": "c",
            "commit": "abc", "timestamp": "now", "family": "linear"}


def test_a_ratio_within_the_noise_is_marked_unstable_in_table_and_plot(tmp_path, capsys):
    eager = _row("eager", 1.0, 0.9, 1.3)
    noisy = _row("pydlx", 0.5, 0.2, 1.5)  # median 2x faster, but the spreads overlap
    clear = _row("compile", 0.5, 0.48, 0.55)  # 2x, resolved
    assert bench.speedup(eager, noisy) == (2.0, False)
    assert bench.speedup(eager, clear) == (2.0, True)
    bench.print_table([eager, noisy, clear])
    out = capsys.readouterr().out
    assert "2.00x?" in out and "unstable (1)" in out
    png = bench.plot([eager, noisy, clear], tmp_path / "chart.png")
    assert png is not None and png.stat().st_size > 0


def test_one_resolution_rule_for_every_report():
    """bench.ratio decides for the benchmark table (speedup), the host-cost table (host.ratios) and the seed-model
    report (format_change): resolved only where the two p20..p80 ranges do not overlap."""
    from pydlx.bench import host

    cases = [((1.0, 0.9, 1.3), (0.5, 0.2, 1.5), False),   # medians 2x apart, ranges overlap
             ((1.0, 0.9, 1.3), (0.5, 0.48, 0.55), True),  # apart
             ((1.0, 0.9, 1.3), (0.8, 0.7, 0.9), False),   # ranges touch
             ((1.0, 0.9, 1.1), (2.0, 1.8, 2.2), True)]    # apart, slower
    for (e_med, e20, e80), (med, p20, p80), want in cases:
        r = bench.ratio((e_med, e20, e80), (med, p20, p80))
        assert r.resolved is want and r.median == e_med / med and (r.lo, r.hi) == (e20 / p80, e80 / p20)
        assert bench.speedup(_row("eager", e_med, e20, e80), _row("pydlx", med, p20, p80)) == (r.median, want)
        rows = [dict(_row(p, *t), family="host") for p, t in (("eager", (e_med, e20, e80)),
                                                               ("pydlx", (med, p20, p80)))]
        [(*_, q, resolved)] = host.ratios(rows)
        assert (q, resolved) == (med / e_med, want)  # (pydlx / eager: the same rule from the other side)
        assert ("speedup" in bench.format_change((e_med, e20, e80), (med, p20, p80))) is want


def test_host_cost_benchmark_runs_every_chain_through_the_op_path(tmp_path, capsys):
    """python -m pydlx.bench --host on the CPU, a few calls (a benchmark run, not a timed test): a row per chain,
    provider and mode, per-call times in the CSV schema, the table with pydlx / eager; the op path really runs (the
    benchmark refuses a chain whose pydlx path runs no pydlx op)."""
    import csv

    from pydlx.bench import host
    from pydlx.bench.__main__ import main

    assert main(["--host", "--device", "cpu", "--host-calls", "2", "--rounds", "2", "--out-dir", str(tmp_path),
                 "--name", "host"]) == 0
    with open(tmp_path / "host.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    want = {(c.name, p, m) for c in host.CASES for m in c.modes for p in ("eager", "pydlx")}
    assert {(r["op"], r["provider"], r["mode"]) for r in rows} == want
    assert all(r["family"] == "host" and float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
               for r in rows)
    out = capsys.readouterr().out
    assert "pydlx / eager" in out and all(c.name in out for c in host.CASES)
    broken = host.HostCase("no_op", "-", 1,
                           lambda device: (torch.relu, torch.relu, torch.randn(3), torch.nn.Linear(1, 1)))
    with pytest.raises(RuntimeError, match="ran no pydlx op"):
        host.run("cpu", calls=1, rounds=1, cases=[broken], progress=False)


@pytest.mark.interpreter
def test_host_cost_benchmark_times_each_pydlx_provider(capsys):
    """A GPU's providers (what auto picks, and the Triton backend forced), here on the CPU with the Triton backend
    under the interpreter: a row for each provider and mode, a ratio line for each; a forced backend that cannot
    run a case (the C++/CUDA one on a CPU) gives that case no row rather than an error."""
    from pydlx.bench import host

    assert host.providers_for(torch.device("cuda")) == {"pydlx": None, "pydlx-triton": "triton",
                                                         "pydlx-triton-run": "triton"}
    cases = [c for c in host.CASES if c.name in ("linear_relu", "conv_relu_pool")]
    rows = host.run("cpu", calls=1, rounds=1, cases=cases, progress=False,
                    providers={"pydlx": "reference", "pydlx-triton": "triton", "pydlx-triton-run": "triton",
                               "pydlx-cuda": "cuda"})
    mine = ("pydlx", "pydlx-triton", "pydlx-triton-run")
    want = {(c.name, p, m) for c in cases for m in c.modes for p in ("eager", *mine)}
    assert {(r["op"], r["provider"], r["mode"]) for r in rows} == want
    assert sorted((op, mode, r["provider"]) for op, _, mode, _, r, _, _ in host.ratios(rows)) == sorted(
        (c.name, m, p) for c in cases for m in c.modes for p in mine)
    host.print_table(rows)
    assert "pydlx-triton" in capsys.readouterr().out
    # pydlx-triton-run's samples launch through Triton's run: the switch is off inside them, as it was outside
    from pydlx.triton import common
    before, seen = common.DIRECT, []
    for through in (True, False):
        host._loop(lambda t: seen.append(common.DIRECT) or t, torch.randn(2), False, 1, "triton", through)()
    assert seen == [False, before] and common.DIRECT == before


def test_the_launch_host_benchmark_runs_on_a_cpu():
    """bench/launch_host.py (the Triton launcher's Python per launch, the JIT run replaced by a no-op; then the
    compiled kernels' launches through Triton's run, recorded) runs without a GPU and reports each provider of
    both parts; in a process of its own (the kernels compiled, not interpreted): it replaces the kernels' launch."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "bench", "launch_host.py")], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONPATH": root, "TRITON_INTERPRET": "0"},
                         check=True).stdout
    rows = [line for line in out.splitlines() if " us (" in line]
    assert len(rows) == 14, out
    for call in ("linear_fwd", "linear_bwd"):
        for provider in ("compiled, pydlx direct", "compiled, Triton's run"):
            assert any(r.startswith(call) and provider in r for r in rows), (call, provider, out)
    for launch in ("linear fwd", "linear bwd dx"):
        for provider in ("pydlx (config kept)", "triton autotuner (cached)", "prune + autotuner (before)",
                         "the launch call alone"):
            assert any(r.startswith(launch) and provider in r for r in rows), (launch, provider, out)
    for call in ("linear_fwd", "linear_bwd"):
        assert any(r.startswith(call) and "whole backend call" in r for r in rows), (call, out)


def test_the_host_floor_benchmark_runs_on_a_cpu():
    """bench/host_floor.py (the op path against the same call with its autograd, or all of it, in C++, and a floor
    without math) builds its C++ library, checks that every provider computes eager's output and input gradient,
    and reports each provider of both chains; in a process of its own: it registers a torch library."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "bench", "host_floor.py"), "--calls", "2",
                          "--rounds", "2"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": root}, check=True).stdout
    rows = [line.split(" us (")[0].strip() for line in out.splitlines() if " us (" in line]
    names = [r.rsplit(None, 1)[0].strip() for r in rows]
    assert names == ["eager", "pydlx", "c++ autograd, python impl", "python Function", "c++ all",
                     "eager", "pydlx", "c++ all", "floor (no math)"], out
