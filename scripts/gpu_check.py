"""The GPU check: tiered, incremental, time-boxed. ``bash scripts/gpu_check.sh [--minutes N] [--dry-run]``.

Tiers, in order, each writing its results under $OUT as they land (a run cut at any point still reports what it
covered), each step under its own timeout so that a hung kernel cannot eat the budget:
  tier 0  environment and ceilings, the C++/CUDA extension taken from a binary wheel built from these sources
          (--wheel, default the newest dist/pydlx-*.whl: no compile) or else built (sm of this GPU only, all cores),
          every shipped kernel x dtype x backend once against float64 (tests/test_gpu_smoke.py), and the headline benchmark case
          of each goal (pydlx auto / pydlx-triton / pydlx-cuda vs eager vs torch.compile), the host cost per call
          at tiny shapes (python -m pydlx.bench --host), and measuring on first use as a user runs it
          (python -m pydlx.tune on the seed CNN's shapes);
  tier 1  the full GPU test suite (pytest -m gpu; xdist workers and per-test timeouts where installed), then the
          CUDA-graph tests (tests/test_cuda_graphs.py: the seed models' inference and training step captured with
          torch.cuda.graphs and with torch.compile(mode="reduce-overhead"), each backend forced), on their own
          bounded step;
  tier 2  the rest of the benchmark grid, bf16 first, until the budget is spent;
  last    the measured policy (python -m pydlx.bench --make-policy) and summary.md.
The report goes to --out, else $OUT when set, else ./gpu-report in the repository. It is at most 8 files, so it is
easy to copy off a remote machine: log.txt (everything, as it happens), tier0.xml, tier1.xml and graphs.xml (junit),
bench.csv, bench.png, policy.json, summary.md.

--dry-run runs the same driver on the CPU: the Triton kernels under the interpreter, tiny benchmark sizes, no
extension build, fake ceilings, no policy (CPU rows make none); tests/test_gpu_check.py runs it in CI so this file
cannot rot.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent


def _backend_names() -> Sequence[str]:
    """The registered backends (pydlx/registry.py), or none if pydlx cannot be imported here (the driver itself
    must not depend on it: a broken import is one of the things it reports)."""
    try:
        sys.path.insert(0, str(ROOT))
        from pydlx import registry
        return registry.backend_names()
    except Exception:  # noqa: BLE001
        return ()
RESERVE_S = 40  # kept for the policy and the summary at the end
GRAPH_TESTS = "tests/test_cuda_graphs.py"  # tier 1's second step (compile-heavy: torch.compile per model and backend)
# test files with no GPU test that import what a GPU machine's own environment may lack (onnx, onnxruntime): left
# out of tier 1's collection, where an import error would fail the whole step
NO_GPU_TESTS = ("tests/test_onnx.py",)
GRAPH_TIMEOUT_S = 180


class Check:
    def __init__(self, out: Path, minutes: float, dry_run: bool):
        self.out, self.dry = out, dry_run
        self.t0 = time.monotonic()
        self.deadline = self.t0 + 60 * minutes
        self.log = open(out / "log.txt", "a", buffering=1)
        self.steps: List[Dict] = []
        self.env: Dict[str, str] = {}
        self.py = sys.executable

    # ------------------------------------------------------------------------------------------ plumbing
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.deadline - RESERVE_S - time.monotonic()

    def say(self, text: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def run(self, name: str, cmd: Sequence[str], timeout: float, env: Optional[Dict[str, str]] = None) -> int:
        """Run a step, its output streamed into log.txt as it comes; killed (with its children) at ``timeout``."""
        timeout = max(5.0, min(timeout, self.deadline - time.monotonic()))
        self.say(f"== {name} (timeout {timeout:.0f}s): {' '.join(cmd)}")
        t = time.monotonic()
        full_env = dict(os.environ, **(env or {}))
        with subprocess.Popen(list(cmd), cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) as p:
            try:
                for line in iter_lines(p, time.monotonic() + timeout):
                    self.log.write(line)
                    print(line, end="", flush=True)
                rc = p.wait(timeout=5)
            except TimeoutError:
                os.killpg(p.pid, 9)
                p.wait()
                rc = 124
        took = time.monotonic() - t
        self.steps.append({"step": name, "rc": rc, "seconds": round(took, 1)})
        self.say(f"== {name}: exit {rc} after {took:.1f}s" + (" (timed out)" if rc == 124 else ""))
        self.summary()
        return rc

    # ------------------------------------------------------------------------------------------ tiers
    def environment(self) -> None:
        code = ("import sys, torch, pydlx\n"
                "try:\n    import triton; tv = triton.__version__\nexcept Exception as e:\n    tv = f'none ({e})'\n"
                "gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'\n"
                "print(f'python {sys.version.split()[0]} torch {torch.__version__} cuda {torch.version.cuda} '\n"
                "      f'triton {tv} device {gpu}')\n"
                "for k, v in pydlx.backends().items(): print(f'backend {k}: {v}')\n")
        r = subprocess.run([self.py, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
        self.say("environment:\n" + r.stdout + r.stderr)
        self.env["versions"] = r.stdout.splitlines()[0] if r.stdout else r.stderr[-300:]
        commit = subprocess.run(["git", "log", "-1", "--format=%h %s"], cwd=ROOT, capture_output=True, text=True)
        self.env["commit"] = commit.stdout.strip() or "unknown"
        if not self.dry and shutil.which("nvidia-smi"):
            self.run("nvidia-smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                    "--format=csv"], 30)

    def ceilings(self) -> None:
        if self.dry:
            self.say("ceilings (dry run, fake): copy 1000 GB/s, bf16 GEMM 100 TFLOP/s")
            return
        self.run("ceilings", [self.py, "bench/ceilings.py"], 90)

    def build(self, wheel: Optional[Path]) -> None:
        """pydlx._C: from the binary wheel when one built from these sources is given (no compile: its _C.so and
        _build.json go into the checkout's package, where the loader finds a prebuilt library), else compiled for
        this GPU's arch."""
        if self.dry:
            self.say("extension build: skipped (dry run: tests/test_extension.py builds it in CI)")
            return
        if wheel is not None:
            why = wheel_mismatch(wheel)
            if why is None:
                with zipfile.ZipFile(wheel) as z:
                    for name in ("pydlx/_C.so", "pydlx/_build.json"):
                        (ROOT / name).write_bytes(z.read(name))
                code = "from pydlx import _ext; assert _ext.load(), _ext.status(); print(_ext.status())"
                self.run(f"pydlx._C from the binary wheel {wheel.name} (no compile)", [self.py, "-c", code], 120)
                return
            self.say(f"the binary wheel {wheel} is not used: {why}; compiling instead")
        code = "from pydlx import _ext; import time; t = time.time(); print(_ext.jit_build(), time.time() - t)"
        env = {"MAX_JOBS": str(os.cpu_count() or 8), "PYDLX_CUDA_ARCHS": "native"}
        self.run("build pydlx._C (this GPU's arch only)", [self.py, "-c", code], 240, env)

    def pytest(self, name: str, args: Sequence[str], junit: str, timeout: float) -> int:
        cmd = [self.py, "-m", "pytest", *args, "-p", "no:cacheprovider", "-rf", f"--junitxml={self.out / junit}"]
        if has_module("pytest_timeout"):
            cmd.append("--timeout=180")  # a hung kernel fails its test, not the whole check
        env = {"PYDLX_TRITON_AUTOTUNE": "0"}
        if self.dry:
            env["TRITON_INTERPRET"] = "1"
        return self.run(name, cmd, timeout, env)

    def bench(self, name: str, select: str, minutes: float, timeout: float) -> int:
        cmd = [self.py, "-m", "pydlx.bench", "--family", "all", "--select", select, "--out-dir", str(self.out),
               "--name", "bench", "--max-minutes", f"{max(minutes, 0.1):.2f}", "--no-plot"]
        if self.dry:
            cmd += ["--device", "cpu", "--providers", "pydlx,eager", "--modes", "fwd"]
        return self.run(name, cmd, timeout)

    def host(self, name: str, timeout: float) -> int:
        """The host-cost benchmark (pydlx/bench/host.py): pydlx's op path against the eager chain at tiny shapes."""
        cmd = [self.py, "-m", "pydlx.bench", "--host", "--out-dir", str(self.out), "--name", "bench"]
        if self.dry:
            cmd += ["--device", "cpu", "--host-calls", "5", "--rounds", "3"]
        return self.run(name, cmd, timeout)

    def tune(self, name: str, timeout: float) -> int:
        """Measured on first use, as a user runs it (python -m pydlx.tune on the seed CNN's shapes): every backend
        checked against float64 and timed against eager on this card; the table goes to the log. The decisions go to a
        scratch cache, not the report (which stays at 8 files) nor the machine's user cache."""
        if self.dry:
            self.say(f"{name}: skipped (dry run: it measures on a GPU; tests/test_measure.py runs it with fakes)")
            return 0
        scratch = tempfile.mkdtemp(prefix="pydlx-tune-")
        return self.run(name, [self.py, "-m", "pydlx.tune", "--model", "pydlx.bench.seed_models:CNN",
                               "--input-shape", "256,3,24,24", "--dtype", "bf16", "--minutes",
                               f"{max(timeout - 20, 10) / 60:.2f}", "--cache-dir", scratch], timeout)

    def policy(self) -> None:
        csv_path = self.out / "bench.csv"
        if self.dry or not csv_path.exists():
            self.say("policy: skipped (" + ("dry run: CPU rows make no policy" if self.dry else "no benchmark rows")
                     + ")")
            return
        junits = [str(self.out / j) for j in ("tier0.xml", "tier1.xml") if (self.out / j).exists()]
        self.run("measured policy", [self.py, "-m", "pydlx.bench", "--make-policy", str(csv_path), "--tests",
                                     *junits, "--policy-dir", str(self.out)], 60)
        made = sorted(self.out.glob("*_sm*.json"))
        if made:
            made[-1].replace(self.out / "policy.json")

    def plot(self) -> None:
        csv_path = self.out / "bench.csv"
        if not csv_path.exists():
            return
        try:
            sys.path.insert(0, str(ROOT))
            from pydlx import bench

            with open(csv_path, newline="") as f:
                rows = list(csv.DictReader(f))
            bench.plot(rows, self.out / "bench.png")
        except Exception as e:  # noqa: BLE001  (a plot is not worth failing the report for)
            self.say(f"plot: {type(e).__name__}: {e}")

    # ------------------------------------------------------------------------------------------ report
    def summary(self) -> None:
        """summary.md from what has landed so far (rewritten after every step)."""
        now = datetime.datetime.now(datetime.timezone.utc)
        lines = [f"# GPU check {'(dry run) ' if self.dry else ''}- {now:%F %T} UTC", "",
                 f"- {self.env.get('versions', '?')}", f"- commit {self.env.get('commit', '?')}",
                 f"- elapsed {self.elapsed():.0f}s", "", "## Steps", "", "| step | exit | seconds |",
                 "| --- | --- | --- |"]
        lines += [f"| {s['step']} | {s['rc']}{' (timed out)' if s['rc'] == 124 else ''} | {s['seconds']} |"
                  for s in self.steps]
        lines += ["", "## Tests (pass / fail / skip per family and backend)", ""]
        lines += tests_table([self.out / "tier0.xml", self.out / "tier1.xml", self.out / "graphs.xml"])
        lines += ["", "## Benchmarks (speedup over eager; `?` = within the noise)", ""]
        lines += bench_table(self.out / "bench.csv")
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")


def newest_wheel() -> Optional[Path]:
    """The newest binary wheel in dist/ (scripts/build_wheel.sh), if any."""
    wheels = sorted((ROOT / "dist").glob("pydlx-*-py3-none-linux_*.whl"), key=lambda p: p.stat().st_mtime)
    return wheels[-1] if wheels else None


def wheel_mismatch(wheel: Path) -> Optional[str]:
    """Why a binary wheel's pydlx._C is not these sources' (its copy of csrc/ differs), or None."""
    try:
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
            if "pydlx/_C.so" not in names:
                return "it holds no pydlx/_C.so"
            for src in sorted((ROOT / "csrc").iterdir()):
                packed = f"pydlx/_csrc/{src.name}"
                if src.suffix in (".cu", ".cuh", ".h", ".cpp") and (
                        packed not in names or z.read(packed) != src.read_bytes()):
                    return f"it was built from other sources ({src.name} differs)"
    except (OSError, zipfile.BadZipFile) as e:
        return f"it cannot be read ({e})"
    return None


def iter_lines(p: subprocess.Popen, deadline: float):
    """The process's output lines until it ends; TimeoutError at the deadline (checked as lines arrive and every
    second while it is quiet)."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError
        if not sel.select(timeout=1.0):
            if p.poll() is not None:
                rest = p.stdout.read()
                if rest:
                    yield rest
                return
            continue
        line = p.stdout.readline()
        if not line:
            return
        yield line


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def tests_table(junits: Sequence[Path]) -> List[str]:
    counts: Dict[tuple, List[int]] = {}
    failed: List[str] = []
    for path in junits:
        if not path.exists():
            continue
        try:
            cases = list(ET.parse(path).iter("testcase"))
        except ET.ParseError:  # a junit cut mid-write
            continue
        for case in cases:
            cls, name = case.get("classname", ""), case.get("name", "")
            family = cls.rsplit(".", 1)[-1].replace("test_", "")
            props = {p.get("name"): p.get("value") for p in case.iter("property")}
            backend = props.get("pydlx_backend") or next((b for b in _backend_names()
                                                          if f"-{b}" in name or f"_{b}" in name), "-")
            if family == "gpu_smoke":
                family, backend = name.split("[", 1)[-1].split("-")[0], name.split("[", 1)[-1].split("-")[1]
            c = counts.setdefault((family, backend), [0, 0, 0])
            tags = {child.tag for child in case}
            if tags & {"failure", "error"}:
                c[1] += 1
                failed.append(f"{cls}::{name}")
            elif "skipped" in tags:
                c[2] += 1
            else:
                c[0] += 1
    if not counts:
        return ["(no test results yet)"]
    out = ["| family | backend | pass | fail | skip |", "| --- | --- | --- | --- | --- |"]
    out += [f"| {f} | {b} | {c[0]} | {c[1]} | {c[2]} |" for (f, b), c in sorted(counts.items())]
    if failed:
        out += ["", "Failed:", ""] + [f"- `{t}`" for t in failed[:40]]
    return out


def bench_table(path: Path) -> List[str]:
    if not path.exists():
        return ["(no benchmark rows yet)"]
    sys.path.insert(0, str(ROOT))
    from pydlx import bench

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    eager = {(r["op"], r["shape"], r["dtype"], r["mode"]): r for r in rows if r["provider"] == "eager"}
    out = ["| op | shape | dtype | mode | provider | ms | speedup | goal |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["provider"] == "eager":
            continue
        e = eager.get((r["op"], r["shape"], r["dtype"], r["mode"]))
        sp, stable = bench.speedup(e, r) if e else (None, True)
        ratio = "-" if sp is None else f"{sp:.2f}x{'' if stable else '?'}"
        out.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['mode']} | {r['provider']} | "
                   f"{float(r['median_ms']):.3f} | {ratio} | {bench.goal(r) or ''} |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=9.0, help="the whole check's budget (default 9)")
    p.add_argument("--dry-run", action="store_true", help="the same driver on the CPU (interpreter, tiny sizes)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "gpu-report"))
    p.add_argument("--wheel", default=None, help="a binary wheel (scripts/build_wheel.sh) whose pydlx._C to use instead "
                                                 "of compiling (default: the newest dist/pydlx-*.whl, when it was built "
                                                 "from these sources)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    os.environ.setdefault("PYDLX_BUILD_DIR", str(ROOT / "build" / "jit-test"))  # built once, loaded from here
    if not args.dry_run:
        os.environ["TRITON_INTERPRET"] = "0"
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; run it on a GPU machine, or with --dry-run", file=sys.stderr)
            return 2
    c = Check(out, args.minutes, args.dry_run)
    c.say(f"GPU check{' (dry run)' if args.dry_run else ''}: budget {args.minutes} min, report in {out}")
    # tier 0: environment, ceilings, build, every kernel once, the headline benchmarks (~3 min)
    c.environment()
    c.ceilings()
    c.build(Path(args.wheel) if args.wheel else newest_wheel())
    workers = ["-n", "8"] if has_module("xdist") and not args.dry_run else []  # Triton compiles in parallel
    c.pytest("tier 0: every kernel once", ["tests/test_gpu_smoke.py", "-v", *workers], "tier0.xml",
             min(150, c.left()))
    c.bench("tier 0: headline benchmarks", "headline", min(1.5, c.left() / 60), min(150, c.left()))
    c.host("tier 0: host cost", min(60, c.left()))
    c.tune("tier 0: measured on first use (python -m pydlx.tune)", min(90, c.left()))
    # tier 1: the full GPU test suite, then the CUDA-graph tests on their own bounded step (a slow torch.compile there
    # cannot push the suite past its timeout, which would lose its junit)
    c.pytest("tier 1: GPU test suite", ["tests", "-m", "gpu", f"--ignore={GRAPH_TESTS}",
                                             *(f"--ignore={t}" for t in NO_GPU_TESTS), *workers, "-q"], "tier1.xml",
             min(300, c.left()))
    if c.left() > 30:
        c.pytest("tier 1: CUDA graphs", [GRAPH_TESTS, "-v", *workers], "graphs.xml", min(GRAPH_TIMEOUT_S, c.left()))
    else:
        c.say("tier 1: CUDA graphs: skipped (under 30 s of the budget left; a larger --minutes runs them)")
    # tier 2: the rest of the grid, as long as the budget lasts
    if c.left() > 20:
        c.bench("tier 2: benchmark grid", "rest", (c.left() - 15) / 60, c.left())
    # last: the policy, the plot, the summary
    c.deadline += RESERVE_S  # (the reserve is for these)
    c.policy()
    c.plot()
    c.summary()
    c.say(f"done in {c.elapsed():.0f}s; report in {out}: " + ", ".join(sorted(f.name for f in out.iterdir())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
