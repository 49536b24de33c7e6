"""Shared benchmark machinery for ``python -m pydlx.bench`` and bench/bench_*.py.

A family module (pydlx/bench/linear.py, ...) lists ``Case``s; ``run_cases`` times each case for each provider
(``pydlx``, ``eager``, ``compile``) and mode (``fwd``, ``fwdbwd``), all of a case's providers and modes interleaved
in rounds after each has warmed up (``measure``), and returns CSV rows (``CSV_COLUMNS``), which ``print_table``,
``append_csv`` and ``plot`` consume; a speedup whose p20..p80 spreads overlap is marked unstable (``ratio``: the
one rule every report that compares two timings applies).
Importing this module does no work.
"""
from __future__ import annotations

import csv
import datetime
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .. import _policy, registry
from .._timing import Ratio, _sync, format_change, measure, ratio, time_fn  # noqa: F401  (re-exported)

CSV_COLUMNS = ["family", "op", "provider", "mode", "dtype", "shape", "median_ms", "p20_ms", "p80_ms",
               "gpu", "torch", "triton", "cuda", "commit", "timestamp"]
# pydlx: pydlx under ``auto`` (what a user gets); eager: PyTorch (cuBLAS / cuDNN); compile: torch.compile of eager;
# pydlx-<backend>: that registered backend forced (pydlx/registry.py; the rows a measured policy is made from,
# pydlx/_policy.py)
CPU_PROVIDERS = ("pydlx", "eager", "compile")


def providers() -> Tuple[str, ...]:
    """Every provider: the CPU ones and pydlx-<backend> for each backend a measured policy may choose."""
    return CPU_PROVIDERS + tuple(f"pydlx-{b}" for b in registry.candidates())


PROVIDERS = providers()  # (the built-in backends')
MODES = ("fwd", "fwdbwd")
DTYPE_NAMES = registry.DTYPE_NAMES


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


class Trial(NamedTuple):
    """One call of a family built from its call descriptor (``pydlx/bench/<family>.py`` ``trial(call, device,
    generator)``), which measuring on first use checks and times (pydlx/_measure.py): ``inputs``, fresh random
    tensors of the call's shapes and dtype; ``fused(*inputs)``, the pydlx entry point (run with a backend forced);
    ``eager(*inputs)``, the PyTorch chain it replaces, also the float64 reference on float64 copies of the inputs.
    Each returns one tensor, whose gradient with respect to every input a training call also checks and times."""
    inputs: Tuple[torch.Tensor, ...]
    fused: Callable[..., torch.Tensor]
    eager: Callable[..., torch.Tensor]


# The headline case of each goal (README "Benchmark results"): (family, op, shape, dtype) -> the goal, in words.
# The GPU check times these first (tier 0); ``--select headline`` picks them, ``--select rest`` the others.
GOALS = {
    ("linear", "linear_relu", "65536x256x256", "bf16"): "fwd and fwd+bwd >= 1.2x eager",
    ("linear", "linear_relu", "4096x4096x4096", "bf16"): "fwd and fwd+bwd >= eager, cuBLAS + activation",
    ("mlp", "autoencoder", "4096:784-400-200-32-200-400-784", "bf16"): "fwd+bwd >= 1.5x eager, >= 1.2x compile",
    ("mlp", "mlp_64x4", "1048576:64-64-64-64-64-16", "bf16"): "fwd >= 2x eager, >= 1.5x compile",
    ("conv_relu_pool", "seed_conv1", "256,3,32,32->32 3x3 s1 p1 pool2/2", "bf16"): "fwd >= 1.5x eager, >= 1.2x "
                                                                                   "compile; fwd+bwd >= 1.2x",
    ("conv_relu_pool", "seed_conv2", "256,32,16,16->64 3x3 s1 p1 pool2/2", "bf16"): "fwd >= 1.5x eager, >= 1.2x "
                                                                                    "compile; fwd+bwd >= 1.2x",
    ("lstm", "lstm_packed", "100:64x256", "bf16"): ">= 3x nn.LSTM on the same packed input",
    ("lstm", "lstm", "1024:16x768", "bf16"): "cuda: < 1.5 us a step (1.5 ms here), >= 3x cuDNN fwd at batch 1-7",
    ("lstm", "lstm", "1024:1x768", "bf16"): "cuda: >= 3x cuDNN forward at batch 1-7",
    ("model", "cnn", "batch 256", "bf16"): "training step faster after optimize(), fp32 and bf16",
    ("model", "autoencoder", "batch 256", "bf16"): "training step faster after optimize()",
}


def goal(case_or_row) -> Optional[str]:
    if isinstance(case_or_row, Case):
        key = (case_or_row.family, case_or_row.op, case_or_row.shape, case_or_row.dtype_name)
    else:
        r = case_or_row
        key = (r["family"], r["op"], r["shape"], r["dtype"])
    return GOALS.get(key)


