"""Benchmark cases for the model family: the three seed models (pydlx/bench/seed_models.py),
as written against ``pydlx.optimize``-d, at batch 256 (GPU) or 32 (CPU).

op = the example's name (cnn, rnn, autoencoder); mode ``fwd`` = one inference batch (no grad), ``fwdbwd`` = one
training step (forward, the seed's loss, backward, the seed's optimizer step). Providers: ``eager`` = the model as
written, ``pydlx`` = pydlx.optimize(model) under the default ``auto`` backend, ``compile`` =
torch.compile(model as written). bf16 runs under torch.autocast (the seed RNN builds fp32 h0/c0, so a bf16 copy of
the weights would not run as written).
"""
from __future__ import annotations

import contextlib
from typing import List

import torch

from . import Case

GPU_BATCH, CPU_BATCH = 256, 32
GPU_DTYPES = [torch.bfloat16, torch.float32]
CPU_DTYPES = [torch.float32]


def seed_models():
    """The seed models, data and trainer (pydlx/bench/seed_models.py, shipped with the package)."""
    from . import seed_models as S

    return S


def _make_case(device: torch.device, kind: str, batch: int, dtype: torch.dtype) -> Case:
    state = {}

    def make(provider: str):
        import pydlx

        S = seed_models()
        torch.manual_seed(0)
        model = S.make_model(kind).to(device)
        if provider == "pydlx":
            model = pydlx.optimize(model)
        elif provider == "compile":
            if "compiled" not in state:
                torch._dynamo.reset()
                state["compiled"] = torch.compile(model, dynamic=False)
            model = state["compiled"]
        elif provider != "eager":
            raise ValueError(f"unknown provider {provider!r}")
        data = S.make_data(kind, device)
        x, y = data["x_train"][:batch], data["y_train"][:batch]
        reps = -(-batch // x.shape[0])
        x, y = x.repeat(reps, *([1] * (x.dim() - 1)))[:batch], y.repeat(reps)[:batch]
        opt = S.make_optimizer(kind, model)

        def ctx():
            if dtype == torch.float32:
                return contextlib.nullcontext()
            return torch.autocast(device.type, dtype=dtype)

        def fwd():
            with torch.no_grad(), ctx():
                return model(x)

        def fwdbwd():
            opt.zero_grad(set_to_none=True)
            with ctx():
                loss = S.loss_fn(kind, model, x, y)
            loss.backward()
            opt.step()
            return loss

        return fwd, fwdbwd

    return Case(family="model", op=kind, shape=f"batch {batch}", dtype=dtype, make=make)


def cases(device, small: bool) -> List[Case]:
    device = torch.device(device)
    batch, dtypes = (CPU_BATCH, CPU_DTYPES) if small else (GPU_BATCH, GPU_DTYPES)
    return [_make_case(device, kind, batch, dt) for dt in dtypes for kind in ("cnn", "rnn", "autoencoder")]
