"""Triton kernel for Conv2d -> activation [-> MaxPool2d]: an implicit-GEMM convolution whose tiles are laid out by
output pixel (the pooled one when there is a pool), so every pool window is reduced in registers and only the
(pooled) output is written, with the bias and the activation in the epilogue.

Shapes: x[N, C, H, W] (any strides), w[K, C, R, R], b[K]; conv output (never stored) [N, K, HO, WO] with
HO = (H + 2 pad - R) // stride + 1; output y[N, K, HP, WP]: the pooled map (max_pool2d's size for the pool's
padding and floor/ceil mode: pydlx/reference/conv_relu_pool.py ``out_shape``), or the activated conv output when
P = 1 (no pool: HP, WP = HO, WO).
A program takes BLOCK_P output pixels of one image and BLOCK_K output channels. For each of the P x P positions of
the pool window it computes the conv outputs under them as a GEMM over (tap, channel) = R*R*C, ordered tap-major
with channels inner (the weight permuted to [R, R, C, K]): each step's bounds mask is one vector over the pixels,
and with channels_last input each tap's channels are contiguous. Zero padding comes from the masks; window
positions outside the conv output (the pool's padding, ceil mode) take no part, as max_pool2d's -inf padding.
It keeps the running max and its window position (the first position inside the conv output starts the max, as
in max_pool2d). Bias and activation come once, after the max: for a per-channel bias and a non-decreasing
activation (the only ones fused with a pool) act(max(z) + b) == max(act(z + b)), exactly.
Written: y; with a pool idx[N, K, HP, WP] (int8, the argmax's position in the window, 0..P*P-1) for backward, unless
the call is inference (SAVE_IDX off: a fifth to a third fewer bytes written);
without a pool, when the activation's derivative needs it (SAVE_Z), the pre-activation z. NaN propagates as in
max_pool2d.

Backward with a pool: one kernel (``_unpool_bwd_kernel``) takes dy, y and idx to the gradient at the conv output,
dz[N, K, HO, WO] = sum over the windows whose argmax is that position of act'(y) dy, written whole (zeros included):
each program takes BLOCK conv-output positions of one (image, channel) plane and gathers from the at most
ceil(P / Q)^2 windows that can hold each one, so overlapping windows need no atomics and the sum is deterministic.
Then cuDNN's convolution backward. It replaces the shared backward's ~7 ops (the activation's derivative, the int8
positions back to flat indices, a zero fill and a scatter). Without a pool the shared backward runs (the
activation's derivative, one elementwise op, then the convolution backward).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .._geometry import out_shape
from .._geometry import conv_size
from ..reference import conv_relu_pool as reference
from .common import Tuned, _act_bwd, _act_fwd, _cast, _dot, act_args, cdiv, kept_layout, precision


@triton.jit
def _conv_relu_pool_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, idx_ptr, z_ptr,
    C, H, W, K, HO, WO, HP, WP,
    stride_xn, stride_xc, stride_xh, stride_xw,
    R: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, P: tl.constexpr, Q: tl.constexpr,
    PPAD: tl.constexpr, ACT: tl.constexpr, ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_Z: tl.constexpr,
    SAVE_IDX: tl.constexpr, PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n = tl.program_id(2).to(tl.int64)
    rp = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # output pixel index in HP * WP
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # output channel
    rc = tl.arange(0, BLOCK_C)
    p_ok = rp < HP * WP
    k_ok = rk < K
    ph = rp // WP
    pw = rp % WP
    x_img = x_ptr + n * stride_xn
    c_steps = tl.cdiv(C, BLOCK_C)
    best = tl.full((BLOCK_P, BLOCK_K), float("-inf"), tl.float32)
    arg = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.int32)
    seen = tl.zeros((BLOCK_P,), dtype=tl.int32)  # a window position inside the conv output was taken
    for win in tl.static_range(P * P):
        oh = ph * Q + win // P - PPAD  # the conv output under this window position
        ow = pw * Q + win % P - PPAD
        inside = p_ok & (oh >= 0) & (oh < HO) & (ow >= 0) & (ow < WO)
        ih0 = oh * STRIDE - PAD  # its patch's top-left input pixel
        iw0 = ow * STRIDE - PAD
        acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
        # one flat loop over the reduction (kh, kw, channel block): the tap's row/column and its bounds mask are
        # scalar arithmetic plus one 1-D vector per step, channels are the GEMM's K
        for t in range(0, R * R * c_steps):
            tap = t // c_steps
            c = (t % c_steps) * BLOCK_C + rc
            ih = ih0 + tap // R
            iw = iw0 + tap % R
            ok = inside & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            c_ok = c < C
            a = tl.load(x_img + (ih * stride_xh + iw * stride_xw)[:, None] + c[None, :] * stride_xc,
                        mask=ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(w_ptr + (tap * C + c[:, None]) * K + rk[None, :], mask=c_ok[:, None] & k_ok[None, :],
                        other=0.0)  # w as [R*R, C, K] (K contiguous)
            acc = _dot(a, b, acc, PRECISION)
        if P == 1:
            best = acc
        else:
            # the first position inside starts the max; then the first larger value, or a NaN (the last one wins,
            # as in max_pool2d)
            take = inside[:, None] & ((seen[:, None] == 0) | (acc > best) | (acc != acc))
            best = tl.where(take, acc, best)
            arg = tl.where(take, win, arg)
            seen = tl.where(inside, 1, seen)
    if HAS_BIAS:
        best += tl.load(b_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    out = n * K * HP * WP + rk[None, :] * (HP * WP) + rp[:, None]  # y, idx and z are contiguous [N, K, HP, WP]
    mask = p_ok[:, None] & k_ok[None, :]
    if SAVE_Z:
        tl.store(z_ptr + out, _cast(best, z_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + out, _cast(_act_fwd(best, ACT, ALPHA), y_ptr.dtype.element_ty), mask=mask)
    if SAVE_IDX:  # (a pool, and a call that autograd records)
        tl.store(idx_ptr + out, arg.to(tl.int8), mask=mask)


@triton.jit
def _unpool_bwd_kernel(
    g_ptr, y_ptr, idx_ptr, dz_ptr,
    K, HO, WO, HP, WP, blocks,
    stride_gn, stride_gk, stride_gh, stride_gw,
    P: tl.constexpr, Q: tl.constexpr, PPAD: tl.constexpr, ACT: tl.constexpr, ALPHA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """dz = the gradient at the conv output: act'(y) dy routed to each window's argmax (idx), summed over the
    windows that chose a position. Program: BLOCK positions of one (n, k) plane of dz (``blocks`` per plane)."""
    pid = tl.program_id(0)
    plane = (pid // blocks).to(tl.int64)  # n * K + k
    r = (pid % blocks) * BLOCK + tl.arange(0, BLOCK)  # conv-output position in HO * WO
    ok = r < HO * WO
    oh = r // WO
    ow = r % WO
    g_plane = g_ptr + (plane // K) * stride_gn + (plane % K) * stride_gk  # dy: any strides (an expanded one too)
    pooled = plane * HP * WP  # y and idx: contiguous [N, K, HP, WP]
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    # window (ph, pw) covers conv rows ph Q - PPAD .. ph Q - PPAD + P - 1: the last one holding oh starts at
    # ph = (oh + PPAD) // Q, and at most ceil(P / Q) windows hold it along each dimension
    ph_last = (oh + PPAD) // Q
    pw_last = (ow + PPAD) // Q
    for a in tl.static_range((P + Q - 1) // Q):
        ph = ph_last - a
        dh = oh + PPAD - ph * Q  # oh's row in window ph (>= 0 by construction)
        row_ok = ok & (ph >= 0) & (ph < HP) & (dh < P)
        for b in tl.static_range((P + Q - 1) // Q):
            pw = pw_last - b
            dw = ow + PPAD - pw * Q
            hold = row_ok & (pw >= 0) & (pw < WP) & (dw < P)
            at = pooled + ph * WP + pw
            chose = hold & (tl.load(idx_ptr + at, mask=hold, other=-1).to(tl.int32) == dh * P + dw)
            g = tl.load(g_plane + ph * stride_gh + pw * stride_gw, mask=chose, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + at, mask=chose, other=0.0).to(tl.float32)
            acc += tl.where(chose, _act_bwd(g, y, ACT, ALPHA), 0.0)
    tl.store(dz_ptr + plane * HO * WO + r, _cast(acc, dz_ptr.dtype.element_ty), mask=ok)


def _cfg(bp, bk, bc, warps, stages):
    return triton.Config({"BLOCK_P": bp, "BLOCK_K": bk, "BLOCK_C": bc}, num_warps=warps, num_stages=stages)


# Not yet tuned on a GPU (bench/NOTES.md). Three live tiles (acc, running max, argmax) plus the gathered patch's
# pointers make this register-heavy: these are the tiles that compile without spills for both sm_80 and sm_90
# (tests/aot_compile.py); 128x128 tiles and 4-warp 128-row tiles spill. The 16-channel steps suit first layers
# (3 input channels) and the 32-channel steps wider ones.
FWD_CONFIGS_16BIT: List[triton.Config] = [_cfg(128, 64, 32, 8, 3), _cfg(64, 64, 32, 4, 3), _cfg(128, 64, 16, 8, 3),
                                          _cfg(64, 32, 32, 4, 3), _cfg(32, 64, 32, 4, 3), _cfg(32, 32, 32, 4, 3)]
FWD_CONFIGS_FP32: List[triton.Config] = [_cfg(128, 64, 16, 8, 3), _cfg(64, 32, 32, 4, 2), _cfg(128, 32, 16, 8, 2),
                                         _cfg(64, 32, 16, 4, 2), _cfg(32, 32, 16, 4, 2)]
FWD_CONFIGS: List[triton.Config] = FWD_CONFIGS_16BIT + FWD_CONFIGS_FP32
# A 3x3 pool window keeps nine window positions' code unrolled: the larger tiles spill (388..1569 LDL/STL for the
# 128- and 64-row 16-bit tiles, 212..919 for fp32 64x32x32 and 128x64x16, tests/aot_compile.py's crp-stem-pool3p1
# variant). These are the ones that compile spill-free on sm_80 and sm_90.
POOL3_CONFIGS_16BIT: List[triton.Config] = [c for c in FWD_CONFIGS_16BIT if c.kwargs["BLOCK_P"] == 32]
POOL3_CONFIGS_FP32: List[triton.Config] = [c for c in FWD_CONFIGS_FP32
                                           if c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_C"] <= 512]
INTERPRET_CONFIG = _cfg(16, 16, 16, 4, 1)


def configs_for(elt_bytes: int, P: int = 2) -> List[triton.Config]:
    """The configs that ship for this element size and pool window (the autotuner's pruning; what
    tests/aot_compile.py compiles)."""
    if P >= 3:
        return POOL3_CONFIGS_FP32 if elt_bytes == 4 else POOL3_CONFIGS_16BIT
    return FWD_CONFIGS_FP32 if elt_bytes == 4 else FWD_CONFIGS_16BIT


_conv_relu_pool_fwd = Tuned(
    _conv_relu_pool_fwd_kernel, FWD_CONFIGS,
    ["C", "H", "W", "K", "R", "STRIDE", "PAD", "P", "Q", "PPAD", "ACT", "SAVE_Z", "SAVE_IDX", "PRECISION"],
    lambda configs, named, **kw: configs_for(named["x_ptr"].element_size(), kw["P"]), INTERPRET_CONFIG)


# The unpooling backward: elementwise work (at most 9 gathers a position), one config; not yet tuned on a GPU.
UNPOOL_CONFIG = triton.Config({"BLOCK": 512}, num_warps=4, num_stages=1)
_unpool_bwd = Tuned(_unpool_bwd_kernel, [UNPOOL_CONFIG], [], lambda configs, named, **kw: configs, UNPOOL_CONFIG)


def supports(call, device) -> Optional[str]:
    """None if the kernel runs this call (a registry.ConvCall), else why not (``why_too_large``)."""
    _, _, HP, WP = call.out_shape()
    return why_too_large((call.N, call.C, call.H, call.W), call.strides, call.K, call.R, HP, WP)


def why_too_large(x_shape, x_strides, K: int, R: int, HP: int, WP: int) -> Optional[str]:
    """None if the kernel addresses this call correctly, else why not. The image (n) offset is 64-bit; the
    offsets inside one image of x, of y / idx, and into the weights are 32-bit, so each (padded to whole blocks)
    must stay below 2^31 elements."""
    _, C, H, W = x_shape
    _, sc, sh, sw = (abs(s) for s in x_strides)
    image = (C + 32) * sc + (H + 16) * sh + (W + 16) * sw
    out = (K + 64) * (HP * WP + 128)
    weights = R * R * (C + 32) * K
    if max(image, out, weights) >= 2**31:
        return (f"one image of {C}x{H}x{W} in, {K}x{HP}x{WP} out, kernel {R}: the Triton kernel addresses one "
                "image with 32-bit offsets (at most 2^31 elements)")
    return None


def _tap_major(w: torch.Tensor) -> torch.Tensor:
    """The weight as the kernel reads it: [R, R, C, K], each tap's channels x output channels, K contiguous."""
    return w.permute(2, 3, 1, 0).contiguous()


