"""The three seed models end to end, as written and after ``pydlx.optimize``.

For each model (CNN, LSTM classifier, autoencoder; pydlx/bench/seed_models.py) on the available device:
  * what optimize() fuses (pydlx.explain) and a check that the state_dict is unchanged;
  * both copies trained from the same initial weights on scikit-learn's digits for a few epochs with the seed's
    optimizer and loss: loss curve, test accuracy and macro F1 (classifiers) or reconstruction MSE (autoencoder),
    time per training step;
  * at batch 256: the time of one training step and of one inference batch, before and after optimize(), each
    model on its own copy and optimizer, all four timed interleaved in rounds (pydlx.bench.measure) and shown as
    median (p20-p80); the speedup is printed only where the two spreads resolve it from 1 (pydlx.bench.ratio),
    else "same within noise" with the range of ratios they allow; and the bytes autograd saves for backward
    (activations).

    python examples/train_seed_models.py                 # cuda if available, else cpu
    python examples/train_seed_models.py --epochs 2 --models cnn,autoencoder
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import seed_models as S  # noqa: E402

import pydlx  # noqa: E402
from pydlx import bench  # noqa: E402

EPOCHS = {"cnn": 6, "rnn": 3, "autoencoder": 3}


def run(kind: str, device: torch.device, epochs: int, batch: int, reps: int) -> dict:
    torch.manual_seed(0)
    model = S.make_model(kind).to(device)
    print(f"\n== {kind}: {type(model).__name__} as written")
    print(pydlx.explain(model))
    fast = pydlx.optimize(model)
    same = list(fast.state_dict()) == list(model.state_dict()) and all(
        torch.equal(a, b) for a, b in zip(fast.state_dict().values(), model.state_dict().values()))
    print(f"state_dict unchanged: {same}")
    data = S.make_data(kind, device)
    results = {}
    for name, m in (("as written", model), ("optimized", fast)):
        r = S.train(kind, m, data, epochs=epochs, batch=64)
        curve = r["losses"][::max(1, len(r["losses"]) // 8)]
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in r.items() if k not in ("losses", "step_ms"))
        print(f"  {name:10s}: {len(r['losses'])} steps, {r['step_ms']:.2f} ms/step, loss "
              f"{' '.join(f'{v:.3f}' for v in curve)}; test {metrics}")
        results[name] = r
    gap = max(abs(a - b) for a, b in zip(results["as written"]["losses"], results["optimized"]["losses"]))
    print(f"  largest loss difference along the curves: {gap:.2e}")
    # batch 256: one training step, one inference batch, saved activations (fresh copies, same weights)
    x = data["x_train"][:batch]
    y = data["y_train"][:batch]
    torch.manual_seed(0)
    base = S.make_model(kind).to(device)
    opt_model = pydlx.optimize(base)
    # each on its own copy of the model and optimizer, the same batch, timed interleaved in rounds
    t = S.time_step_and_inference(kind, {"original": copy.deepcopy(base), "optimized": opt_model}, x, y,
                                  rounds=reps)
    mem_base = S.saved_activation_bytes(kind, base, x, y)
    mem_fast = S.saved_activation_bytes(kind, opt_model, x, y)
    print(f"  batch {batch} on {device.type}, original -> optimized, median (p20-p80) of {reps} interleaved "
          f"rounds:")
    for mode, words in (("step", "training step"), ("inference", "inference")):
        print(f"    {words:17s}  {bench.format_change(t[('original', mode)], t[('optimized', mode)])}")
    print(f"    saved activations  {mem_base / 2**20:.1f} -> {mem_fast / 2**20:.1f} MiB "
          f"({mem_fast / mem_base:.2f} of the original)")
    if device.type == "cpu" and kind == "cnn":
        with pydlx.use_backend("reference"):  # the fused op with the eager forward: what auto runs on a GPU
            mem_op = S.saved_activation_bytes(kind, opt_model, x, y)
        print(f"  (on a CPU auto runs plain eager PyTorch for the conv blocks; the fused op, as auto runs it on a "
              f"GPU, saves {mem_op / 2**20:.1f} MiB: {mem_op / mem_base:.2f} of the original)")
    return {"kind": kind, "gap": gap, "step": bench.ratio(t[("original", "step")], t[("optimized", "step")]),
            "memory": mem_fast / mem_base}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--models", default="cnn,rnn,autoencoder")
    p.add_argument("--epochs", type=int, default=0, help="epochs per model (default: 6 CNN, 3 others)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=10,
                   help="rounds of the interleaved batch timing (each round times every model's step and inference "
                        "once on a CPU)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          (args.device if args.device != "auto" else "cpu"))
    print(f"pydlx {pydlx.__version__} on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}; backends: {pydlx.backends()}")
    for kind in args.models.split(","):
        run(kind.strip(), device, args.epochs or EPOCHS[kind.strip()], args.batch, args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
