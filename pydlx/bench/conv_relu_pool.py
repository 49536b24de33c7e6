"""Benchmark cases for the conv_relu_pool family, MaxPool2d(ReLU(Conv2d(x))), and for conv_act_pool, the zoo's other
conv blocks (pydlx.ops.conv_act_pool2d: no pool, padded and ceil-mode pools, other activations).

Shapes (``N,C,H,W->K kxk sS pP poolA/B``): the seed CNN's layers (batch 256: 3->32 at 32x32 and 32->64 at 16x16,
3x3 pad 1, pool 2/2), VGG-style 64->128 at 112x112 and 256->256 at 28x28, AlexNet-style 3->64 11x11 stride 4 pad 2
at 224x224 with a 3/2 pool. Providers: ``pydlx`` (auto: eager inside the op until a measured policy says otherwise),
``pydlx-triton`` (the fused Triton kernel), ``pydlx-cuda`` (csrc/conv_relu_pool.cu's direct convolution, first
layers: at most 8 input channels; n/a elsewhere), ``eager`` (cuDNN) and ``compile``.
conv_act_pool shapes (``... act poolA/B[pP][ceil]`` or ``nopool``): ResNet's stem (7x7 stride 2 pad 3, ReLU, pool
3/2 pad 1) and body (3x3 64->64 at 56x56, the folded BatchNorm's conv + ReLU), GoogLeNet's ceil-mode pool, a
MobileNetV3 1x1 conv + Hardswish. Its rows are not policy rows (pydlx/_policy.py FAMILIES): ``auto`` keeps these
variants eager until the policy can key them.
"""
from __future__ import annotations

from typing import List

import torch

from .. import registry
from . import Case, Trial, pick

# (N, C, H, W, K, kernel, stride, padding, pool, pool_stride)
GPU_SHAPES = {"seed_conv1": (256, 3, 32, 32, 32, 3, 1, 1, 2, 2), "seed_conv2": (256, 32, 16, 16, 64, 3, 1, 1, 2, 2),
              "vgg_64_128": (32, 64, 112, 112, 128, 3, 1, 1, 2, 2), "vgg_256_256": (32, 256, 28, 28, 256, 3, 1, 1, 2, 2),
              "alexnet_conv1": (64, 3, 224, 224, 64, 11, 4, 2, 3, 2)}
CPU_SHAPES = {"seed_conv1": (8, 3, 32, 32, 32, 3, 1, 1, 2, 2), "seed_conv2": (8, 32, 16, 16, 64, 3, 1, 1, 2, 2)}
GPU_DTYPES = [torch.bfloat16, torch.float32]
CPU_DTYPES = [torch.float32]


# (N, C, H, W, K, kernel, stride, padding, activation, pool, pool_stride, pool_padding, ceil_mode)
VARIANT_GPU_SHAPES = {
    "resnet_stem": (64, 3, 224, 224, 64, 7, 2, 3, "relu", 3, 2, 1, False),
    "resnet_3x3_64": (64, 64, 56, 56, 64, 3, 1, 1, "relu", 1, 1, 0, False),
    "googlenet_3x3_ceil": (64, 64, 56, 56, 192, 3, 1, 1, "relu", 3, 2, 0, True),
    "mobilenet_1x1_hardswish": (64, 96, 14, 14, 576, 1, 1, 0, "hardswish", 1, 1, 0, False),
}
VARIANT_CPU_SHAPES = {"resnet_stem": (4, 3, 32, 32, 16, 7, 2, 3, "relu", 3, 2, 1, False),
                      "resnet_3x3_64": (4, 16, 16, 16, 16, 3, 1, 1, "relu", 1, 1, 0, False)}


def _make_case(device: torch.device, op: str, shape, dtype: torch.dtype, family: str = "conv_relu_pool") -> Case:
    N, C, H, W, K, R, s, p, act, P, Q, PP, ceil = shape if len(shape) == 13 else (*shape[:8], "relu", *shape[8:],
                                                                                  0, False)
    state = {}

    def make(provider: str):
        import pydlx
        from pydlx.reference.conv_relu_pool import conv_act_pool2d as eager_chain

        def eager(x, w, b):  # Conv2d, the activation, MaxPool2d as three eager calls
            return eager_chain(x, w, b, s, p, act, P, Q, PP, ceil)

        fused = (lambda: lambda x, w, b: pydlx.ops.conv_relu_pool2d(x, w, b, s, p, P, Q)) \
            if family == "conv_relu_pool" else \
            (lambda: lambda x, w, b: pydlx.ops.conv_act_pool2d(x, w, b, s, p, act, P, Q, PP, ceil))
        f = pick(provider, state, eager, fused)
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

    shape_words = registry.FAMILIES["conv_relu_pool"].shape(N, C, H, W, K, R, s, p, P, Q, PP, ceil,
                                                            None if family == "conv_relu_pool" else act)
    return Case(family=family, op=op, shape=shape_words, dtype=dtype, make=make)


def cases(device, small: bool) -> List[Case]:
    device = torch.device(device)
    shapes, dtypes = (CPU_SHAPES, CPU_DTYPES) if small else (GPU_SHAPES, GPU_DTYPES)
    return [_make_case(device, op, shape, dt) for dt in dtypes for op, shape in shapes.items()]


def variant_cases(device, small: bool) -> List[Case]:
    device = torch.device(device)
    shapes, dtypes = (VARIANT_CPU_SHAPES, CPU_DTYPES) if small else (VARIANT_GPU_SHAPES, GPU_DTYPES)
    return [_make_case(device, op, shape, dt, "conv_act_pool") for dt in dtypes for op, shape in shapes.items()]


