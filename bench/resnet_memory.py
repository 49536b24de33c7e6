"""Saved activation bytes and CPU step time of torchvision's ResNet-18 under pydlx.optimize, against eager: one
forward + cross-entropy (+ backward for the time), parameters excluded, each storage counted once
(pydlx.bench.seed_models.saved_bytes). pydlx runs with the reference backend forced (auto runs the training form
eagerly). Usage: python bench/resnet_memory.py [--sizes 2x32,8x64,8x112,16x224] [--repeat 3]"""
import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

import pydlx
from pydlx.bench.seed_models import saved_bytes


def step_time(model, x, y, backend, repeat):
    times = []
    for _ in range(repeat):
        m = copy.deepcopy(model)
        t = time.perf_counter()
        with pydlx.use_backend(backend):
            F.cross_entropy(m(x), y).backward()
        times.append(time.perf_counter() - t)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2x32,8x64,8x112,16x224")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    fast = pydlx.optimize(model)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads")
    print("input | mode | eager MB | pydlx MB | ratio | step s eager (median of interleaved runs) | pydlx | ratio")
    for size in args.sizes.split(","):
        n, hw = (int(v) for v in size.split("x"))
        x, y = torch.randn(n, 3, hw, hw), torch.randint(0, 10, (n,))
        for mode in ("train", "eval"):
            getattr(model, mode)()
            getattr(fast, mode)()
            m, f = copy.deepcopy(model), copy.deepcopy(fast)
            eager = saved_bytes(lambda: F.cross_entropy(m(x), y), list(m.parameters()))
            with pydlx.use_backend("reference"):
                ours = saved_bytes(lambda: F.cross_entropy(f(x), y), list(f.parameters()))
            te, tp = [], []
            for _ in range(args.repeat):  # interleaved: eager, pydlx, eager, ...
                te += step_time(model, x, y, "auto", 1)
                tp += step_time(fast, x, y, "reference", 1)
            me, mp = statistics.median(te), statistics.median(tp)
            print(f"{n}x3x{hw}x{hw} | {mode} | {eager / 1e6:.1f} | {ours / 1e6:.1f} | {ours / eager:.2f} | "
                  f"{me:.3f} ({min(te):.3f}-{max(te):.3f}) | {mp:.3f} ({min(tp):.3f}-{max(tp):.3f}) | {mp / me:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
