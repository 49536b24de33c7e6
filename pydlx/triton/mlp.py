"""Triton kernels for small MLPs: every layer of an MLP whose layers are at most 128 wide, in one kernel.

Shapes: x[M, K0] (K0 any), L layers, weights[l] of shape [s(l+1), s(l)] as nn.Linear stores them (read in place,
no packing), sizes s(1..L) <= 128. The sizes are compile-time constants (SIZES): a model's layer sizes are fixed,
so each MLP gets its own unrolled kernel, each layer's tile padded to the next power of two >= 16 (PADS).

Forward (one program per BLOCK_M rows, tiny-cuda-nn's fully fused MLP in Triton): the first layer reduces x over
K0 in BLOCK_K chunks (any input width); then, layer after layer, h = act(h @ W^T + b) stays in registers, rounded
to the input dtype between layers exactly as eager PyTorch rounds its stored activations. Only y is written, plus,
when training, what backward needs:
  H[M, sum s(1..L-1)]  the hidden layers' outputs: the next layer's inputs (for the weight gradients) and, for
                       the activations whose derivative is a function of y, the derivative's argument;
  Z[M, sum s(1..L)]    pre-activations, only when an activation's derivative needs z (gelu, gelu_tanh, silu,
                       hardswish, mish).
The hidden and last activations are each a code and a parameter (ACT, ALPHA; LAST_ACT, LAST_ALPHA: act_args).
Backward (one program per BLOCK_M rows): from dy, walks the layers back in registers, dz(l) = g * act'(saved),
g = dz(l) @ W(l); writes each dz(l) (DZ, laid out like Z) for the weight-gradient GEMMs, and dx = dz(0) @ W(0) in
K0 chunks. The weight gradients dW(l) = dz(l)^T @ input(l) over all rows are GEMMs (pydlx/ops/mlp.py): a fused
kernel would have to reduce them across programs.
Padding is exact: out-of-range weight rows/columns and biases load as 0, so padded columns of h (act(0), which is
0.5 for sigmoid) meet zero weights, and padded columns of dy load as 0.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .. import _backend
from ..reference.mlp import saves_z
from ..reference.mlp import FUSED_MAX_LAYERS, FUSED_MAX_WIDTH
from .common import (MAX_STRIDE, NONE, PREACT_CODES, _act_bwd, _act_fwd, _cast, _dot, Tuned, act_args, cdiv,
                     precision)

MAX_WIDTH, MAX_LAYERS = FUSED_MAX_WIDTH, FUSED_MAX_LAYERS  # widest layer (output side), most layers


@triton.jit
def _zeros(M: tl.constexpr, N: tl.constexpr):
    """fp32 zeros of shape (M, N). Through a constexpr parameter, a size taken from a constexpr tuple (PADS[l]) is
    a constexpr on every Triton version (3.6 rejects it directly in a shape)."""
    return tl.zeros((M, N), dtype=tl.float32)


@triton.jit
def _mlp_fwd_kernel(
    x_ptr, ws, bs, y_ptr, h_ptr, z_ptr,
    M, stride_xm, stride_xk,
    SIZES: tl.constexpr, PADS: tl.constexpr, HAS_B: tl.constexpr, L: tl.constexpr,
    HCOLS: tl.constexpr, HW: tl.constexpr, ZCOLS: tl.constexpr, ZW: tl.constexpr,
    ACT: tl.constexpr, ALPHA: tl.constexpr, LAST_ACT: tl.constexpr, LAST_ALPHA: tl.constexpr,
    SAVE_H: tl.constexpr, SAVE_Z: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    m0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    m_left = (M - m0).to(tl.int32)
    rm = tl.arange(0, BLOCK_M)
    row_mask = rm[:, None] < m_left
    dt = y_ptr.dtype.element_ty
    # layer 0: x @ W0^T, reduced over K0 in chunks
    rk = tl.arange(0, BLOCK_K)
    rn = tl.arange(0, PADS[1])
    x_ptrs = x_ptr + m0 * stride_xm + (rm[:, None] * stride_xm + rk[None, :] * stride_xk)
    w_ptrs = ws[0] + (rk[:, None] + rn[None, :] * SIZES[0])  # W0^T chunk [BLOCK_K, PADS[1]]
    acc = _zeros(BLOCK_M, PADS[1])
    for k in range(0, tl.cdiv(SIZES[0], BLOCK_K)):
        k_left = SIZES[0] - k * BLOCK_K
        a = tl.load(x_ptrs, mask=row_mask & (rk[None, :] < k_left), other=0.0)
        w = tl.load(w_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < SIZES[1]), other=0.0)
        acc = _dot(a, w, acc, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K
    h = acc.to(dt)  # rebound in every layer
    for l in tl.static_range(L):
        rn = tl.arange(0, PADS[l + 1])
        if l > 0:  # W_l^T as a [PADS[l], PADS[l+1]] tile; W_l is [SIZES[l+1], SIZES[l]], row-major
            rk = tl.arange(0, PADS[l])
            w = tl.load(ws[l] + (rk[:, None] + rn[None, :] * SIZES[l]),
                        mask=(rk[:, None] < SIZES[l]) & (rn[None, :] < SIZES[l + 1]), other=0.0)
            acc = _dot(h, w, _zeros(BLOCK_M, PADS[l + 1]), PRECISION)
        if HAS_B[l]:
            acc += tl.load(bs[l] + rn, mask=rn < SIZES[l + 1], other=0.0).to(tl.float32)[None, :]
        mask = row_mask & (rn[None, :] < SIZES[l + 1])
        if SAVE_Z:
            tl.store(z_ptr + m0 * ZW + (rm[:, None] * ZW + ZCOLS[l] + rn[None, :]), _cast(acc, dt),
                     mask=mask)
        if l + 1 < L:
            h = _cast(_act_fwd(acc, ACT, ALPHA), dt)
            if SAVE_H:
                tl.store(h_ptr + m0 * HW + (rm[:, None] * HW + HCOLS[l] + rn[None, :]), h, mask=mask)
        else:
            y = _cast(_act_fwd(acc, LAST_ACT, LAST_ALPHA), dt)
            tl.store(y_ptr + m0 * SIZES[L] + (rm[:, None] * SIZES[L] + rn[None, :]), y, mask=mask)


@triton.jit
def _mlp_bwd_kernel(
    g_ptr, y_ptr, ws, h_ptr, z_ptr, dz_ptr, dx_ptr,
    M, stride_gm,
    SIZES: tl.constexpr, PADS: tl.constexpr, L: tl.constexpr,
    HCOLS: tl.constexpr, HW: tl.constexpr, ZCOLS: tl.constexpr, ZW: tl.constexpr,
    ACT: tl.constexpr, ALPHA: tl.constexpr, LAST_ACT: tl.constexpr, LAST_ALPHA: tl.constexpr,
    HID_FROM_Z: tl.constexpr, LAST_FROM_Z: tl.constexpr,
    NEED_DX: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    m0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    m_left = (M - m0).to(tl.int32)
    rm = tl.arange(0, BLOCK_M)
    row_mask = rm[:, None] < m_left
    dt = y_ptr.dtype.element_ty
    # last layer: dz = dy * last_act'(y or z)
    rn = tl.arange(0, PADS[L])
    mask = row_mask & (rn[None, :] < SIZES[L])
    g = tl.load(g_ptr + m0 * stride_gm + (rm[:, None] * stride_gm + rn[None, :]), mask=mask, other=0.0)
    g = g.to(tl.float32)
    if LAST_ACT != NONE:
        if LAST_FROM_Z:
            s = tl.load(z_ptr + m0 * ZW + (rm[:, None] * ZW + ZCOLS[L - 1] + rn[None, :]), mask=mask, other=0.0)
        else:
            s = tl.load(y_ptr + m0 * SIZES[L] + (rm[:, None] * SIZES[L] + rn[None, :]), mask=mask, other=0.0)
        g = _act_bwd(g, s.to(tl.float32), LAST_ACT, LAST_ALPHA)
    dz = _cast(g, dt)
    tl.store(dz_ptr + m0 * ZW + (rm[:, None] * ZW + ZCOLS[L - 1] + rn[None, :]), dz, mask=mask)
    # hidden layers, last to first: g = dz(l) @ W_l, dz(l-1) = g * act'(h or z of layer l-1)
    for i in tl.static_range(L - 1):
        rn = tl.arange(0, PADS[L - i])
        rk = tl.arange(0, PADS[L - 1 - i])
        w = tl.load(ws[L - 1 - i] + (rn[:, None] * SIZES[L - 1 - i] + rk[None, :]),
                    mask=(rn[:, None] < SIZES[L - i]) & (rk[None, :] < SIZES[L - 1 - i]), other=0.0)
        g = _dot(dz, w, _zeros(BLOCK_M, PADS[L - 1 - i]), PRECISION)
        mask = row_mask & (rk[None, :] < SIZES[L - 1 - i])
        if ACT != NONE:
            if HID_FROM_Z:
                s = tl.load(z_ptr + m0 * ZW + (rm[:, None] * ZW + ZCOLS[L - 2 - i] + rk[None, :]), mask=mask,
                            other=0.0)
            else:
                s = tl.load(h_ptr + m0 * HW + (rm[:, None] * HW + HCOLS[L - 2 - i] + rk[None, :]), mask=mask,
                            other=0.0)
            g = _act_bwd(g, s.to(tl.float32), ACT, ALPHA)
        dz = _cast(g, dt)
        tl.store(dz_ptr + m0 * ZW + (rm[:, None] * ZW + ZCOLS[L - 2 - i] + rk[None, :]), dz, mask=mask)
    if NEED_DX:  # dx = dz(0) @ W0, in K0 chunks
        rn = tl.arange(0, PADS[1])
        rk = tl.arange(0, BLOCK_K)
        w_ptrs = ws[0] + (rn[:, None] * SIZES[0] + rk[None, :])
        dx_ptrs = dx_ptr + m0 * SIZES[0] + (rm[:, None] * SIZES[0] + rk[None, :])
        for k in range(0, tl.cdiv(SIZES[0], BLOCK_K)):  # new names: a loop-carried value keeps its type
            k_left = SIZES[0] - k * BLOCK_K
            w0 = tl.load(w_ptrs, mask=(rn[:, None] < SIZES[1]) & (rk[None, :] < k_left), other=0.0)
            dx = _dot(dz, w0, _zeros(BLOCK_M, BLOCK_K), PRECISION)
            tl.store(dx_ptrs, _cast(dx, dt), mask=row_mask & (rk[None, :] < k_left))
            w_ptrs += BLOCK_K
            dx_ptrs += BLOCK_K


# ---------------------------------------------------------------------------------------------------------
# Configs: BLOCK_M rows a program; BLOCK_K is the first layer's K chunk (and the dx chunk). Chosen without a GPU:
# the spill-free ones when tests/aot_compile.py compiles the benchmark MLPs (64->64x4->16, 32->128x4->3, gelu) for
# sm_80 and sm_90. Layers wider than 64 (a 128x128 weight tile, BLOCK_M x 128 accumulators) need smaller row
# blocks, fp32 (tf32) smaller still. Larger row blocks re-read the weights (from L2) less often: bench/NOTES.md.

def _cfg(bm, bk, warps, stages=2):
    return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


FWD_NARROW = [_cfg(128, 64, 8), _cfg(64, 64, 4), _cfg(64, 32, 4), _cfg(128, 32, 8)]
FWD_WIDE = [_cfg(64, 64, 4), _cfg(32, 64, 4)]  # 64x64 on 8 warps spills 76-102 LDL/STL under Triton 3.6 (GELU)
FWD_WIDE_FP32 = [_cfg(32, 64, 4), _cfg(16, 64, 4)]
BWD_NARROW = [_cfg(64, 64, 4), _cfg(128, 32, 8), _cfg(32, 64, 4)]
BWD_NARROW_FP32 = [_cfg(128, 32, 8), _cfg(32, 64, 4)]  # 64x64 on 4 warps spills in tf32 with the GELU derivative
BWD_WIDE = [_cfg(32, 64, 4), _cfg(16, 64, 4)]
BWD_WIDE_FP32 = [_cfg(16, 64, 4)]
# The layers' activations change the register allocation of these kernels, which run at the 255-register limit
# (the next layer's weight tile is loaded early): tests/aot_compile.py --acts all compiles every shipped config with
# each activation as hidden and last activation, in the benchmark MLPs on sm_80 and sm_90, with Triton 3.8 and with
# 3.6 (the target GPU machines'). The (config, dtype) pairs that spilled there (2-646 LDL/STL) are dropped when that
# activation is the hidden or the last one (for both 16-bit dtypes where one spilled): {(kind, wide, element bytes):
# {activation code: configs}}; where that drops every usual config, smaller row blocks take over (ACT_EXTRA):
# FWD_WIDE_SMALL (16 rows on 8 warps) for tanh, elu and selu in the wide forward, which hardswish must not take (58
# LDL/STL on sm_90); FWD_WIDE_K32 (16 rows, 32-wide K steps) where even that spills (selu in tf32 on sm_90 with
# 3.6); FWD_WIDE_K32_W4 (the same on 4 warps) for silu's wide tf32 forward, which spills in all of those with 3.6;
# FWD_NARROW_SMALL for mish's 64-wide forward in tf32, which spills in every usual config (3.8: three of them, 3.6:
# the fourth). Left as it is, on sm_80 with 3.6 only: mish's 128-wide tf32 forward (16x64 w4, 6 LDL/STL; every
# smaller config tried spills on one chip or the other with 3.6).
FWD_WIDE_SMALL = [_cfg(16, 64, 8)]
FWD_WIDE_K32 = [_cfg(16, 32, 8)]
FWD_WIDE_K32_W4 = [_cfg(16, 32, 4)]
FWD_NARROW_SMALL = [_cfg(32, 64, 4)]
_GELU, _GELU_TANH, _SILU, _TANH, _ELU, _HARDSWISH, _HARDSIGMOID, _MISH, _SELU = (
    act_args(n)[0] for n in ("gelu", "gelu_tanh", "silu", "tanh", "elu", "hardswish", "hardsigmoid", "mish", "selu"))
ACT_SPILLS = {
    ("fwd", True, 2): {_GELU_TANH: FWD_WIDE[1:], _SILU: FWD_WIDE[:1], _ELU: FWD_WIDE, _HARDSWISH: FWD_WIDE[1:],
                       _MISH: FWD_WIDE[:1], _SELU: FWD_WIDE},
    ("fwd", True, 4): {_GELU: FWD_WIDE_FP32[:1], _SILU: FWD_WIDE_FP32, _TANH: FWD_WIDE_FP32, _ELU: FWD_WIDE_FP32,
                       _HARDSWISH: FWD_WIDE_FP32[1:] + FWD_WIDE_SMALL, _HARDSIGMOID: FWD_WIDE_FP32[:1],
                       _MISH: FWD_WIDE_FP32[:1], _SELU: FWD_WIDE_FP32},
    ("fwd", False, 4): {_GELU_TANH: FWD_NARROW[1:2], _MISH: FWD_NARROW, _HARDSWISH: FWD_NARROW[1:2]},
    ("bwd", False, 2): {_MISH: BWD_NARROW[:1] + BWD_NARROW[2:]},
    ("bwd", False, 4): {_GELU_TANH: BWD_NARROW_FP32[:1], _MISH: BWD_NARROW_FP32[:1],
                        _HARDSWISH: BWD_NARROW_FP32[:1]},
}
ACT_EXTRA = {("fwd", True, 2): {_ELU: FWD_WIDE_SMALL, _SELU: FWD_WIDE_SMALL},
             ("fwd", True, 4): {_TANH: FWD_WIDE_SMALL, _ELU: FWD_WIDE_SMALL, _SELU: FWD_WIDE_K32,
                                _SILU: FWD_WIDE_K32_W4},
             ("fwd", False, 4): {_MISH: FWD_NARROW_SMALL}}
FWD_CONFIGS: List[triton.Config] = (FWD_NARROW + FWD_WIDE + FWD_WIDE_FP32 + FWD_WIDE_SMALL + FWD_WIDE_K32
                                    + FWD_NARROW_SMALL + FWD_WIDE_K32_W4)
BWD_CONFIGS: List[triton.Config] = BWD_NARROW + BWD_NARROW_FP32 + BWD_WIDE + BWD_WIDE_FP32
INTERPRET_CONFIG = _cfg(32, 32, 4, 1)


def configs_for(kind: str, pads: Sequence[int], elt_bytes: int, acts: Sequence[int] = ()) -> List[triton.Config]:
    """The configs that ship for a forward ("fwd") or backward ("bwd") kernel of an MLP with these padded
    sizes, this element size and these activation codes (hidden, last): the autotuner's pruning, and what
    tests/aot_compile.py compiles."""
    wide = max(pads[1:]) > 64
    if kind == "fwd":
        base = (FWD_WIDE_FP32 if elt_bytes == 4 else FWD_WIDE) if wide else FWD_NARROW
    elif wide:
        base = BWD_WIDE_FP32 if elt_bytes == 4 else BWD_WIDE
    else:
        base = BWD_NARROW_FP32 if elt_bytes == 4 else BWD_NARROW
    key = (kind, wide, elt_bytes)
    drop = [c for a in acts for c in ACT_SPILLS.get(key, {}).get(a, ())]
    extra = [c for a in dict.fromkeys(acts) for c in ACT_EXTRA.get(key, {}).get(a, ())]
    kept = [c for c in base + extra if not any(c is d for d in drop)]
    return kept or base[-1:]  # (a pair of activations that together spill everywhere: not one the tests compile)


def _prune(kind, ptr_arg):
    def prune(configs, named_args, **kwargs):
        return configs_for(kind, kwargs["PADS"], named_args[ptr_arg].element_size(),
                           (kwargs["ACT"], kwargs["LAST_ACT"]))
    return prune


_FWD_KEY = ["M", "SIZES", "ACT", "LAST_ACT", "SAVE_H", "SAVE_Z", "PRECISION"]
_BWD_KEY = ["M", "SIZES", "ACT", "LAST_ACT", "NEED_DX", "PRECISION"]
_mlp_fwd = Tuned(_mlp_fwd_kernel, FWD_CONFIGS, _FWD_KEY, _prune("fwd", "x_ptr"), INTERPRET_CONFIG)
_mlp_bwd = Tuned(_mlp_bwd_kernel, BWD_CONFIGS, _BWD_KEY, _prune("bwd", "g_ptr"), INTERPRET_CONFIG)


def supports(call, device) -> Optional[str]:
    """None if the fused kernels take this call (a registry.MLPCall), else why not."""
    return why_cannot(call.sizes)


def why_cannot(sizes: Sequence[int]) -> Optional[str]:
    """None if the fused kernels take an MLP with these layer sizes (input first), else why not."""
    if len(sizes) - 1 > MAX_LAYERS:
        return f"{len(sizes) - 1} layers: the fused MLP kernel takes at most {MAX_LAYERS}"
    if max(sizes[1:]) > MAX_WIDTH:
        return f"layer sizes {list(sizes[1:])}: the fused MLP kernel takes layers at most {MAX_WIDTH} wide"
    if sizes[0] > MAX_STRIDE:
        return (f"input width {sizes[0]}: the fused MLP kernel addresses a block of rows with 32-bit offsets (at "
                f"most {MAX_STRIDE} wide)")
    return None


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


class Plan:
    """Compile-time layout of one MLP: sizes, padded tile widths, and the column offsets of each layer in H/Z."""

    def __init__(self, sizes: Sequence[int]):
        self.sizes = tuple(int(s) for s in sizes)
        self.L = len(self.sizes) - 1
        self.pads = tuple(_pad(s) for s in self.sizes)
        hid = self.sizes[1:-1]
        self.hcols = tuple(sum(hid[:i]) for i in range(len(hid))) or (0,)
        self.hw = max(sum(hid), 1)
        outs = self.sizes[1:]
        self.zcols = tuple(sum(outs[:i]) for i in range(len(outs)))
        self.zw = sum(outs)

    def constexprs(self):
        return dict(SIZES=self.sizes, PADS=self.pads, L=self.L, HCOLS=self.hcols, HW=self.hw, ZCOLS=self.zcols,
                    ZW=self.zw)


_PLANS: Dict[tuple, Plan] = {}  # layer sizes -> Plan: made once per MLP (every launch needs one)
_backend.CACHES.append(_PLANS.clear)


def plan_of(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> Plan:
    """The Plan of the MLP that takes ``x`` (2-D) through ``weights``, kept per layer sizes."""
    sizes = [x.shape[1]]
    for w in weights:
        sizes.append(w.shape[0])
    sizes = tuple(sizes)
    plan = _PLANS.get(sizes)
    if plan is None:
        if len(_PLANS) >= _backend.MAX_DECISIONS:
            _PLANS.clear()
        plan = _PLANS[sizes] = Plan(sizes)
    return plan


def mlp_fwd(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
            activation: Optional[str], last_activation: Optional[str], save: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, H, Z) for 2-D x; H and Z are empty unless ``save`` (Z also unless an activation needs z)."""
    M = x.shape[0]
    plan = plan_of(x, weights)
    if max(x.stride(), default=0) > MAX_STRIDE:
        x = x.contiguous()
    ws = tuple([w.contiguous() for w in weights])
    bs = tuple([b.contiguous() if b is not None else w for b, w in zip(biases, ws)])
    y = x.new_empty((M, plan.sizes[-1]))
    save_z = save and saves_z(activation, last_activation)
    save_h = save and plan.L > 1
    h = x.new_empty((M, plan.hw)) if save_h else x.new_empty(0)
    z = x.new_empty((M, plan.zw)) if save_z else x.new_empty(0)
    if M == 0:
        return y, h, z
    args = (x, ws, bs, y, h if save_h else y, z if save_z else y, M, x.stride(0), x.stride(1))
    (act, alpha), (last, last_alpha) = act_args(activation), act_args(last_activation)
    kwargs = dict(plan.constexprs(), HAS_B=tuple([b is not None for b in biases]), ACT=act, ALPHA=alpha,
                  LAST_ACT=last, LAST_ALPHA=last_alpha, SAVE_H=save_h, SAVE_Z=save_z,
                  PRECISION=precision(x.dtype))
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _mlp_fwd(grid, args, kwargs)
    return y, h, z