# conv_bn_train: Conv2d -> BatchNorm2d (training mode) [-> act] [-> MaxPool2d], a training step's forward + backward.
# ``pydlx`` runs the op's training form (pydlx.ops.conv_bn_act_pool2d(training=True): x saved, the conv recomputed
# in backward) with cuDNN's convolution (the reference backend, forced inside the case: under auto it would run
# eagerly); ``pydlx-triton`` with pydlx's Triton convolution; ``eager`` the three/four torch calls. The question
# these rows answer: what the recompute costs (one more convolution forward per block) against eager, for 0.34x of
# eager's saved bytes on ResNet-18 (bench/NOTES.md). Not policy rows: auto keeps the training form eager.
TRAIN_GPU_SHAPES = {
    "resnet_stem_bn": (64, 3, 224, 224, 64, 7, 2, 3, "relu", 3, 2, 1, False),
    "resnet_3x3_64_bn": (64, 64, 56, 56, 64, 3, 1, 1, "relu", 1, 1, 0, False),
    "resnet_3x3_256_bn_noact": (64, 256, 14, 14, 256, 3, 1, 1, None, 1, 1, 0, False),
}
TRAIN_CPU_SHAPES = {"resnet_stem_bn": (4, 3, 32, 32, 16, 7, 2, 3, "relu", 3, 2, 1, False),
                    "resnet_3x3_64_bn": (4, 16, 16, 16, 16, 3, 1, 1, "relu", 1, 1, 0, False)}


def _make_train_case(device: torch.device, op: str, shape, dtype: torch.dtype) -> Case:
    N, C, H, W, K, R, s, p, act, P, Q, PP, ceil = shape

    def make(provider: str):
        import torch.nn.functional as F

        import pydlx
        from pydlx.activations import forward as activation_forward

        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(N, C, H, W, generator=gen, device=device, dtype=dtype).requires_grad_()
        w = (torch.randn(K, C, R, R, generator=gen, device=device, dtype=dtype) / (C * R * R) ** 0.5).requires_grad_()
        gamma = torch.ones(K, device=device, requires_grad=True)  # BatchNorm's parameters and stats stay fp32
        beta = torch.zeros(K, device=device, requires_grad=True)
        rm, rv = torch.zeros(K, device=device), torch.ones(K, device=device)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

        def eager():
            with autocast:
                z = activation_forward(F.batch_norm(F.conv2d(x, w, None, s, p), rm, rv, gamma, beta, True, 0.1),
                                       act)
                return z if P == 1 else F.max_pool2d(z, P, Q, PP, ceil_mode=ceil)

        def fused():
            with autocast, pydlx.use_backend("reference" if pydlx.current_backend() == "auto" else
                                             pydlx.current_backend()):
                return pydlx.ops.conv_bn_act_pool2d(x, w, None, rm, rv, gamma, beta, 1e-5, s, p, act, P, Q, PP, ceil,
                                                    training=True, momentum=0.1)

        f = eager if provider == "eager" else fused if provider == "pydlx" else \
            pick(provider, {}, eager, lambda: fused)
        g = None

        def fwd():
            with torch.no_grad():
                return f()

        def fwdbwd():
            nonlocal g
            x.grad = w.grad = gamma.grad = beta.grad = None
            y = f()
            if g is None:
                g = torch.randn(y.shape, generator=gen, device=device, dtype=y.dtype)
            y.backward(g)
            return y

        return fwd, fwdbwd

    shape_words = registry.FAMILIES["conv_relu_pool"].shape(N, C, H, W, K, R, s, p, P, Q, PP, ceil,
                                                            f"bn {act or 'none'}")
    return Case(family="conv_bn_train", op=op, shape=shape_words, dtype=dtype, make=make,
                providers=("pydlx", "eager", "compile", "pydlx-triton"))


def train_cases(device, small: bool) -> List[Case]:
    device = torch.device(device)
    shapes, dtypes = (TRAIN_CPU_SHAPES, CPU_DTYPES) if small else (TRAIN_GPU_SHAPES, GPU_DTYPES)
    return [_make_train_case(device, op, shape, dt) for dt in dtypes for op, shape in shapes.items()]


def trial(call: registry.ConvCall, device, gen: torch.Generator) -> Trial:
    """A call of the family's descriptor: the input in the call's layout (its strides), the call's activation and
    pool."""
    from pydlx.reference.conv_relu_pool import conv_act_pool2d as eager_chain

    c = call
    x = torch.empty_strided((c.N, c.C, c.H, c.W), c.strides, device=device, dtype=c.dtype)
    x.copy_(torch.randn(x.shape, generator=gen, device=device, dtype=c.dtype))
    w = torch.randn(c.K, c.C, c.R, c.R, generator=gen, device=device, dtype=c.dtype) / max(c.C * c.R * c.R, 1) ** 0.5
    b = torch.randn(c.K, generator=gen, device=device, dtype=c.dtype)
    pool = (c.P, c.Q, c.PP, c.ceil_mode)

    def fused(x, w, b):
        import pydlx
        return pydlx.ops.conv_act_pool2d(x, w, b, c.stride, c.padding, c.activation, *pool)

    return Trial((x, w, b), fused, lambda x, w, b: eager_chain(x, w, b, c.stride, c.padding, c.activation, *pool))


def tune_calls(dtypes) -> List[registry.ConvCall]:
    """The calls ``python -m pydlx.tune`` measures for this family: the GPU benchmark's ReLU + pool blocks."""
    return [registry.ConvCall(dt, training, N, C, H, W, K, R, s, p, P, Q, 0, False, "relu", (C * H * W, H * W, W, 1))
            for dt in dtypes for training in (True, False)
            for N, C, H, W, K, R, s, p, P, Q in GPU_SHAPES.values()]
