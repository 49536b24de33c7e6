"""Triton kernel for Conv2d -> ReLU -> MaxPool2d: an implicit-GEMM convolution whose tiles are laid out by pooled
output pixel, so every pool window is reduced in registers and only the pooled map is written.

Shapes: x[N, C, H, W] (any strides), w[K, C, R, R], b[K]; conv output (never stored) [N, K, HO, WO] with
HO = (H + 2 pad - R) // stride + 1; pooled y[N, K, HP, WP], HP = (HO - P) // Q + 1 (floor mode).
A program takes BLOCK_P pooled pixels of one image and BLOCK_K output channels. For each of the P x P positions of
the pool window it computes the conv outputs under them as a GEMM over C*R*R (the input patch gathered on the fly,
zero padding by masks), then keeps the running max and its window position. Bias and ReLU come once, after the max:
a per-channel bias and ReLU are monotone, so relu(max(z) + b) == max(relu(z + b)), exactly.
Written: y, and idx[N, K, HP, WP] (int8, the argmax's position in the window, 0..P*P-1) for backward, which routes
dy through idx and the ReLU mask (y > 0) and calls the convolution backward (pydlx/ops/conv_relu_pool.py).
NaN propagates as in max_pool2d.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import triton
import triton.language as tl

from .common import _cast, _dot, interp_bf16, launch, precision


@triton.jit
def _conv_relu_pool_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, idx_ptr,
    C, H, W, K, HP, WP,
    stride_xn, stride_xc, stride_xh, stride_xw,
    R: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, P: tl.constexpr, Q: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    n = tl.program_id(2).to(tl.int64)
    rp = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # pooled pixel index in HP * WP
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # output channel
    rr = tl.arange(0, BLOCK_R)
    p_ok = rp < HP * WP
    k_ok = rk < K
    ph = rp // WP
    pw = rp % WP
    CRR = C * R * R
    x_img = x_ptr + n * stride_xn
    best = tl.full((BLOCK_P, BLOCK_K), float("-inf"), tl.float32)
    arg = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.int32)
    for win in tl.static_range(P * P):
        oh = ph * Q + win // P  # conv output row and column under this window position
        ow = pw * Q + win % P
        acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, tl.cdiv(CRR, BLOCK_R)):
            kr = r0 * BLOCK_R + rr  # reduction index = (c, kh, kw)
            c = kr // (R * R)
            kh = (kr // R) % R
            kw = kr % R
            ih = oh[:, None] * STRIDE - PAD + kh[None, :]
            iw = ow[:, None] * STRIDE - PAD + kw[None, :]
            a_mask = p_ok[:, None] & (kr[None, :] < CRR) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_img + c[None, :] * stride_xc + ih * stride_xh + iw * stride_xw, mask=a_mask, other=0.0)
            b = tl.load(w_ptr + rk[None, :] * CRR + kr[:, None], mask=(kr[:, None] < CRR) & k_ok[None, :],
                        other=0.0)  # w as [C*R*R, K]; w is contiguous [K, C, R, R]
            acc = _dot(a, b, acc, PRECISION, INTERP_BF16)
        take = (acc > best) | ((acc != acc) & (best == best))  # first max; a NaN wins and stays
        best = tl.where(take, acc, best)
        arg = tl.where(take, win, arg)
    if HAS_BIAS:
        best += tl.load(b_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    best = tl.where(best < 0.0, 0.0, best)  # ReLU, NaN kept
    out = n * K * HP * WP + rk[None, :] * (HP * WP) + rp[:, None]  # y and idx are contiguous [N, K, HP, WP]
    mask = p_ok[:, None] & k_ok[None, :]
    tl.store(y_ptr + out, _cast(best, y_ptr.dtype.element_ty, INTERP_BF16), mask=mask)
    tl.store(idx_ptr + out, arg.to(tl.int8), mask=mask)


def _cfg(bp, bk, br, warps, stages):
    return triton.Config({"BLOCK_P": bp, "BLOCK_K": bk, "BLOCK_R": br}, num_warps=warps, num_stages=stages)


# Not yet tuned on a GPU (bench/NOTES.md). The implicit-GEMM gather (per-element channel/row/column of the patch,
# 2-D bounds masks) and three live tiles (acc, running max, argmax) spill at the usual GEMM tiles: these are the
# tiles that compile without spills for sm_80 and sm_90 (tests/aot_compile.py): 128x64 needs 8 warps and 16-wide
# K steps; fp32 (tf32) only up to 64x32x16.
FWD_CONFIGS_16BIT: List[triton.Config] = [_cfg(128, 64, 16, 8, 3), _cfg(64, 32, 32, 4, 3), _cfg(64, 64, 16, 4, 3),
                                          _cfg(32, 64, 32, 4, 3), _cfg(32, 32, 32, 4, 3)]
FWD_CONFIGS_FP32: List[triton.Config] = [_cfg(64, 32, 16, 4, 2), _cfg(32, 32, 16, 4, 2)]
FWD_CONFIGS: List[triton.Config] = FWD_CONFIGS_16BIT + FWD_CONFIGS_FP32
INTERPRET_CONFIG = _cfg(16, 16, 16, 4, 1)


def configs_for(elt_bytes: int) -> List[triton.Config]:
    """The configs that ship for this element size (the autotuner's pruning; what tests/aot_compile.py compiles)."""
    return FWD_CONFIGS_FP32 if elt_bytes == 4 else FWD_CONFIGS_16BIT


_fwd_tuned = triton.autotune(
    FWD_CONFIGS, key=["C", "H", "W", "K", "R", "STRIDE", "PAD", "P", "Q", "PRECISION"],
    prune_configs_by={"early_config_prune": lambda configs, named, **kw: configs_for(named["x_ptr"].element_size())},
)(_conv_relu_pool_fwd_kernel)


def _launch(tuned, raw, grid, args, kwargs):
    launch(tuned, raw, grid, args, kwargs, INTERPRET_CONFIG)


def out_shape(H: int, W: int, R: int, stride: int, padding: int, P: int, Q: int) -> Tuple[int, int, int, int]:
    """(HO, WO, HP, WP): the conv output and pooled sizes (floor mode)."""
    HO = (H + 2 * padding - R) // stride + 1
    WO = (W + 2 * padding - R) // stride + 1
    return HO, WO, (HO - P) // Q + 1, (WO - P) // Q + 1


def conv_relu_pool_fwd(x: torch.Tensor, w: torch.Tensor, b, stride: int, padding: int, P: int, Q: int):
    """(y, idx) for 4-D x: y = max_pool(relu(conv(x))) contiguous NCHW, idx the argmax's window position (int8)."""
    N, C, H, W = x.shape
    K, _, R, _ = w.shape
    _, _, HP, WP = out_shape(H, W, R, stride, padding, P, Q)
    w = w.contiguous()
    y = x.new_empty((N, K, HP, WP))
    idx = torch.empty((N, K, HP, WP), dtype=torch.int8, device=x.device)
    if y.numel() == 0:
        return y, idx
    args = (x, w, b.contiguous() if b is not None else w, y, idx, C, H, W, K, HP, WP, *x.stride())
    kwargs = dict(R=R, STRIDE=stride, PAD=padding, P=P, Q=Q, HAS_BIAS=b is not None, PRECISION=precision(x.dtype),
                  INTERP_BF16=interp_bf16(x.dtype))
    grid = lambda meta: (triton.cdiv(HP * WP, meta["BLOCK_P"]), triton.cdiv(K, meta["BLOCK_K"]), N)  # noqa: E731
    _launch(_fwd_tuned, _conv_relu_pool_fwd_kernel, grid, args, kwargs)
    return y, idx
