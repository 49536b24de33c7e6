"""``python -m pydlx.bench``: time pydlx ops against eager PyTorch and torch.compile.

    python -m pydlx.bench                                  # linear family, cuda if available, else cpu (small)
    python -m pydlx.bench --device cpu --providers pydlx,eager --name cpu_smoke --out-dir /tmp/benchout
    python -m pydlx.bench --make-policy bench/results/gpu_<card>.csv --tests junit.xml   # pydlx/policies/<card>.json

Rows are appended to <out-dir>/<name>.csv (columns: pydlx.bench.CSV_COLUMNS) and a speedup chart is written to
<out-dir>/<name>.png.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
import time
from pathlib import Path

import torch

import pydlx
from pydlx import bench
from pydlx import registry
from pydlx.bench import conv_relu_pool, model

# The benchmark groups (--family): each registered family's cases (pydlx/bench/<family>.py ``cases``), then the
# groups that time the conv family's other blocks and whole models.
FAMILIES = {**{f: importlib.import_module(f"pydlx.bench.{f}").cases for f in registry.FAMILIES},
            "conv_act_pool": conv_relu_pool.variant_cases, "conv_bn_train": conv_relu_pool.train_cases,
            "model": model.cases}


def _list(arg: str, allowed, what: str):
    items = [s.strip() for s in arg.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{what} must be a comma list of {', '.join(allowed)}; got {arg!r}")
    return items


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pydlx.bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="linear", choices=[*FAMILIES, "all"])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="CPU-sized shapes, float32 only (implied on cpu)")
    p.add_argument("--providers", default=None, type=lambda s: _list(s, bench.providers(), "--providers"),
                   help=f"comma list of {', '.join(bench.providers())} (default: all on a GPU; "
                        f"{', '.join(bench.CPU_PROVIDERS)} on the CPU)")
    p.add_argument("--modes", default=",".join(bench.MODES), type=lambda s: _list(s, bench.MODES, "--modes"))
    p.add_argument("--name", default=None, help="output file stem (default: gpu_<gpu name>, or cpu)")
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no new case after this many minutes (what was measured is still written)")
    p.add_argument("--select", default="all", choices=["all", "headline", "rest"],
                   help="headline: only each goal's headline case (pydlx.bench.GOALS; on the CPU the first case of "
                        "each family); rest: all but those")
    p.add_argument("--host", action="store_true",
                   help="the host-cost benchmark instead (pydlx/bench/host.py): per call, pydlx's op path against "
                        "the eager chain at tiny shapes")
    p.add_argument("--host-calls", type=int, default=100, help="with --host: calls a sample times")
    p.add_argument("--rounds", type=int, default=None,
                   help="with --host on a CPU: rounds of interleaved samples (default 20)")
    p.add_argument("--make-policy", nargs="+", metavar="CSV", default=None,
                   help="write the measured dispatch policy of the GPU these benchmark CSVs were taken on "
                        "(pydlx/_policy.py) and exit; needs --tests")
    p.add_argument("--tests", nargs="+", metavar="JUNIT_XML", default=None,
                   help="with --make-policy: the GPU test results of the same run (pytest --junitxml): only "
                        "implementations whose GPU tests passed are eligible")
    p.add_argument("--policy-dir", default=None, help="with --make-policy: where to write (default: the package's)")
    args = p.parse_args(argv)
    if args.make_policy:
        return _make_policy(p, args)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    if args.host:
        return _host(args, device)
    small = args.small or device.type == "cpu"
    if args.providers is None:
        args.providers = list(bench.providers() if device.type == "cuda" else bench.CPU_PROVIDERS)
    families = list(FAMILIES) if args.family == "all" else [args.family]

    env = bench.env_info(device)
    print(f"pydlx {pydlx.__version__} bench: family={args.family} device={device} small={small}")
    print(f"  gpu={env['gpu']} torch={env['torch']} triton={env['triton']} cuda={env['cuda']} "
          f"commit={env['commit']}")
    for name, status in pydlx.backends().items():
        print(f"  backend {name}: {status}")
    print(f"  providers={','.join(args.providers)} modes={','.join(args.modes)}", flush=True)

    cases = [c for fam in families for c in FAMILIES[fam](device, small)]
    if args.select != "all":
        heads = ({id(next(c for c in cases if c.family == fam)) for fam in families} if small else
                 {id(c) for c in cases if bench.goal(c)})
        cases = [c for c in cases if (id(c) in heads) == (args.select == "headline")]
    # bf16 cases of every family first (stable): a time-boxed run (the GPU check) measures what matters most first
    cases.sort(key=lambda c: c.dtype != torch.bfloat16)
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None
    rows = bench.run_cases(cases, args.providers, args.modes, device, deadline=deadline)
    print()
    if not rows:
        print("no results: every case failed", file=sys.stderr)
        return 1
    bench.print_table(rows)

    # one file per machine: every family shares the CSV schema
    name = args.name or ("cpu" if device.type == "cpu" else f"gpu_{_slug(env['gpu'])}")
    out_dir = Path(args.out_dir)
    csv_path = out_dir / f"{name}.csv"
    bench.append_csv(csv_path, rows)
    print(f"appended {len(rows)} rows to {csv_path}")
    if not args.no_plot:
        png = bench.plot(rows, out_dir / f"{name}.png")
        if png is not None:
            print(f"wrote {png}")
    return 0


def _host(args, device: torch.device) -> int:
    from pydlx.bench import host

    env = bench.env_info(device)
    print(f"pydlx {pydlx.__version__} host-cost bench: device={device} ({env['gpu']}), {args.host_calls} calls a "
          f"sample; pydlx = {'the op path forced (reference backend)' if device.type == 'cpu' else 'auto'}",
          flush=True)
    rows = host.run(device, calls=args.host_calls, rounds=args.rounds)
    print()
    host.print_table(rows)
    name = args.name or ("cpu" if device.type == "cpu" else f"gpu_{_slug(env['gpu'])}")
    csv_path = Path(args.out_dir) / f"{name}.csv"
    bench.append_csv(csv_path, rows)
    print(f"appended {len(rows)} rows to {csv_path}")
    return 0


def _make_policy(p: argparse.ArgumentParser, args) -> int:
    from pydlx import _policy

    if not args.tests:
        p.error("--make-policy needs --tests: the GPU test results of the same run (pytest --junitxml)")
    rows = _policy.read_rows(args.make_policy)
    passed = _policy.passed_backends(args.tests)
    policy = _policy.make_policy(rows, passed)
    path = _policy.write(policy, args.policy_dir or _policy.POLICY_DIR)
    ok = ", ".join(f"{f}:{b}" for f in sorted(passed) for b in sorted(passed[f])) or "nothing"
    print(f"policy for {policy['device']} (sm_{policy['capability'].replace('.', '')}): {len(policy['rules'])} "
          f"rules, GPU tests passed for {ok}")
    for r in policy["rules"]:
        print(f"  {r['family']:15s} {r['dtype']:5s} {r['mode']:9s} {r['shape']:32s} -> {r['backend']} "
              f"({r['ratio']:.2f}x eager)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
