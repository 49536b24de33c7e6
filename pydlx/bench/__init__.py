"""Shared benchmark machinery for ``python -m pydlx.bench`` and bench/bench_*.py.

A family module (pydlx/bench/linear.py, ...) lists ``Case``s; ``run_cases`` times each case for each provider
(``pydlx``, ``eager``, ``compile``) and mode (``fwd``, ``fwdbwd``) and returns CSV rows (``CSV_COLUMNS``), which
``print_table``, ``append_csv`` and ``plot`` consume. Importing this module does no work.
"""
from __future__ import annotations

import csv
import datetime
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

CSV_COLUMNS = ["family", "op", "provider", "mode", "dtype", "shape", "median_ms", "p20_ms", "p80_ms",
               "gpu", "torch", "triton", "cuda", "commit", "timestamp"]
PROVIDERS = ("pydlx", "eager", "compile")
MODES = ("fwd", "fwdbwd")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


@dataclass
class Case:
    """One benchmark case. ``make(provider)`` builds inputs on the case's device and returns
    ``(fwd_fn, fwdbwd_fn)``, zero-argument closures; nothing is allocated until it is called."""
    family: str
    op: str
    shape: str
    dtype: torch.dtype
    make: Callable[[str], Tuple[Callable[[], object], Callable[[], object]]]
    providers: Optional[Tuple[str, ...]] = None  # only these providers (None: all)
    modes: Optional[Tuple[str, ...]] = None  # only these modes (None: all)

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, str(self.dtype).replace("torch.", ""))


def _git(args: Sequence[str], cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()


def env_info(device) -> Dict[str, str]:
    """gpu, torch, triton, cuda, commit and timestamp columns for this run."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    root = Path(__file__).resolve().parent.parent.parent
    try:
        commit = _git(["rev-parse", "--short", "HEAD"], root)
        if _git(["status", "--porcelain"], root):
            commit += "+dirty"
    except Exception:
        commit = "unknown"
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda or "none", "commit": commit, "timestamp": stamp}


def time_fn(fn: Callable[[], object], device, warmup: Optional[int] = None,
            rep: Optional[int] = None) -> Tuple[float, float, float]:
    """(median, p20, p80) of ``fn()`` in milliseconds.

    CUDA: ``triton.testing.do_bench``; ``warmup`` and ``rep`` are milliseconds of warm-up and timing
    (default 25 and 100). CPU: wall clock; ``warmup`` and ``rep`` are numbers of calls (default 3 and 20).
    """
    device = torch.device(device)
    if device.type == "cuda":
        warmup = 25 if warmup is None else warmup
        rep = 100 if rep is None else rep
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            res = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
            if isinstance(res, (list, tuple)):
                return float(res[0]), float(res[1]), float(res[2])
            return float(res), float(res), float(res)
        # no triton: CUDA events, ~rep ms of calls after ~warmup ms of calls
        fn()
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
        for _ in range(max(1, int(warmup / est_ms))):
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(max(1, int(rep / est_ms)))]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        warmup = 3 if warmup is None else warmup
        rep = 20 if rep is None else rep
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(max(1, rep)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    if len(times) < 2:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def append_csv(path, rows: Sequence[Dict]) -> None:
    """Append ``rows`` to the CSV at ``path``, writing the header first if the file is new or empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="raise")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in CSV_COLUMNS})


def _speedups(rows: Sequence[Dict]):
    """{(op, shape, dtype, provider): {mode: (median_ms, speedup vs eager or None)}}, in row order."""
    eager = {(r["op"], r["shape"], r["dtype"], r["mode"]): float(r["median_ms"])
             for r in rows if r["provider"] == "eager"}
    out: Dict[tuple, Dict[str, tuple]] = {}
    for r in rows:
        ms = float(r["median_ms"])
        base = eager.get((r["op"], r["shape"], r["dtype"], r["mode"]))
        out.setdefault((r["op"], r["shape"], r["dtype"], r["provider"]), {})[r["mode"]] = (
            ms, base / ms if base is not None and ms > 0 else None)
    return out