def mlp_bwd(dy: torch.Tensor, x: torch.Tensor, weights: Sequence[torch.Tensor], y: torch.Tensor, h: torch.Tensor,
            z: torch.Tensor, activation: Optional[str], last_activation: Optional[str], need_dx: bool
            ) -> Tuple[Optional[torch.Tensor], List[torch.Tensor]]:
    """(dx or None, [dz of each layer]: column views of one DZ[M, sum of layer sizes]): the fused backward walk;
    weight gradients are the caller's GEMMs."""
    M = x.shape[0]
    plan = plan_of(x, weights)
    ws = tuple([w.contiguous() for w in weights])
    dy = dy.contiguous()
    dz = x.new_empty((M, plan.zw))
    dx = x.new_empty((M, plan.sizes[0])) if need_dx else None
    dzs = list(dz.split(plan.sizes[1:], 1))  # (one dispatch for all the column views)
    if M == 0:
        return dx, dzs
    from_z = z.numel() > 0
    args = (dy, y, ws, h if h.numel() else y, z if from_z else y, dz, dx if need_dx else dz, M, dy.stride(0))
    (act, alpha), (last, last_alpha) = act_args(activation), act_args(last_activation)
    kwargs = dict(plan.constexprs(), ACT=act, ALPHA=alpha, LAST_ACT=last, LAST_ALPHA=last_alpha,
                  HID_FROM_Z=from_z and act in PREACT_CODES, LAST_FROM_Z=from_z and last in PREACT_CODES,
                  NEED_DX=need_dx, PRECISION=precision(x.dtype))
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _mlp_bwd(grid, args, kwargs)
    return dx, dzs