def conv_relu_pool_fwd(x: torch.Tensor, w: torch.Tensor, b, stride: int, padding: int, P: int, Q: int, PP: int = 0,
                       ceil_mode: bool = False, activation: Optional[str] = "relu", save_preact: bool = False,
                       save_index: bool = True):
    """(y, idx, z) for 4-D x: y the (pooled) output contiguous NCHW; idx the argmax's window position (int8) with a
    pool and ``save_index``, else empty; z the pre-activation when ``save_preact`` (no pool only), else empty."""
    N, C, H, W = x.shape
    K, _, R, _ = w.shape
    HO, WO, HP, WP = out_shape(H, W, R, stride, padding, P, Q, PP, ceil_mode)  # P = 1: HP, WP = HO, WO
    w = kept_layout(w, _tap_major)
    y = x.new_empty((N, K, HP, WP))
    save_idx = P > 1 and save_index
    idx = torch.empty((N, K, HP, WP) if save_idx else (0,), dtype=torch.int8, device=x.device)
    z = x.new_empty((N, K, HP, WP) if save_preact else (0,))
    if y.numel() == 0:
        return y, idx, z
    act, alpha = act_args(activation)
    args = (x, w, b.contiguous() if b is not None else w, y, idx if save_idx else y, z if save_preact else y,
            C, H, W, K, HO, WO, HP, WP, *x.stride())
    kwargs = dict(R=R, STRIDE=stride, PAD=padding, P=P, Q=Q, PPAD=PP, ACT=act, ALPHA=alpha,
                  HAS_BIAS=b is not None, SAVE_Z=save_preact, SAVE_IDX=save_idx, PRECISION=precision(x.dtype))
    grid = lambda meta: (cdiv(HP * WP, meta["BLOCK_P"]), cdiv(K, meta["BLOCK_K"]), N)  # noqa: E731
    _conv_relu_pool_fwd(grid, args, kwargs)
    return y, idx, z


