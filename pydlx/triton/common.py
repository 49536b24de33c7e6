"""Shared pieces of pydlx's Triton kernels: activation functions and their derivatives, the dot and the cast
(with the interpreter's bf16 workarounds), and the host-side launch rules (autotune / fixed config)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._backend import triton_interpret

# Activation codes, shared with csrc/dispatch.h.
ACT_CODES = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "tanh": 5, "sigmoid": 6}
# Activations whose derivative needs z; for the others the saved tensor is y (pydlx/reference/linear.py).
PREACT_CODES = (2, 3, 4)


@triton.jit
def _act_fwd(z, ACT: tl.constexpr):
    """act(z) in fp32. NaN propagates (relu keeps NaN like torch.relu)."""
    if ACT == 1:
        return tl.where(z < 0.0, 0.0, z)
    elif ACT == 2:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        return z * tl.sigmoid(2.0 * inner)  # 0.5 z (1 + tanh(u)) == z sigmoid(2u)
    elif ACT == 4:
        return z * tl.sigmoid(z)
    elif ACT == 5:
        return 2.0 * tl.sigmoid(2.0 * z) - 1.0
    elif ACT == 6:
        return tl.sigmoid(z)
    else:
        return z


@triton.jit
def _act_bwd(g, s, ACT: tl.constexpr):
    """dL/dz from g = dL/dy in fp32; s is z for gelu/gelu_tanh/silu, y for the others."""
    if ACT == 1:
        return tl.where(s > 0.0, g, 0.0)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(s * 0.7071067811865476))
        pdf = tl.exp(-0.5 * s * s) * 0.3989422804014327
        return g * (cdf + s * pdf)
    elif ACT == 3:
        t = 2.0 * tl.sigmoid(1.5957691216057308 * (s + 0.044715 * s * s * s)) - 1.0
        dinner = 0.7978845608028654 * (1.0 + 0.134145 * s * s)
        return g * (0.5 * (1.0 + t) + 0.5 * s * (1.0 - t * t) * dinner)
    elif ACT == 4:
        sg = tl.sigmoid(s)
        return g * sg * (1.0 + s * (1.0 - sg))
    elif ACT == 5:
        return g * (1.0 - s * s)
    elif ACT == 6:
        return g * s * (1.0 - s)
    else:
        return g


@triton.jit
def _cast(x, DT: tl.constexpr, INTERP_BF16: tl.constexpr):
    """fp32 x to DT, rounding to nearest even (the GPU's conversion). The interpreter truncates fp32 -> bf16,
    one ulp low (which shows in y(1 - y) near y = 1), so there the rounding is done by hand on the bits."""
    if INTERP_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(DT)  # exact: the low 16 bits are zero
    return x.to(DT)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    if INTERP_BF16:  # the interpreter's bf16 dot is wrong: upcast the tiles
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory one block may use, by arch


def arch() -> int:
    major, _ = torch.cuda.get_device_capability()
    return 90 if major >= 9 else 80


def precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored by tl.dot for fp16/bf16 operands


def launch(tuned, raw, grid, args, kwargs, interpret_cfg):
    """Launch through the autotuner; under the interpreter, or with PYDLX_TRITON_AUTOTUNE=0 (the GPU test suite:
    correctness, not speed, and a fraction of the compile time), with one fixed config instead."""
    if triton_interpret():
        cfg = interpret_cfg
    elif os.environ.get("PYDLX_TRITON_AUTOTUNE", "1") == "0":
        named = dict(zip(raw.arg_names, args))
        prune = tuned.early_config_prune
        cfg = (prune(tuned.configs, named, **kwargs) if prune else tuned.configs)[0]
    else:
        tuned[grid](*args, **kwargs)
        return
    raw[grid(cfg.kwargs)](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def interp_bf16(dtype: torch.dtype) -> bool:
    return triton_interpret() and dtype == torch.bfloat16
