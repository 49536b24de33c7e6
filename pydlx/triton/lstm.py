"""Triton kernels for one LSTM layer in one direction (pydlx/ops/lstm.py stacks layers and directions).

Math (torch.nn.LSTM's, gate order i, f, g, o):
    gates_t = G[t] + h_{t-1} @ W_hh^T            G = x @ W_ih^T + b_ih + b_hh for all steps: one GEMM (linear.py)
    i, f, o = sigmoid(.), g = tanh(.);  c_t = f c_{t-1} + i g;  h_t = o tanh(c_t)
Per-sequence lengths (packed input): a row whose sequence has ended (t >= len) keeps its h and c and outputs 0.
A reverse direction walks t = T-1 .. 0, so a sequence of length L starts at its own step L-1 from h0.

Buffers, time-major and contiguous: G [T, B, 4H] (input dtype); hs [T+1, B, H] (input dtype: h feeds the GEMMs)
and cs [T+1, B, H] (fp32 cell state); the forward direction reads h_{t-1} from slot t and writes slot t+1 (slot 0
is h0), the reverse one reads slot t+1 and writes slot t (slot T is h0). y [T, B, H] (0 past a sequence's end);
acts [T, B, 4H] fp32, the gate activations, saved for backward.

_lstm_fwd_kernel, two launch shapes of one kernel:
  * sequence: one program owns BLOCK_B batch rows and all hidden units and loops over every step in one launch;
    the h exchange between steps goes through hs (global memory, L1/L2-resident) behind a CTA barrier. When the
    whole of W_hh fits one tile set (H <= BLOCK_H, RESIDENT) it is loaded once and stays in registers for the whole
    sequence (H <= 32); otherwise it streams from L2 every step.
  * step: one launch per step, grid (batch tiles, hidden tiles), for large batch x hidden where the sequence
    launch would leave SMs idle. Launches are asynchronous (no host sync), so the host runs ahead of the GPU.
_lstm_bwd_kernel (sequence only): per step, phase 1 forms dz = d(pre-activation gates) from dh, dc and the saved
activations (fused pointwise gradients), phase 2 (after a CTA barrier) dh_{t-1} = dz @ W_hh. The weight gradients
are then GEMMs over all steps at once (ops/lstm.py): dW_ih = dz^T x, dW_hh = dz^T h_prev, db = sum dz, dx = dz W_ih.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import _cast, _dot, interp_bf16, precision


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _gate_acc(hs_ptr, w_ptr, rb, b_ok, rj, j_ok, prev_off, H, gate: tl.constexpr,
              BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    """h_prev[rb, :] @ W_hh[gate*H + rj, :]^T, fp32 [BLOCK_B, BLOCK_H]."""
    acc = tl.zeros((rb.shape[0], BLOCK_H), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < H
        h = tl.load(hs_ptr + prev_off + rb[:, None] * H + rk[None, :], mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + (gate * H + rj[None, :]) * H + rk[:, None], mask=k_ok[:, None] & j_ok[None, :],
                    other=0.0)
        acc = _dot(h, w, acc, PRECISION, INTERP_BF16)
    return acc


@triton.jit
def _lstm_fwd_kernel(
    g_ptr, w_ptr, hs_ptr, cs_ptr, y_ptr, a_ptr, len_ptr,
    T, B, H, t_first, n_steps,
    REVERSE: tl.constexpr, HAS_LEN: tl.constexpr, SAVE: tl.constexpr, ALL_HIDDEN: tl.constexpr,
    RESIDENT: tl.constexpr, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = rb < B
    if HAS_LEN:
        seq_len = tl.load(len_ptr + rb, mask=b_ok, other=0)
    else:
        seq_len = tl.zeros((BLOCK_B,), dtype=tl.int32) + T
    if ALL_HIDDEN:  # sequence launch: this program walks every hidden block
        j_first = 0
        j_step = BLOCK_H
    else:  # step launch: one hidden block a program
        j_first = tl.program_id(1) * BLOCK_H
        j_step = H
    BH = B * H
    if RESIDENT:  # all of W_hh in registers for the whole sequence (H <= BLOCK_H == BLOCK_K)
        rj0 = tl.arange(0, BLOCK_H)
        rk0 = tl.arange(0, BLOCK_K)
        wm = (rk0[:, None] < H) & (rj0[None, :] < H)
        w_i = tl.load(w_ptr + (0 * H + rj0[None, :]) * H + rk0[:, None], mask=wm, other=0.0)
        w_f = tl.load(w_ptr + (1 * H + rj0[None, :]) * H + rk0[:, None], mask=wm, other=0.0)
        w_g = tl.load(w_ptr + (2 * H + rj0[None, :]) * H + rk0[:, None], mask=wm, other=0.0)
        w_o = tl.load(w_ptr + (3 * H + rj0[None, :]) * H + rk0[:, None], mask=wm, other=0.0)
    for s in range(0, n_steps):
        step = t_first + s
        if REVERSE:
            t = T - 1 - step
            prev = t + 1
            cur = t
        else:
            t = step
            prev = t
            cur = t + 1
        active = (t < seq_len) & b_ok
        for j0 in range(j_first, H, j_step):
            rj = j0 + tl.arange(0, BLOCK_H)
            j_ok = rj < H
            if RESIDENT:
                rk = tl.arange(0, BLOCK_K)
                hp = tl.load(hs_ptr + prev * BH + rb[:, None] * H + rk[None, :],
                             mask=b_ok[:, None] & (rk[None, :] < H), other=0.0)
                zero = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                acc_i = _dot(hp, w_i, zero, PRECISION, INTERP_BF16)
                acc_f = _dot(hp, w_f, zero, PRECISION, INTERP_BF16)
                acc_g = _dot(hp, w_g, zero, PRECISION, INTERP_BF16)
                acc_o = _dot(hp, w_o, zero, PRECISION, INTERP_BF16)
            else:
                acc_i = _gate_acc(hs_ptr, w_ptr, rb, b_ok, rj, j_ok, prev * BH, H, 0, BLOCK_H, BLOCK_K, PRECISION,
                                  INTERP_BF16)
                acc_f = _gate_acc(hs_ptr, w_ptr, rb, b_ok, rj, j_ok, prev * BH, H, 1, BLOCK_H, BLOCK_K, PRECISION,
                                  INTERP_BF16)
                acc_g = _gate_acc(hs_ptr, w_ptr, rb, b_ok, rj, j_ok, prev * BH, H, 2, BLOCK_H, BLOCK_K, PRECISION,
                                  INTERP_BF16)
                acc_o = _gate_acc(hs_ptr, w_ptr, rb, b_ok, rj, j_ok, prev * BH, H, 3, BLOCK_H, BLOCK_K, PRECISION,
                                  INTERP_BF16)
            m = b_ok[:, None] & j_ok[None, :]
            g_row = g_ptr + t * (4 * BH) + rb[:, None] * (4 * H) + rj[None, :]
            gi = _sigmoid(acc_i + tl.load(g_row, mask=m, other=0.0).to(tl.float32))
            gf = _sigmoid(acc_f + tl.load(g_row + H, mask=m, other=0.0).to(tl.float32))
            gg = _tanh(acc_g + tl.load(g_row + 2 * H, mask=m, other=0.0).to(tl.float32))
            go = _sigmoid(acc_o + tl.load(g_row + 3 * H, mask=m, other=0.0).to(tl.float32))
            hc = rb[:, None] * H + rj[None, :]
            c_prev = tl.load(cs_ptr + prev * BH + hc, mask=m, other=0.0)
            c = gf * c_prev + gi * gg
            h = go * _tanh(c)
            on = active[:, None] & j_ok[None, :]
            h_prev = tl.load(hs_ptr + prev * BH + hc, mask=m, other=0.0)
            h_out = _cast(h, hs_ptr.dtype.element_ty, INTERP_BF16)
            tl.store(cs_ptr + cur * BH + hc, tl.where(on, c, c_prev), mask=m)
            tl.store(hs_ptr + cur * BH + hc, tl.where(on, h_out, h_prev), mask=m)
            tl.store(y_ptr + t * BH + hc, tl.where(on, h_out, 0.0), mask=m)
            if SAVE:
                a_row = a_ptr + t * (4 * BH) + rb[:, None] * (4 * H) + rj[None, :]
                tl.store(a_row, gi, mask=m)
                tl.store(a_row + H, gf, mask=m)
                tl.store(a_row + 2 * H, gg, mask=m)
                tl.store(a_row + 3 * H, go, mask=m)
        tl.debug_barrier()  # this step's h (hs[cur]) is read by every thread of the program in the next step


@triton.jit
def _lstm_bwd_kernel(
    dy_ptr, a_ptr, cs_ptr, w_ptr, dz_ptr, dh_ptr, dc_ptr, len_ptr,
    T, B, H,
    REVERSE: tl.constexpr, HAS_LEN: tl.constexpr, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dh_ptr/dc_ptr [B, H] fp32 hold dL/dh_n, dL/dc_n on entry and dL/dh0, dL/dc0 on exit; dz [T, B, 4H]."""
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = rb < B
    if HAS_LEN:
        seq_len = tl.load(len_ptr + rb, mask=b_ok, other=0)
    else:
        seq_len = tl.zeros((BLOCK_B,), dtype=tl.int32) + T
    BH = B * H
    for s in range(0, T):
        if REVERSE:  # the forward walked T-1 .. 0: backward walks 0 .. T-1
            t = s
            prev = t + 1
            cur = t
        else:
            t = T - 1 - s
            prev = t
            cur = t + 1
        active = (t < seq_len) & b_ok
        # phase 1: dz for every hidden block (pointwise); dc carried in place
        for j0 in range(0, H, BLOCK_H):
            rj = j0 + tl.arange(0, BLOCK_H)
            j_ok = rj < H
            m = b_ok[:, None] & j_ok[None, :]
            on = active[:, None] & j_ok[None, :]
            hc = rb[:, None] * H + rj[None, :]
            dh = tl.load(dh_ptr + hc, mask=m, other=0.0) + tl.load(dy_ptr + t * BH + hc, mask=on, other=0.0).to(
                tl.float32)
            dc = tl.load(dc_ptr + hc, mask=m, other=0.0)
            a_row = a_ptr + t * (4 * BH) + rb[:, None] * (4 * H) + rj[None, :]
            gi = tl.load(a_row, mask=m, other=0.0)
            gf = tl.load(a_row + H, mask=m, other=0.0)
            gg = tl.load(a_row + 2 * H, mask=m, other=0.0)
            go = tl.load(a_row + 3 * H, mask=m, other=0.0)
            c = tl.load(cs_ptr + cur * BH + hc, mask=m, other=0.0)
            c_prev = tl.load(cs_ptr + prev * BH + hc, mask=m, other=0.0)
            tc = _tanh(c)
            dc = dc + dh * go * (1.0 - tc * tc)
            dzi = dc * gg * gi * (1.0 - gi)
            dzf = dc * c_prev * gf * (1.0 - gf)
            dzg = dc * gi * (1.0 - gg * gg)
            dzo = dh * tc * go * (1.0 - go)
            tl.store(dc_ptr + hc, dc * gf, mask=on)  # rows past their end keep dc (and dh) unchanged
            z_row = dz_ptr + t * (4 * BH) + rb[:, None] * (4 * H) + rj[None, :]
            DT = dz_ptr.dtype.element_ty
            tl.store(z_row, _cast(tl.where(on, dzi, 0.0), DT, INTERP_BF16), mask=m)
            tl.store(z_row + H, _cast(tl.where(on, dzf, 0.0), DT, INTERP_BF16), mask=m)
            tl.store(z_row + 2 * H, _cast(tl.where(on, dzg, 0.0), DT, INTERP_BF16), mask=m)
            tl.store(z_row + 3 * H, _cast(tl.where(on, dzo, 0.0), DT, INTERP_BF16), mask=m)
        tl.debug_barrier()
        # phase 2: dh_{t-1} = dz_t @ W_hh (a GEMM over the 4H gate units) for the rows still running
        for j0 in range(0, H, BLOCK_H):
            rj = j0 + tl.arange(0, BLOCK_H)
            j_ok = rj < H
            acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            for k0 in range(0, 4 * H, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                k_ok = rk < 4 * H
                dz = tl.load(dz_ptr + t * (4 * BH) + rb[:, None] * (4 * H) + rk[None, :],
                             mask=b_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptr + rk[:, None] * H + rj[None, :], mask=k_ok[:, None] & j_ok[None, :], other=0.0)
                acc = _dot(dz, w, acc, PRECISION, INTERP_BF16)
            on = active[:, None] & j_ok[None, :]
            tl.store(dh_ptr + rb[:, None] * H + rj[None, :], acc, mask=on)
        tl.debug_barrier()


# Block sizes and warps: the choices that compile without register spills for sm_80 and sm_90 in every dtype
# (tests/aot_compile.py compiles each launch in LAUNCHES). 16 batch rows a program (32 spill with four live gate
# accumulators); W_hh stays in registers for the whole sequence up to H = 32 (at 64 the four resident gate tiles
# spill), larger layers stream it from L2 in 64-wide tiles.
BLOCK_B = 16
RESIDENT_MAX_H = 32


def _block_h(H: int) -> int:
    return 16 if H <= 16 else (32 if H <= 32 else 64)


def _warps(kind: str, block_h: int) -> int:
    return 4 if (kind == "bwd" and block_h == 32) else 8


# Every (kernel, BLOCK_H, sequence launch, weights resident, warps) that lstm_fwd / lstm_bwd can launch.
LAUNCHES = ([("fwd", bh, True, True, _warps("fwd", bh)) for bh in (16, 32)]
            + [("fwd", 64, True, False, _warps("fwd", 64)), ("fwd", 64, False, False, _warps("fwd", 64))]
            + [("bwd", bh, True, False, _warps("bwd", bh)) for bh in (16, 32, 64)])


def step_path(B: int, H: int) -> bool:
    """Whether the forward runs one launch per step (grid over batch and hidden tiles) rather than one sequence
    launch. Not yet measured on a GPU; the rule is bench/NOTES.md's estimate: a sequence program streams all of
    W_hh (8 H^2 bytes in 16-bit) through one SM every step, fine up to H = 128 (~128 KB, about a microsecond),
    while wider layers need the step launches' hidden tiles spread over many SMs. PYDLX_LSTM_PATH=step|sequence
    forces one."""
    forced = os.environ.get("PYDLX_LSTM_PATH", "")
    if forced in ("step", "sequence"):
        return forced == "step"
    return H > 128


def lstm_fwd(G: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
             lengths: Optional[torch.Tensor], reverse: bool, save: bool, path: Optional[str] = None
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, hs, cs, acts) for G [T, B, 4H] (x @ W_ih^T + b, contiguous), w_hh [4H, H], h0/c0 [B, H],
    lengths int32 [B] or None. path: "sequence", "step" or None (step_path's rule)."""
    T, B, H4 = G.shape
    H = H4 // 4
    dt = G.dtype
    hs = G.new_empty((T + 1, B, H))
    cs = torch.empty((T + 1, B, H), device=G.device, dtype=torch.float32)
    y = G.new_empty((T, B, H))
    acts = torch.empty((T, B, 4 * H), device=G.device, dtype=torch.float32) if save else cs.new_empty(0)
    first = T if reverse else 0
    hs[first].copy_(h0)
    cs[first].copy_(c0)
    if T == 0 or B == 0 or H == 0:
        return y, hs, cs, acts
    w_hh = w_hh.contiguous()
    BB, BH = BLOCK_B, _block_h(H)
    lens = lengths if lengths is not None else hs  # a valid pointer, never read without HAS_LEN
    common = dict(REVERSE=reverse, HAS_LEN=lengths is not None, SAVE=save, PRECISION=precision(dt),
                  INTERP_BF16=interp_bf16(dt), BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=BH, num_warps=_warps("fwd", BH))
    args = (G, w_hh, hs, cs, y, acts if save else cs, lens, T, B, H)
    if (path or ("step" if step_path(B, H) else "sequence")) == "step":
        grid = (triton.cdiv(B, BB), triton.cdiv(H, BH))
        for s in range(T):
            _lstm_fwd_kernel[grid](*args, s, 1, ALL_HIDDEN=False, RESIDENT=False, **common)
    else:
        _lstm_fwd_kernel[(triton.cdiv(B, BB), 1)](*args, 0, T, ALL_HIDDEN=True, RESIDENT=H <= RESIDENT_MAX_H,
                                                  **common)
    return y, hs, cs, acts


def lstm_bwd(dy: torch.Tensor, dh_n: torch.Tensor, dc_n: torch.Tensor, acts: torch.Tensor, cs: torch.Tensor,
             w_hh: torch.Tensor, lengths: Optional[torch.Tensor], reverse: bool
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz [T, B, 4H] in w_hh's dtype, dh0 fp32 [B, H], dc0 fp32 [B, H])."""
    T, B, H4 = acts.shape
    H = H4 // 4
    dz = w_hh.new_empty((T, B, 4 * H))
    dh = dh_n.to(torch.float32).contiguous().clone()
    dc = dc_n.to(torch.float32).contiguous().clone()
    if T == 0 or B == 0 or H == 0:
        return dz.zero_(), dh, dc
    BB, BH = BLOCK_B, _block_h(H)
    dt = w_hh.dtype
    _lstm_bwd_kernel[(triton.cdiv(B, BB),)](
        dy.contiguous(), acts, cs, w_hh.contiguous(), dz, dh, dc, lengths if lengths is not None else dh, T, B, H,
        REVERSE=reverse, HAS_LEN=lengths is not None, PRECISION=precision(dt), INTERP_BF16=interp_bf16(dt),
        BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=BH, num_warps=_warps("bwd", BH))
    return dz, dh, dc