def conv_relu_pool_bwd(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
                       z: torch.Tensor, has_bias: bool, stride: int, padding: int, P: int, Q: int, PP: int,
                       activation: Optional[str], need_input: bool, need_weight: bool):
    """(dx, dw, db), unneeded ones None: with a pool, dz from one launch of ``_unpool_bwd_kernel`` (dy in any
    strides), then the convolution backward; without, the shared backward (pydlx/reference/conv_relu_pool.py)."""
    if P == 1:
        return reference.conv_relu_pool_bwd(grad, x, w, y, idx, z, has_bias, stride, padding, P, Q, PP, activation,
                                            need_input, need_weight)
    N, K = x.shape[0], w.shape[0]
    HO, WO = conv_size(x.shape[2], w.shape[-1], stride, padding), conv_size(x.shape[3], w.shape[-1], stride, padding)
    HP, WP = y.shape[-2:]
    dz = x.new_empty((N, K, HO, WO))
    if dz.numel():
        act, alpha = act_args(activation)
        blocks = cdiv(HO * WO, UNPOOL_CONFIG.kwargs["BLOCK"])
        _unpool_bwd((N * K * blocks,), (grad, y, idx, dz, K, HO, WO, HP, WP, blocks, *grad.stride()),
                    dict(P=P, Q=Q, PPAD=PP, ACT=act, ALPHA=alpha))
    return reference.conv_backward(dz, x, w, has_bias, stride, padding, need_input, need_weight)