def print_table(rows: Sequence[Dict]) -> None:
    """One line per (op, shape, dtype, provider): fwd and fwd+bwd medians, and speedups over eager."""
    header = ("op", "shape", "dtype", "provider", "fwd ms", "fwd x", "fwd+bwd ms", "fwd+bwd x")
    lines = []
    for (op, shape, dtype, provider), by_mode in _speedups(rows).items():
        cells = [op, shape, dtype, provider]
        for mode in MODES:
            ms, sp = by_mode.get(mode, (None, None))
            cells += ["-" if ms is None else f"{ms:.3f}", "-" if sp is None else f"{sp:.2f}x"]
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    fmt = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(w) if i < 4 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    print(fmt(header))
    print("  ".join("-" * w for w in widths))
    for cells in lines:
        print(fmt(cells))
    print(flush=True)


def plot(rows: Sequence[Dict], png_path) -> Optional[Path]:
    """Bar chart of speedup over eager, per (op, shape, dtype), one bar per provider; a subplot per mode."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        print(f"note: no plot ({type(e).__name__}: {e})", flush=True)
        return None
    table = _speedups(rows)
    groups = list(dict.fromkeys(k[:3] for k in table))
    providers = [p for p in dict.fromkeys(k[3] for k in table) if p != "eager"]
    modes = [m for m in MODES if any(m in v for v in table.values())]
    if not providers or not modes or not any(sp for v in table.values() for _, sp in v.values()):
        print("note: no plot (needs eager and at least one other provider)", flush=True)
        return None
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(6.0, 1.1 * len(groups) + 2), 3.6 * len(modes)),
                             squeeze=False)
    width = 0.8 / len(providers)
    for ax, mode in zip(axes[:, 0], modes):
        for i, prov in enumerate(providers):
            vals = [table.get((*g, prov), {}).get(mode, (None, None))[1] or 0.0 for g in groups]
            xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(groups))]
            bars = ax.bar(xs, vals, width, label=prov)
            ax.bar_label(bars, labels=[f"{v:.2f}" if v else "" for v in vals], fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{op}\n{shape}\n{dt}" for op, shape, dt in groups], fontsize=7)
        ax.set_ylabel("speedup over eager")
        ax.set_title({"fwd": "forward", "fwdbwd": "forward + backward"}[mode])
        ax.legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"pydlx vs eager: {r0['gpu']}, torch {r0['torch']}, commit {r0['commit']}", fontsize=9)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_cases(cases: Sequence[Case], providers: Sequence[str] = PROVIDERS, modes: Sequence[str] = MODES,
              device="cpu", progress: bool = True, warmup: Optional[int] = None,
              rep: Optional[int] = None, deadline: Optional[float] = None) -> List[Dict]:
    """Time every case x provider x mode; a provider that fails is reported and skipped, not fatal.

    ``deadline`` (a time.monotonic() value): cases not started by then are listed as skipped, so a time-boxed
    run (the GPU check) still writes what it measured."""
    device = torch.device(device)
    env = env_info(device)
    def pick(case):
        return ([p for p in providers if case.providers is None or p in case.providers],
                [m for m in modes if case.modes is None or m in case.modes])

    total, n, rows = sum(len(pick(c)[0]) * len(pick(c)[1]) for c in cases), 0, []
    for case in cases:
        case_providers, case_modes = pick(case)
        if deadline is not None and time.monotonic() > deadline:
            print(f"time budget spent: skipped {case.op} {case.shape} {case.dtype_name}", flush=True)
            n += len(case_providers) * len(case_modes)
            continue
        for provider in case_providers:
            fns, build_err = None, None
            try:
                fns = dict(zip(MODES, case.make(provider)))
            except Exception as e:
                build_err = e
            for mode in case_modes:
                n += 1
                if progress:
                    print(f"[{n}/{total}] {case.op} {case.shape} {case.dtype_name} {provider} {mode} ... ",
                          end="", flush=True)
                try:
                    if build_err is not None:
                        raise build_err
                    fn = fns[mode]
                    fn()  # first call: compiles / autotunes outside the timing
                    _sync(device)
                    med, p20, p80 = time_fn(fn, device, warmup=warmup, rep=rep)
                except Exception as e:
                    msg = (str(e).strip().splitlines() or [""])[0][:200]
                    if progress:
                        print(f"FAILED ({type(e).__name__}: {msg})", flush=True)
                    continue
                if progress:
                    print(f"{med:.3f} ms", flush=True)
                rows.append({"family": case.family, "op": case.op, "provider": provider, "mode": mode,
                             "dtype": case.dtype_name, "shape": case.shape, "median_ms": f"{med:.6f}",
                             "p20_ms": f"{p20:.6f}", "p80_ms": f"{p80:.6f}", **env})
            del fns
    return rows