def pick(provider: str, state: dict, eager, fused: Callable[[], object]):
    """A case's callable for a provider: ``eager`` as written, ``fused()`` (pydlx) built on demand, or
    torch.compile(eager) compiled once per case (``state`` keeps it; a fresh dynamo cache per case, so that later
    shapes neither hit the recompile limit nor go dynamic)."""
    if provider == "pydlx":
        return fused()
    if provider == "eager":
        return eager
    if provider == "compile":
        if "compiled" not in state:
            torch._dynamo.reset()
            state["compiled"] = torch.compile(eager, dynamic=False)
        return state["compiled"]
    raise ValueError(f"unknown provider {provider!r}")


def _git(args: Sequence[str], cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()


def env_info(device) -> Dict[str, str]:
    """gpu ("<name> (sm_<cc>)", or "cpu"), torch, triton, cuda, commit and timestamp columns for this run."""
    device = torch.device(device)
    gpu = "cpu"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        gpu = f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
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


def row_times(row: Dict) -> Tuple[float, float, float]:
    """A CSV row's (median, p20, p80)."""
    return _policy._times(row)


def speedup(eager: Dict, row: Dict) -> Tuple[Optional[float], bool]:
    """(eager's median / the row's median, whether that ratio is stable: ``ratio``) for two CSV rows of one case
    and mode."""
    if min(row_times(row)) <= 0:
        return None, False
    r = ratio(row_times(eager), row_times(row))
    return r.median, r.resolved


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
    """{(op, shape, dtype, provider): {mode: (median_ms, speedup vs eager or None, stable)}}, in row order."""
    eager = {(r["op"], r["shape"], r["dtype"], r["mode"]): r for r in rows if r["provider"] == "eager"}
    out: Dict[tuple, Dict[str, tuple]] = {}
    for r in rows:
        base = eager.get((r["op"], r["shape"], r["dtype"], r["mode"]))
        sp, stable = speedup(base, r) if base is not None and r["provider"] != "eager" else (None, True)
        out.setdefault((r["op"], r["shape"], r["dtype"], r["provider"]), {})[r["mode"]] = (
            float(r["median_ms"]), sp, stable)
    return out


def print_table(rows: Sequence[Dict]) -> None:
    """One line per (op, shape, dtype, provider): fwd and fwd+bwd medians, and speedups over eager; a ratio the
    p20..p80 spreads do not resolve is marked ``?`` (unstable)."""
    header = ("op", "shape", "dtype", "provider", "fwd ms", "fwd x", "fwd+bwd ms", "fwd+bwd x")
    lines, unstable = [], 0
    for (op, shape, dtype, provider), by_mode in _speedups(rows).items():
        cells = [op, shape, dtype, provider]
        for mode in MODES:
            ms, sp, stable = by_mode.get(mode, (None, None, True))
            unstable += sp is not None and not stable
            cells += ["-" if ms is None else f"{ms:.3f}",
                      "-" if sp is None else f"{sp:.2f}x" + ("" if stable else "?")]
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    fmt = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(w) if i < 4 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    print(fmt(header))
    print("  ".join("-" * w for w in widths))
    for cells in lines:
        print(fmt(cells))
    if unstable:
        print(f"? unstable ({unstable}): eager's and the provider's p20..p80 ranges overlap, so the ratio is within "
              "the measurement's noise, not a speedup")
    print(flush=True)


def plot(rows: Sequence[Dict], png_path) -> Optional[Path]:
    """Speedup over eager on a log axis, a bar per provider for each (op, shape, dtype), a subplot per mode;
    unstable ratios (``speedup``) are drawn hollow and hatched, without a value: never as a speedup."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
        from matplotlib.ticker import FuncFormatter
    except Exception as e:
        print(f"note: no plot ({type(e).__name__}: {e})", flush=True)
        return None
    table = _speedups(rows)
    groups = list(dict.fromkeys(k[:3] for k in table))
    providers = [p for p in dict.fromkeys(k[3] for k in table) if p != "eager"]
    modes = [m for m in MODES if any(m in v for v in table.values())]
    if not providers or not modes or not any(sp for v in table.values() for _, sp, _ in v.values()):
        print("note: no plot (needs eager and at least one other provider)", flush=True)
        return None
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(7.0, 0.9 * len(groups) + 3), 4.2 * len(modes)),
                             squeeze=False)
    width = 0.8 / len(providers)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, mode in zip(axes[:, 0], modes):
        for i, prov in enumerate(providers):
            for j, g in enumerate(groups):
                _, sp, stable = table.get((*g, prov), {}).get(mode, (None, None, True))
                if not sp:
                    continue
                x = j + (i - (len(providers) - 1) / 2) * width
                color = colors[i % len(colors)]
                # bars grow from 1x (no change) up or down, on a log axis
                bar = ax.bar(x, sp - 1.0, width, bottom=1.0, color=color if stable else "none", edgecolor=color,
                             hatch=None if stable else "///")
                ax.bar_label(bar, labels=[f"{sp:.2f}" if stable else "?"], fontsize=7)
        ax.set_yscale("log")
        vals = [sp for v in table.values() for m, (_, sp, _) in v.items() if m == mode and sp]
        ax.set_ylim(min(0.5, min(vals) / 1.3), max(2.0, max(vals) * 1.3))
        label = FuncFormatter(lambda v, _: f"{v:g}x")
        ax.yaxis.set_major_formatter(label)
        ax.yaxis.set_minor_formatter(label)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{op} {shape} {dt}" for op, shape, dt in groups], fontsize=7, rotation=35,
                           ha="right")
        ax.set_ylabel("speedup over eager (log)")
        ax.set_title({"fwd": "forward", "fwdbwd": "forward + backward"}[mode]
                      + "   (hatched, '?': unstable, within the noise)", fontsize=9)
        ax.legend(handles=[Patch(color=colors[i % len(colors)], label=p) for i, p in enumerate(providers)],
                  fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"pydlx vs eager: {r0['gpu']}, torch {r0['torch']}, triton {r0['triton']}, CUDA {r0['cuda']}, "
                 f"commit {r0['commit']}", fontsize=9)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def _make(case: Case, provider: str):
    """The case's (fwd, fwdbwd) closures for a provider; ``pydlx-<backend>`` runs the ``pydlx`` ones with that
    backend forced (a call it cannot run raises BackendUnavailableError: shown as n/a)."""
    if not provider.startswith("pydlx-"):
        return case.make(provider)
    import pydlx

    backend = provider[len("pydlx-"):]
    fns = case.make("pydlx")

    def forced(fn):
        def run():
            with pydlx.use_backend(backend):
                return fn()
        return run

    return tuple(forced(f) for f in fns)


def run_cases(cases: Sequence[Case], providers: Sequence[str] = CPU_PROVIDERS, modes: Sequence[str] = MODES,
              device="cpu", progress: bool = True, warmup: Optional[int] = None,
              rep: Optional[int] = None, deadline: Optional[float] = None) -> List[Dict]:
    """Time every case x provider x mode; a provider that fails is reported and skipped, not fatal.

    ``deadline`` (a time.monotonic() value): cases not started by then are listed as skipped, so a time-boxed
    run (the GPU check) still writes what it measured."""
    device = torch.device(device)
    env = env_info(device)
    wanted = providers

    def pick(case):
        return ([p for p in wanted if case.providers is None or p in case.providers],
                [m for m in modes if case.modes is None or m in case.modes])

    total, n, rows = sum(len(pick(c)[0]) * len(pick(c)[1]) for c in cases), 0, []
    for case in cases:
        case_providers, case_modes = pick(case)
        if deadline is not None and time.monotonic() > deadline:
            print(f"time budget spent: skipped {case.op} {case.shape} {case.dtype_name}", flush=True)
            n += len(case_providers) * len(case_modes)
            continue
        # build every provider x mode of the case, run each once (compiling / autotuning outside the timing),
        # then time them interleaved (``measure``)
        fns = {}
        for provider in case_providers:
            try:
                built = dict(zip(MODES, _make(case, provider)))
                err = None
            except Exception as e:
                built, err = {}, e
            for mode in case_modes:
                try:
                    if err is not None:
                        raise err
                    built[mode]()
                    _sync(device)
                    fns[(provider, mode)] = built[mode]
                except Exception as e:
                    n += 1
                    msg = (str(e).strip().splitlines() or [""])[0][:200]
                    from pydlx import BackendUnavailableError
                    what = "n/a" if isinstance(e, BackendUnavailableError) else f"FAILED ({type(e).__name__}"
                    if progress:
                        print(f"[{n}/{total}] {case.op} {case.shape} {case.dtype_name} {provider} {mode} ... "
                              f"{what}: {msg}{'' if what == 'n/a' else ')'}", flush=True)
        if not fns:
            continue
        try:
            timed = measure(fns, device, warmup=warmup, rep=rep)
        except Exception as e:
            msg = (str(e).strip().splitlines() or [""])[0][:200]
            print(f"{case.op} {case.shape} {case.dtype_name}: timing FAILED ({type(e).__name__}: {msg})", flush=True)
            n += len(fns)
            continue
        for (provider, mode), (med, p20, p80) in timed.items():
            n += 1
            if progress:
                print(f"[{n}/{total}] {case.op} {case.shape} {case.dtype_name} {provider} {mode} ... {med:.3f} ms "
                      f"(p20 {p20:.3f}, p80 {p80:.3f})", flush=True)
            rows.append({"family": case.family, "op": case.op, "provider": provider, "mode": mode,
                         "dtype": case.dtype_name, "shape": case.shape, "median_ms": f"{med:.6f}",
                         "p20_ms": f"{p20:.6f}", "p80_ms": f"{p80:.6f}", **env})
        del fns
    return rows
