"""Benchmark cases for the mlp family: whole MLPs, pydlx.nn.MLP against the same nn.Sequential.

  autoencoder  the seed autoencoder's 784-400-200-32-200-400-784 (ReLU, no last activation): the chain of fused linears
  mlp_64x4     64 -> 64 x4 -> 16 (ReLU): the fused small-MLP kernels
  mlp_128x4    32 -> 128 x4 -> 3 (ReLU): the fused small-MLP kernels
Shape strings are ``batch:sizes``. Providers: ``pydlx`` (pydlx.nn.MLP over the Sequential's own modules, auto),
``pydlx-triton`` / ``pydlx-cuda`` (that backend forced: the cuda one is the C++/CUDA fused forward, fp16/bf16
inference only, n/a elsewhere), ``eager`` (the nn.Sequential) and ``compile`` (torch.compile of the Sequential).
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from .. import registry
from . import Case, Trial, pick

NETS = {"autoencoder": [784, 400, 200, 32, 200, 400, 784], "mlp_64x4": [64, 64, 64, 64, 64, 16],
        "mlp_128x4": [32, 128, 128, 128, 128, 3]}
GPU_BATCHES = {"autoencoder": [256, 4096, 65536], "mlp_64x4": [1 << 16, 1 << 20], "mlp_128x4": [1 << 16, 1 << 20]}
CPU_BATCHES = {"autoencoder": [256], "mlp_64x4": [4096], "mlp_128x4": [4096]}
GPU_DTYPES = [torch.bfloat16, torch.float32]  # bf16 first: the time-boxed GPU check measures it first
CPU_DTYPES = [torch.float32]


def _sequential(sizes, device, dtype) -> nn.Sequential:
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], device=device, dtype=dtype))
        if i + 2 < len(sizes):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _make_case(device: torch.device, op: str, batch: int, dtype: torch.dtype) -> Case:
    sizes = NETS[op]
    state = {}

    def make(provider: str):
        import pydlx

        torch.manual_seed(0)
        seq = _sequential(sizes, device, dtype)
        model = pick(provider, state, seq, lambda: pydlx.nn.MLP.from_sequential(seq))
        gen = torch.Generator(device=device).manual_seed(1)
        x = torch.rand(batch, sizes[0], generator=gen, device=device, dtype=dtype)
        g = torch.randn(batch, sizes[-1], generator=gen, device=device, dtype=dtype)
        params = list(model.parameters())

        def fwd():
            with torch.no_grad():
                return model(x)

        def fwdbwd():
            for p in params:
                p.grad = None
            y = model(x)
            y.backward(g)
            return y

        return fwd, fwdbwd

    return Case(family="mlp", op=op, shape=registry.FAMILIES["mlp"].shape(batch, sizes), dtype=dtype, make=make)


def cases(device, small: bool) -> List[Case]:
    device = torch.device(device)
    batches, dtypes = (CPU_BATCHES, CPU_DTYPES) if small else (GPU_BATCHES, GPU_DTYPES)
    return [_make_case(device, op, b, dt) for dt in dtypes for op in NETS for b in batches[op]]


def trial(call: registry.MLPCall, device, gen: torch.Generator) -> Trial:
    """A call of the family's descriptor: layers ``call.sizes`` with ReLU between them, none after the last."""
    rnd = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=call.dtype)  # noqa: E731
    sizes, L = call.sizes, len(call.sizes) - 1
    weights = [rnd(sizes[i + 1], sizes[i]) * max(sizes[i], 1) ** -0.5 for i in range(L)]
    biases = [rnd(sizes[i + 1]) for i in range(L)]

    def fused(x, *params):
        import pydlx
        return pydlx.ops.mlp(x, params[:L], params[L:], activation="relu")

    def eager(x, *params):
        for i in range(L):
            x = torch.nn.functional.linear(x, params[i], params[L + i])
            x = torch.relu(x) if i + 1 < L else x
        return x

    return Trial((rnd(call.M, sizes[0]), *weights, *biases), fused, eager)


def tune_calls(dtypes) -> List[registry.MLPCall]:
    """The calls ``python -m pydlx.tune`` measures for this family: the GPU benchmark's nets and batches."""
    return [registry.MLPCall(dt, training, batch, tuple(sizes)) for dt in dtypes for training in (True, False)
            for op, sizes in NETS.items() for batch in GPU_BATCHES[op]]
