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

from .common import Tuned, _cast, _dot, _sigmoid, _tanh, cdiv, precision


@triton.jit
def _batch_rows(len_ptr, B, T, HAS_LEN: tl.constexpr, BLOCK_B: tl.constexpr):
    """This program's batch rows, their in-range mask and their sequence lengths (T without lengths)."""
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = rb < B
    if HAS_LEN:
        seq_len = tl.load(len_ptr + rb, mask=b_ok, other=0)
    else:
        seq_len = tl.zeros((BLOCK_B,), dtype=tl.int32) + T
    return rb, b_ok, seq_len


@triton.jit
def _slots(t, REVERSE: tl.constexpr):
    """(slot of h_{t-1}/c_{t-1}, slot of h_t/c_t) in hs/cs: forward reads t and writes t + 1 (slot 0 is the
    initial state); reverse reads t + 1 and writes t (slot T is the initial state)."""
    if REVERSE:
        return t + 1, t
    else:
        return t, t + 1


@triton.jit
def _rows_times(a_ptr, a_stride, rb, b_ok, K, w_ptr, w_k, w_n, rn, n_ok,
                BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """A[rb, :K] @ W[:K, rn] in fp32, [BLOCK_B, BLOCK_N]: A row-major with row stride a_stride, W's element (k, n)
    at w_ptr + k * w_k + n * w_n. Every GEMM of the recurrence is one of these."""
    acc = tl.zeros((rb.shape[0], rn.shape[0]), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = tl.load(a_ptr + rb[:, None] * a_stride + rk[None, :], mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rk[:, None] * w_k + rn[None, :] * w_n, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, w, acc, PRECISION)
    return acc


@triton.jit
def _lstm_fwd_kernel(
    g_ptr, w_ptr, wr_ptr, hs_ptr, cs_ptr, y_ptr, a_ptr, r_ptr, len_ptr,
    T, B, H, P, t_first, n_steps,
    REVERSE: tl.constexpr, HAS_LEN: tl.constexpr, SAVE: tl.constexpr, ALL_HIDDEN: tl.constexpr,
    RESIDENT: tl.constexpr, HAS_PROJ: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """P: the width of h (proj_size, or H without a projection); W_hh is [4H, P], hs and y hold P-wide rows.
    With HAS_PROJ (sequence launches only) the unprojected r = o * tanh(c) goes to r_ptr [T, B, H] first, then,
    after a barrier, h = r @ W_hr^T (W_hr [P, H]) is written."""
    rb, b_ok, seq_len = _batch_rows(len_ptr, B, T, HAS_LEN, BLOCK_B)
    if ALL_HIDDEN:  # sequence launch: this program walks every hidden block
        j_first = 0
        j_step = BLOCK_H
    else:  # step launch: one hidden block a program
        j_first = tl.program_id(1) * BLOCK_H
        j_step = H
    BH = B * H
    BP = B * P
    if RESIDENT:  # all of W_hh in registers for the whole sequence (P == H <= BLOCK_H == BLOCK_K)
        rj0 = tl.arange(0, BLOCK_H)
        rk0 = tl.arange(0, BLOCK_K)
        wm = (rk0[:, None] < H) & (rj0[None, :] < H)
        w_i = tl.load(w_ptr + (0 * H + rj0[None, :]) * H + rk0[:, None], mask=wm, other=0.0)
        w_f = tl.load(w_ptr + (1 * H + rj0[None, :]) * H + rk0[:, None], mask=wm, other=0.0)
        w_g = tl.load(w_ptr + (2 * H + rj0[None, :]) * H + rk0[:, None], mask=wm, other=0.0)
        w_o = tl.load(w_ptr + (3 * H + rj0[None, :]) * H + rk0[:, None], mask=wm, other=0.0)
    for s in range(0, n_steps):
        step = t_first + s
        t = tl.cast(T - 1 - step if REVERSE else step, tl.int64)  # t * (4 B H) passes 2^31 on long sequences
        prev, cur = _slots(t, REVERSE)
        active = (t < seq_len) & b_ok
        for j0 in range(j_first, H, j_step):
            rj = j0 + tl.arange(0, BLOCK_H)
            j_ok = rj < H
            if RESIDENT:
                rk = tl.arange(0, BLOCK_K)
                hp = tl.load(hs_ptr + prev * BP + rb[:, None] * P + rk[None, :],
                             mask=b_ok[:, None] & (rk[None, :] < P), other=0.0)
                zero = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                acc_i = _dot(hp, w_i, zero, PRECISION)
                acc_f = _dot(hp, w_f, zero, PRECISION)
                acc_g = _dot(hp, w_g, zero, PRECISION)
                acc_o = _dot(hp, w_o, zero, PRECISION)
            else:  # gate q's columns: W(k, j) = W_hh[q*H + j, k]
                h_prev_rows = hs_ptr + prev * BP
                acc_i = _rows_times(h_prev_rows, P, rb, b_ok, P, w_ptr, 1, P, rj, j_ok, BLOCK_K, PRECISION)
                acc_f = _rows_times(h_prev_rows, P, rb, b_ok, P, w_ptr + H * P, 1, P, rj, j_ok, BLOCK_K,
                                    PRECISION)
                acc_g = _rows_times(h_prev_rows, P, rb, b_ok, P, w_ptr + 2 * H * P, 1, P, rj, j_ok, BLOCK_K,
                                    PRECISION)
                acc_o = _rows_times(h_prev_rows, P, rb, b_ok, P, w_ptr + 3 * H * P, 1, P, rj, j_ok, BLOCK_K,
                                    PRECISION)
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
            tl.store(cs_ptr + cur * BH + hc, tl.where(on, c, c_prev), mask=m)
            if HAS_PROJ:
                tl.store(r_ptr + t * BH + hc, _cast(h, r_ptr.dtype.element_ty), mask=m)
            else:
                h_prev = tl.load(hs_ptr + prev * BH + hc, mask=m, other=0.0)
                h_out = _cast(h, hs_ptr.dtype.element_ty)
                tl.store(hs_ptr + cur * BH + hc, tl.where(on, h_out, h_prev), mask=m)
                tl.store(y_ptr + t * BH + hc, tl.where(on, h_out, 0.0), mask=m)
            if SAVE:
                a_row = a_ptr + t * (4 * BH) + rb[:, None] * (4 * H) + rj[None, :]
                tl.store(a_row, gi, mask=m)
                tl.store(a_row + H, gf, mask=m)
                tl.store(a_row + 2 * H, gg, mask=m)
                tl.store(a_row + 3 * H, go, mask=m)
        if HAS_PROJ:  # h = r @ W_hr^T once every unit of r is written: W(k, p) = W_hr[p, k]
            tl.debug_barrier()
            for p0 in range(0, P, BLOCK_H):
                rp = p0 + tl.arange(0, BLOCK_H)
                p_ok = rp < P
                hp_new = _rows_times(r_ptr + t * BH, H, rb, b_ok, H, wr_ptr, 1, H, rp, p_ok, BLOCK_K, PRECISION)
                mp = b_ok[:, None] & p_ok[None, :]
                onp = active[:, None] & p_ok[None, :]
                hpc = rb[:, None] * P + rp[None, :]
                h_prev = tl.load(hs_ptr + prev * BP + hpc, mask=mp, other=0.0)
                h_out = _cast(hp_new, hs_ptr.dtype.element_ty)
                tl.store(hs_ptr + cur * BP + hpc, tl.where(onp, h_out, h_prev), mask=mp)
                tl.store(y_ptr + t * BP + hpc, tl.where(onp, h_out, 0.0), mask=mp)
        tl.debug_barrier()  # this step's h (hs[cur]) is read by every thread of the program in the next step


@triton.jit
def _lstm_bwd_kernel(
    dy_ptr, a_ptr, cs_ptr, w_ptr, wr_ptr, dz_ptr, dh_ptr, dc_ptr, dht_ptr, len_ptr,
    T, B, H, P,
    REVERSE: tl.constexpr, HAS_LEN: tl.constexpr, HAS_PROJ: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dh_ptr [B, P] / dc_ptr [B, H] fp32 hold dL/dh_n, dL/dc_n on entry and dL/dh0, dL/dc0 on exit; dz [T, B, 4H].
    With HAS_PROJ, dht [T, B, P] receives dL/dh_t (0 past a sequence's end) for dW_hr, and the cell sees
    dL/dr = dL/dh_t @ W_hr."""
    rb, b_ok, seq_len = _batch_rows(len_ptr, B, T, HAS_LEN, BLOCK_B)
    BH = B * H
    BP = B * P
    for s in range(0, T):
        t = tl.cast(s if REVERSE else T - 1 - s, tl.int64)  # (a reverse forward walked T-1 .. 0)
        prev, cur = _slots(t, REVERSE)
        active = (t < seq_len) & b_ok
        if HAS_PROJ:  # phase 0: dL/dh_t for the projected rows
            for p0 in range(0, P, BLOCK_H):
                rp = p0 + tl.arange(0, BLOCK_H)
                p_ok = rp < P
                onp = active[:, None] & p_ok[None, :]
                hpc = rb[:, None] * P + rp[None, :]
                dht = tl.load(dh_ptr + hpc, mask=onp, other=0.0) + tl.load(dy_ptr + t * BP + hpc, mask=onp,
                                                                           other=0.0).to(tl.float32)
                tl.store(dht_ptr + t * BP + hpc, _cast(dht, dht_ptr.dtype.element_ty),
                         mask=b_ok[:, None] & p_ok[None, :])
            tl.debug_barrier()
        # phase 1: dz for every hidden block (pointwise); dc carried in place
        for j0 in range(0, H, BLOCK_H):
            rj = j0 + tl.arange(0, BLOCK_H)
            j_ok = rj < H
            m = b_ok[:, None] & j_ok[None, :]
            on = active[:, None] & j_ok[None, :]
            hc = rb[:, None] * H + rj[None, :]
            if HAS_PROJ:  # dL/dr = dL/dh_t @ W_hr: W(k, j) = W_hr[k, j]
                dh = _rows_times(dht_ptr + t * BP, P, rb, b_ok, P, wr_ptr, H, 1, rj, j_ok, BLOCK_K, PRECISION)
            else:
                dh = tl.load(dh_ptr + hc, mask=m, other=0.0) + tl.load(dy_ptr + t * BH + hc, mask=on,
                                                                       other=0.0).to(tl.float32)
            dc = tl.load(dc_ptr + hc, mask=m, other=0.0)
            a_row = a_ptr + t * (4 * BH) + rb[:, None] * (4 * H) + rj[None, :]
            gi = tl.load(a_row, mask=m, other=0.0)
            gf = tl.load(a_row + H, mask=m, other=0.0)
            gg = tl.load(a_row + 2 * H, mask=m, other=0.0)
            go = tl.load(a_row + 3 * H, mask=m, other=0.0)
            c = tl.load(cs_ptr + cur * BH + hc, mask=m, other=0.0)
            c_prev = tl.load(cs_ptr + prev * BH + hc, mask=m, other=0.0)
            tc = _tanh(c)
            dc = dc + dh * go * ((1.0 - tc) * (1.0 + tc))
            dzi = dc * gg * gi * (1.0 - gi)
            dzf = dc * c_prev * gf * (1.0 - gf)
            dzg = dc * gi * ((1.0 - gg) * (1.0 + gg))
            dzo = dh * tc * go * (1.0 - go)
            tl.store(dc_ptr + hc, dc * gf, mask=on)  # rows past their end keep dc (and dh) unchanged
            z_row = dz_ptr + t * (4 * BH) + rb[:, None] * (4 * H) + rj[None, :]
            DT = dz_ptr.dtype.element_ty
            tl.store(z_row, _cast(tl.where(on, dzi, 0.0), DT), mask=m)
            tl.store(z_row + H, _cast(tl.where(on, dzf, 0.0), DT), mask=m)
            tl.store(z_row + 2 * H, _cast(tl.where(on, dzg, 0.0), DT), mask=m)
            tl.store(z_row + 3 * H, _cast(tl.where(on, dzo, 0.0), DT), mask=m)
        tl.debug_barrier()
        # phase 2: dh_{t-1} = dz_t @ W_hh (a GEMM over the 4H gate units) for the rows still running:
        # W(k, p) = W_hh[k, p]
        for p0 in range(0, P, BLOCK_H):
            rp = p0 + tl.arange(0, BLOCK_H)
            p_ok = rp < P
            acc = _rows_times(dz_ptr + t * (4 * BH), 4 * H, rb, b_ok, 4 * H, w_ptr, P, 1, rp, p_ok, BLOCK_K,
                              PRECISION)
            tl.store(dh_ptr + rb[:, None] * P + rp[None, :], acc, mask=active[:, None] & p_ok[None, :])
        tl.debug_barrier()


# Block sizes, warps and stages: the choices that compile without register spills for sm_80 and sm_90 in every dtype
# (tests/aot_compile.py compiles each launch in LAUNCHES). 16 batch rows a program (32 spill with four live gate
# accumulators); W_hh stays in registers for the whole sequence up to H = 32 (at 64 the four resident gate tiles
# spill), larger layers stream it from L2 in 64-wide tiles.
BLOCK_B = 16
RESIDENT_MAX_H = 32


def _block_h(H: int) -> int:
    return 16 if H <= 16 else (32 if H <= 32 else 64)


def _warps(kind: str, block_h: int) -> int:
    return 4 if (kind == "bwd" and block_h == 32) else 8


# Registers a thread may use (.maxnreg), forward and backward: left to itself ptxas held some variants to fewer
# registers and spilled (Triton 3.8: the tf32 projection forward at BLOCK_H = 32 held to 80 after the accurate
# tanh; Triton 3.6, the GPU machines': the 4-warp backward at BLOCK_H = 32 held to 128 on sm_90); the launches have
# one program per 16 batch rows, so occupancy does not need the cap (tests/aot_compile.py, scripts/rehearse.sh).
MAXNREG = 255


def stages(elt_bytes: int, block_h: int) -> int:
    """Software-pipelining depth of the K loops: 3 for 16-bit; fp32 (tf32) tiles take twice the registers and
    spill when pipelined deeper than this (tests/aot_compile.py)."""
    if elt_bytes < 4:
        return 3
    return 2 if block_h == 16 else 1


def _cfg(warps: int, num_stages: int) -> triton.Config:
    return triton.Config({}, num_warps=warps, num_stages=num_stages, maxnreg=MAXNREG)


# One config a launch, picked by block width and element size (_warps, stages): the ones tests/aot_compile.py
# compiles spill-free. The launches go through the same Tuned rule as the other kernels (forced configs, the
# interpreter's, PYDLX_TRITON_AUTOTUNE); with one config kept there is nothing to benchmark.
_CONFIGS = {(w, st): _cfg(w, st) for w in (4, 8) for st in (1, 2, 3)}


def _prune(kind: str, ptr: str):
    def prune(configs, named_args, **kwargs):
        bh = kwargs["BLOCK_H"]
        return [_CONFIGS[(_warps(kind, bh), stages(named_args[ptr].element_size(), bh))]]
    return prune


# Every (kernel, BLOCK_H, sequence launch, weights resident, projection, warps) that lstm_fwd / lstm_bwd can
# launch. Streamed weights and step launches without a projection only happen with H > 64 (BLOCK_H = 64);
# projections stream at every BLOCK_H.
LAUNCHES = ([("fwd", bh, True, True, False, _warps("fwd", bh)) for bh in (16, 32)]
            + [("fwd", 64, True, False, False, _warps("fwd", 64)), ("fwd", 64, False, False, False, _warps("fwd", 64))]
            + [("fwd", bh, True, False, True, _warps("fwd", bh)) for bh in (16, 32, 64)]
            + [("bwd", bh, True, False, proj, _warps("bwd", bh)) for proj in (False, True) for bh in (16, 32, 64)])


_KEY = ["H", "P", "REVERSE", "HAS_LEN", "HAS_PROJ", "PRECISION", "BLOCK_H"]
_lstm_fwd = Tuned(_lstm_fwd_kernel, list(_CONFIGS.values()), _KEY + ["SAVE", "ALL_HIDDEN", "RESIDENT"],
                  _prune("fwd", "g_ptr"), _cfg(4, 1))
_lstm_bwd = Tuned(_lstm_bwd_kernel, list(_CONFIGS.values()), _KEY, _prune("bwd", "w_ptr"), _cfg(4, 1))


def supports(call, device) -> Optional[str]:
    """None if the kernels run this layer or cell (a registry.LSTMCall), else why not (``why_too_large``)."""
    return why_too_large(call.B, call.H, call.P)


def why_too_large(B: int, H: int, P: int) -> Optional[str]:
    """None if the kernels address a layer of this batch and width correctly, else why not. A step's offset
    (t * 4BH, t * BP) is 64-bit, the offsets inside a step 32-bit: one step of G / the gate activations (4 B H,
    padded to whole blocks) and W_hh (4 H P) must stay below 2^31 elements."""
    rows, cols = B + BLOCK_B, 4 * (max(H, P) + 64)
    if rows * cols >= 2**31 or 4 * H * P >= 2**31:
        return (f"batch {B} x 4 x hidden {H} (proj {P}) elements in one step: the Triton LSTM kernels address "
                "one step with 32-bit offsets (at most 2^31 elements)")
    return None


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
             lengths: Optional[torch.Tensor], reverse: bool, save: bool, path: Optional[str] = None,
             w_hr: Optional[torch.Tensor] = None
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, hs, cs, acts, rs) for G [T, B, 4H] (x @ W_ih^T + b, contiguous), w_hh [4H, P], h0 [B, P], c0 [B, H],
    lengths int32 [B] or None, w_hr [P, H] (a projection, proj_size = P) or None (P = H). rs [T, B, H] holds the
    unprojected o * tanh(c) with a projection (else empty). path: "sequence", "step" or None (step_path's rule;
    projections always take the sequence launch)."""
    T, B, H4 = G.shape
    H = H4 // 4
    P = w_hh.shape[1]
    proj = w_hr is not None
    dt = G.dtype
    hs = G.new_empty((T + 1, B, P))
    cs = torch.empty((T + 1, B, H), device=G.device, dtype=torch.float32)
    y = G.new_empty((T, B, P))
    acts = torch.empty((T, B, 4 * H), device=G.device, dtype=torch.float32) if save else cs.new_empty(0)
    rs = G.new_empty((T, B, H)) if proj else G.new_empty(0)
    first = T if reverse else 0
    hs[first].copy_(h0)
    cs[first].copy_(c0)
    if T == 0 or B == 0 or H == 0:
        return y, hs, cs, acts, rs
    w_hh = w_hh.contiguous()
    BB, BH = BLOCK_B, _block_h(H)
    lens = lengths if lengths is not None else hs  # a valid pointer, never read without HAS_LEN
    common = dict(REVERSE=reverse, HAS_LEN=lengths is not None, SAVE=save, HAS_PROJ=proj, PRECISION=precision(dt),
                  BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=BH)
    args = (G, w_hh, w_hr.contiguous() if proj else w_hh, hs, cs, y, acts if save else cs, rs if proj else cs, lens,
            T, B, H, P)
    if not proj and (path or ("step" if step_path(B, H) else "sequence")) == "step":
        grid = (cdiv(B, BB), cdiv(H, BH))
        for s in range(T):
            _lstm_fwd(grid, (*args, s, 1), dict(ALL_HIDDEN=False, RESIDENT=False, **common))
    else:
        resident = not proj and H <= RESIDENT_MAX_H
        _lstm_fwd((cdiv(B, BB), 1), (*args, 0, T), dict(ALL_HIDDEN=True, RESIDENT=resident, **common))
    return y, hs, cs, acts, rs


def lstm_bwd(dy: torch.Tensor, dh_n: torch.Tensor, dc_n: torch.Tensor, acts: torch.Tensor, cs: torch.Tensor,
             w_hh: torch.Tensor, lengths: Optional[torch.Tensor], reverse: bool, w_hr: Optional[torch.Tensor] = None
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz [T, B, 4H] in w_hh's dtype, dh0 fp32 [B, P], dc0 fp32 [B, H], dht [T, B, P]: dL/dh_t for dW_hr with a
    projection, else empty)."""
    T, B, H4 = acts.shape
    H = H4 // 4
    P = w_hh.shape[1]
    proj = w_hr is not None
    dz = w_hh.new_empty((T, B, 4 * H))
    dht = w_hh.new_empty((T, B, P)) if proj else w_hh.new_empty(0)
    dh = dh_n.to(torch.float32).contiguous().clone()
    dc = dc_n.to(torch.float32).contiguous().clone()
    if T == 0 or B == 0 or H == 0:
        return dz.zero_(), dh, dc, dht.zero_()
    BB, BH = BLOCK_B, _block_h(H)
    dt = w_hh.dtype
    _lstm_bwd((cdiv(B, BB),), (
        dy.contiguous(), acts, cs, w_hh.contiguous(), w_hr.contiguous() if proj else w_hh, dz, dh, dc,
        dht if proj else dh, lengths if lengths is not None else dh, T, B, H, P), dict(
        REVERSE=reverse, HAS_LEN=lengths is not None, HAS_PROJ=proj, PRECISION=precision(dt), BLOCK_B=BB,
        BLOCK_H=BH, BLOCK_K=BH))
    return dz, dh, dc, dht
