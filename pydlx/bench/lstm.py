"""Benchmark cases for the lstm family: a one-layer LSTM (input_size = hidden_size), time-major.

Shapes (``T:BxH``, packed: ``packed T:BxH``): hidden 128, 256, 512, 1024 x batch 1, 7, 16, 64, 256 x seq 100 and
1000, plus packed batches of mixed lengths (64 sequences, lengths drawn uniformly from 1..T) first, as they carry
the packed-input goal; then the shapes of the persistent C++/CUDA kernels' goal (batch 1, 7, 16, 64 x hidden 256,
768, 1024, 1024 steps; no compile provider). Providers: ``pydlx`` = pydlx.nn.LSTM under auto
(cuDNN until a measured policy says where the kernels win), ``pydlx-triton`` / ``pydlx-cuda`` = the kernels
forced, ``eager`` = nn.LSTM (cuDNN), ``compile`` = torch.compile(nn.LSTM): Dynamo does not trace nn.LSTM, so this
is cuDNN behind a graph break.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from .. import registry
from . import Case, Trial, pick

GPU_HIDDEN = (128, 256, 512, 1024)
GPU_BATCH = (1, 7, 16, 64, 256)
GPU_SEQ = (100, 1000)
GPU_PACKED = [(100, 64, 256), (100, 64, 512), (1000, 64, 256)]  # (T, B, H)
GPU_CUDA = [(1024, B, H) for H in (256, 768, 1024) for B in (1, 7, 16, 64)]
CPU_SHAPES = [(20, 4, 32)]
CPU_PACKED = [(20, 8, 32)]
GPU_DTYPES = [torch.bfloat16, torch.float32]
CPU_DTYPES = [torch.float32]


def _make_case(device: torch.device, T: int, B: int, H: int, dtype: torch.dtype, packed: bool,
               providers=None) -> Case:
    state = {}

    def make(provider: str):
        import pydlx

        torch.manual_seed(0)
        base = nn.LSTM(H, H, device=device, dtype=dtype)
        model = pick(provider, state, base, lambda: pydlx.nn.LSTM.from_module(base))
        gen = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(T, B, H, generator=gen).to(device, dtype)
        lengths = torch.randint(1, T + 1, (B,), generator=gen)
        lengths[0] = T
        xg = x.detach().requires_grad_()
        params = list(model.parameters())

        def inp(t):
            return pack_padded_sequence(t, lengths, enforce_sorted=False) if packed else t

        def call(t):
            out, (h, c) = model(inp(t))
            return out.data if packed else out

        def fwd():
            with torch.no_grad():
                return call(x)

        def fwdbwd():
            for p in params:
                p.grad = None
            xg.grad = None
            y = call(xg)
            y.backward(torch.ones_like(y))
            return y

        return fwd, fwdbwd

    return Case(family="lstm", op="lstm_packed" if packed else "lstm", shape=registry.FAMILIES["lstm"].shape(T, B, H),
                dtype=dtype, make=make, providers=providers)


def cases(device, small: bool) -> List[Case]:
    device = torch.device(device)
    if small:
        return ([_make_case(device, T, B, H, dt, True) for dt in CPU_DTYPES for T, B, H in CPU_PACKED]
                + [_make_case(device, T, B, H, dt, False) for dt in CPU_DTYPES for T, B, H in CPU_SHAPES])
    out = [_make_case(device, T, B, H, dt, True) for dt in GPU_DTYPES for T, B, H in GPU_PACKED]
    out += [_make_case(device, T, B, H, dt, False, ("pydlx", "pydlx-cuda", "pydlx-triton", "eager"))
            for dt in GPU_DTYPES for T, B, H in GPU_CUDA]
    out += [_make_case(device, T, B, H, dt, False) for dt in GPU_DTYPES for T in GPU_SEQ for H in GPU_HIDDEN
            for B in GPU_BATCH]
    return out


def trial(call: registry.LSTMCall, device, gen: torch.Generator) -> Trial:
    """A call of the family's descriptor: one layer (input size = hidden size, with biases, ``proj_size`` = P when it
    differs from H) over T steps, or one LSTMCell step (``cell``); the output is y (the cell's h)."""
    rnd = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=call.dtype)  # noqa: E731
    T, B, H, P = call.T, call.B, call.H, call.P
    scale = H ** -0.5
    if call.cell:
        inputs = (rnd(B, H), rnd(B, H), rnd(B, H), rnd(4 * H, H) * scale, rnd(4 * H, H) * scale, rnd(4 * H),
                  rnd(4 * H))

        def fused_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
            import pydlx
            return pydlx.ops.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)[0]

        return Trial(inputs, fused_cell, lambda x, h, c, *w: torch.lstm_cell(x, (h, c), *w)[0])
    proj = (rnd(P, H) * scale,) if P != H else ()
    inputs = (rnd(T, B, H), rnd(1, B, P), rnd(1, B, H), rnd(4 * H, H) * scale, rnd(4 * H, P) * P ** -0.5,
              rnd(4 * H), rnd(4 * H), *proj)

    def fused(x, h, c, *weights):
        import pydlx
        return pydlx.ops.lstm(x, weights, (h, c), proj_size=P if P != H else 0)[0]

    def eager(x, h, c, *weights):  # (nn.LSTM's call; train as in training: cuDNN's backward needs it)
        return torch.lstm(x, (h, c), weights, True, 1, 0.0, call.training, False, False)[0]

    return Trial(inputs, fused, eager)


def tune_calls(dtypes) -> List[registry.LSTMCall]:
    """The calls ``python -m pydlx.tune`` measures for this family: the GPU benchmark's hidden sizes and batches at
    its shorter sequence length."""
    return [registry.LSTMCall(dt, training, GPU_SEQ[0], B, H, H, False) for dt in dtypes for training in (True, False)
            for H in GPU_HIDDEN for B in GPU_BATCH]
