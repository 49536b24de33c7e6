"""Benchmark cases for the conv_relu_pool family: MaxPool2d(ReLU(Conv2d(x))).

Shapes (``N,C,H,W->K kxk sS pP poolA/B``): the seed CNN's layers (batch 256: 3->32 at 32x32 and 32->64 at 16x16,
3x3 pad 1, pool 2/2), VGG-style 64->128 at 112x112 and 256->256 at 28x28, AlexNet-style 3->64 11x11 stride 4 pad 2
at 224x224 with a 3/2 pool. Providers: ``pydlx`` (auto: eager inside the op until a measured policy says otherwise),
``pydlx-triton`` (the fused Triton kernel), ``pydlx-cuda`` (csrc/conv_relu_pool.cu's direct convolution, first
layers: at most 8 input channels; n/a elsewhere), ``eager`` (cuDNN) and ``compile``.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from . import Case, pick

# (N, C, H, W, K, kernel, stride, padding, pool, pool_stride)
GPU_SHAPES = {"seed_conv1": (256, 3, 32, 32, 32, 3, 1, 1, 2, 2), "seed_conv2": (256, 32, 16, 16, 64, 3, 1, 1, 2, 2),
              "vgg_64_128": (32, 64, 112, 112, 128, 3, 1, 1, 2, 2), "vgg_256_256": (32, 256, 28, 28, 256, 3, 1, 1, 2, 2),
              "alexnet_conv1": (64, 3, 224, 224, 64, 11, 4, 2, 3, 2)}
CPU_SHAPES = {"seed_conv1": (8, 3, 32, 32, 32, 3, 1, 1, 2, 2), "seed_conv2": (8, 32, 16, 16, 64, 3, 1, 1, 2, 2)}
GPU_DTYPES = [torch.bfloat16, torch.float32]
CPU_DTYPES = [torch.float32]


def _eager(x, w, b, s, p, P, Q):
    return F.max_pool2d(torch.relu(F.conv2d(x, w, b, stride=s, padding=p)), P, Q)


def _make_case(device: torch.device, op: str, shape, dtype: torch.dtype) -> Case:
    N, C, H, W, K, R, s, p, P, Q = shape
    state = {}

    def make(provider: str):
        import pydlx

        def eager(x, w, b):
            return _eager(x, w, b, s, p, P, Q)

        f = pick(provider, state, eager, lambda: lambda x, w, b: pydlx.ops.conv_relu_pool2d(x, w, b, s, p, P, Q))
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(N, C, H, W, generator=gen, device=device, dtype=dtype)
        w = torch.randn(K, C, R, R, generator=gen, device=device, dtype=dtype) / (C * R * R) ** 0.5
        b = torch.randn(K, generator=gen, device=device, dtype=dtype)
        g = None
        xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))

        def fwd():
            return f(x, w, b)

        def fwdbwd():
            nonlocal g
            xg.grad = wg.grad = bg.grad = None
            y = f(xg, wg, bg)
            if g is None:
                g = torch.randn(y.shape, generator=gen, device=device, dtype=dtype)
            y.backward(g)
            return y

        return fwd, fwdbwd

    return Case(family="conv_relu_pool", op=op, shape=f"{N},{C},{H},{W}->{K} {R}x{R} s{s} p{p} pool{P}/{Q}",
                dtype=dtype, make=make)


def cases(device, small: bool) -> List[Case]:
    device = torch.device(device)
    shapes, dtypes = (CPU_SHAPES, CPU_DTYPES) if small else (GPU_SHAPES, GPU_DTYPES)
    return [_make_case(device, op, shape, dt) for dt in dtypes for op, shape in shapes.items()]
