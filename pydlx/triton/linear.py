"""Triton kernels for Linear + activation: a GEMM with the bias and activation in its epilogue, and a
backward GEMM with the activation's derivative in its prologue.

Shapes (2-D; the op layer flattens leading dims):
  forward   x[M, K] @ w[N, K]^T + b[N] -> z[M, N];  y = act(z)
  backward  dz = dy * act'(saved)            (never written to memory: recomputed per tile)
            dx[M, K] = dz[M, N] @ w[N, K]    (_linear_bwd_kernel, A = dz)
            dw[N, K] = dz^T[N, M] @ x[M, K]  (_linear_bwd_kernel, A = dz^T, split over M, db = row sums of A)

Fused: bias, activation and the cast to the output dtype in the forward epilogue; the activation's
derivative in the backward prologue (dz is formed tile by tile from dy and the saved tensor, in both
backward GEMMs), and db as a by-product of the dw GEMM.

Stored for backward (chosen in pydlx/ops/linear.py, see saves_preact in pydlx/reference/linear.py): the
output y for relu, tanh, sigmoid, leaky_relu, elu, relu6, hardsigmoid and selu, whose derivatives are functions of y;
the pre-activation z for gelu, gelu_tanh, silu, hardswish and mish, written by the forward epilogue as a second
output. The activation is a code and a parameter (ACT, ALPHA: common.act_args). Recomputing z in backward would
cost a second forward GEMM; storing it costs one M×N write and read, which is cheaper at every shape benched.

Accumulation is fp32. fp32 inputs use tf32 tensor cores when torch.backends.cuda.matmul.allow_tf32 is set.
Under TRITON_INTERPRET=1, bf16 tiles are upcast to fp32 before tl.dot (the interpreter's bf16 dot is wrong)
and fp32 -> bf16 rounding is done by hand (the interpreter truncates): common.py's INTERPRETING, off on GPUs.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..reference.linear import activation_backward
from .common import (MAX_STRIDE, NONE, SMEM_LIMIT, _act_bwd, _act_fwd, _cast, _dot, Tuned, act_args, arch, cdiv,
                     precision)

@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row-tiles share their column tiles while those are in L2."""
    pid = tl.program_id(0).to(tl.int64)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    return pid_m, pid_n


@triton.jit
def _linear_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, z_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    ACT: tl.constexpr, ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_PREACT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # 64-bit scalar offsets to the tile, 32-bit offsets inside it (keeps the pointer tiles' registers low)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    m_left = (M - m0).to(tl.int32)
    n_left = (N - n0).to(tl.int32)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + m0 * stride_xm + (rm[:, None] * stride_xm + rk[None, :] * stride_xk)
    w_ptrs = w_ptr + n0 * stride_wn + (rk[:, None] * stride_wk + rn[None, :] * stride_wn)  # w^T tile [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=(rm[:, None] < m_left) & (rk[None, :] < k_left), other=0.0)
        b = tl.load(w_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < n_left), other=0.0)
        acc = _dot(a, b, acc, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + n0 + rn, mask=rn < n_left, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < m_left) & (rn[None, :] < n_left)
    tile = m0 * stride_ym + n0 * stride_yn  # 64-bit scalar
    offs = rm[:, None] * stride_ym + rn[None, :] * stride_yn  # 32-bit tile
    if SAVE_PREACT:  # z has y's shape and strides: one offset tile serves both stores
        tl.store(z_ptr + tile + offs, _cast(acc, z_ptr.dtype.element_ty), mask=mask)
    y = _act_fwd(acc, ACT, ALPHA)
    tl.store(y_ptr + tile + offs, _cast(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_bwd_kernel(
    g_ptr, s_ptr, b_ptr, c_ptr, db_ptr,
    M, N, K, K_PER_SPLIT,
    stride_gm, stride_gk, stride_bk, stride_bn,
    stride_cs, stride_cm, stride_cn,
    ACT: tl.constexpr, ALPHA: tl.constexpr, ROWSUM: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c[split, M, N] = sum over this split's K range of dact(g, s)[M, K] @ b[K, N].

    With ROWSUM, the programs of column tile 0 also write the row sums of dact(g, s) over their K range
    to db[split, M] (db for the dw GEMM, whose A rows are output features).
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1).to(tl.int64)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    k_lo = split * K_PER_SPLIT
    m_left = (M - m0).to(tl.int32)
    n_left = (N - n0).to(tl.int32)
    k_len = (tl.minimum(k_lo + K_PER_SPLIT, K) - k_lo).to(tl.int32)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # s has g's shape and strides: one offset tile serves both
    g_ptr += m0 * stride_gm + k_lo * stride_gk  # 64-bit scalar offsets to the tile
    s_ptr += m0 * stride_gm + k_lo * stride_gk
    a_offs = rm[:, None] * stride_gm + rk[None, :] * stride_gk  # 32-bit, advanced along K below
    b_ptrs = b_ptr + k_lo * stride_bk + n0 * stride_bn + (rk[:, None] * stride_bk + rn[None, :] * stride_bn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, tl.cdiv(k_len, BLOCK_K)):
        k_left = k_len - k * BLOCK_K
        a_mask = (rm[:, None] < m_left) & (rk[None, :] < k_left)
        a = tl.load(g_ptr + a_offs, mask=a_mask, other=0.0)
        if ACT != NONE:
            s = tl.load(s_ptr + a_offs, mask=a_mask, other=0.0).to(tl.float32)
            a = _cast(_act_bwd(a.to(tl.float32), s, ACT, ALPHA), g_ptr.dtype.element_ty)
        if ROWSUM:
            rowsum += tl.sum(a.to(tl.float32), axis=1)
        b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < n_left), other=0.0)
        acc = _dot(a, b, acc, PRECISION)
        a_offs += BLOCK_K * stride_gk
        b_ptrs += BLOCK_K * stride_bk
    c_tile = c_ptr + split * stride_cs + m0 * stride_cm + n0 * stride_cn
    tl.store(c_tile + (rm[:, None] * stride_cm + rn[None, :] * stride_cn), _cast(acc, c_ptr.dtype.element_ty),
             mask=(rm[:, None] < m_left) & (rn[None, :] < n_left))
    if ROWSUM:
        if pid_n == 0:
            tl.store(db_ptr + split * M + m0 + rm, rowsum, mask=rm < m_left)


# ---------------------------------------------------------------------------------------------------------
# Configs. Shipped lists are module-level: tests/aot_compile.py compiles every one for sm_80 and sm_90, as the
# runtime specialises it, and tests/test_kernels_compile.py requires no spills and tensor-core instructions.
# Chosen without a GPU (bench/NOTES.md): the usual Ampere/Hopper GEMM tiles, kept where the heaviest epilogue or
# prologue compiles without spills on both chips. Not yet pruned by GPU measurements.

def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


# Every activation: at most 64 fp32 accumulators a thread, so erf/sigmoid epilogues and the z store fit.
FWD_CONFIGS: List[triton.Config] = [
    _cfg(128, 128, 64, 8, 3), _cfg(128, 128, 32, 8, 4), _cfg(64, 128, 64, 8, 3), _cfg(128, 64, 64, 8, 3),
    _cfg(64, 128, 32, 4, 3), _cfg(128, 64, 32, 4, 3), _cfg(64, 64, 64, 4, 3), _cfg(64, 64, 32, 4, 4),
]
# Added for the cheap epilogues only (none, relu, leaky_relu, hardsigmoid, relu6: y saved, no z store): 128
# accumulators a thread spill under gelu/silu/tanh. sm_90 only: on sm_80 they spill in 16 bits with Triton 3.6
# (23-30 LDL/STL; not with 3.8).
FWD_CONFIGS_WIDE: List[triton.Config] = [_cfg(128, 256, 64, 8, 3), _cfg(256, 128, 64, 8, 3)]
WIDE_ACTS = tuple(act_args(spec)[0] for spec in (None, "relu", "leaky_relu", "hardsigmoid", "relu6"))
# The backward prologue (dy * act'(saved), in fp32) spills at 128x128 with 64-wide K steps, and on sm_80 (fp16,
# dw) even with 32-wide ones: those are sm_90 only.
BWD_SM90: List[triton.Config] = [_cfg(128, 128, 32, 8, 3), _cfg(128, 128, 32, 8, 4)]
BWD_CONFIGS: List[triton.Config] = BWD_SM90 + [_cfg(64, 128, 64, 8, 3), _cfg(64, 64, 32, 4, 4)]
SM90_ONLY: List[triton.Config] = FWD_CONFIGS_WIDE + BWD_SM90
# Configs that spill with one activation (tests/aot_compile.py --acts all, Triton 3.8 and 3.6: the tf32 dx GEMM on
# sm_80 with these derivatives, the 16-bit 64x64x32 forward on sm_80 with gelu_tanh's and silu's epilogues; 2-3
# LDL/STL), dropped for it: {(activation code, element bytes): configs}. Each keeps the other backward config.
_RELU, _GELU_TANH, _SILU, _HARDSWISH, _MISH = (act_args(n)[0]
                                               for n in ("relu", "gelu_tanh", "silu", "hardswish", "mish"))
ACT_SPILLS = {(_RELU, 4): BWD_CONFIGS[2:3], (_SILU, 4): BWD_CONFIGS[3:4], (_HARDSWISH, 4): BWD_CONFIGS[2:3],
              (_MISH, 4): BWD_CONFIGS[3:4], (_GELU_TANH, 2): FWD_CONFIGS[7:8], (_SILU, 2): FWD_CONFIGS[7:8]}
# Small tiles for the interpreter: masks and strides are exercised with a few programs.
INTERPRET_CONFIG = _cfg(32, 32, 32, 4, 1, group=2)



def smem_bytes(cfg: triton.Config, elt_bytes: int) -> int:
    """Shared memory of a config's software pipeline: A and B tiles times stages (exact for sm_90's kernels,
    an upper bound for sm_80's, as compiled by tests/aot_compile.py)."""
    kw = cfg.kwargs
    return (kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * elt_bytes * cfg.num_stages


def configs_for(configs: List[triton.Config], elt_bytes: int, arch: int, act: int = 0) -> List[triton.Config]:
    """The configs of a list that ship for this arch, element size and activation code."""
    spills = ACT_SPILLS.get((act, elt_bytes), ())
    return [c for c in configs if smem_bytes(c, elt_bytes) <= SMEM_LIMIT[arch]
            and (arch >= 90 or not any(c is o for o in SM90_ONLY)) and not any(c is o for o in spills)]


def _prune_fwd(configs, named_args, **kwargs):
    act = kwargs.get("ACT", named_args.get("ACT"))
    keep = [c for c in configs if c not in FWD_CONFIGS_WIDE or act in WIDE_ACTS]
    return configs_for(keep, named_args["x_ptr"].element_size(), arch(), act) or configs[-1:]


def _prune_bwd(configs, named_args, **kwargs):
    act = kwargs.get("ACT", named_args.get("ACT"))
    return configs_for(configs, named_args["g_ptr"].element_size(), arch(), act) or configs[-1:]


_linear_fwd = Tuned(_linear_fwd_kernel, FWD_CONFIGS + FWD_CONFIGS_WIDE,
                    ["M", "N", "K", "ACT", "SAVE_PREACT", "PRECISION"], _prune_fwd, INTERPRET_CONFIG)
_linear_bwd = Tuned(_linear_bwd_kernel, BWD_CONFIGS, ["M", "N", "K", "K_PER_SPLIT", "ACT", "ROWSUM", "PRECISION"],
                    _prune_bwd, INTERPRET_CONFIG)


def supports(call, device) -> Optional[str]:
    """None if the kernels can run this call (a registry.LinearCall), else why not: the feature counts are strides
    of the operands (MAX_STRIDE)."""
    if max(call.K, call.N) > MAX_STRIDE:
        return (f"in_features ({call.K}) and out_features ({call.N}) must be at most {MAX_STRIDE} "
                "for the triton backend (32-bit offsets inside a tile)")
    return None


def _small_strides(t: torch.Tensor) -> torch.Tensor:
    return t if max(t.stride(), default=0) <= MAX_STRIDE else t.contiguous()


def linear_fwd(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], activation: Optional[str],
               save_preact: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, z) = (act(x @ w^T + b), x @ w^T + b) for 2-D x; z is empty unless save_preact."""
    M, K = x.shape
    N = w.shape[0]
    x, w = _small_strides(x), _small_strides(w)
    b = b.contiguous() if b is not None else None  # the kernel reads the bias with unit stride
    y = x.new_empty((M, N))
    z = x.new_empty((M, N)) if save_preact else x.new_empty(0)
    if M == 0 or N == 0:
        return y, z
    zz = z if save_preact else y  # a valid pointer; never written without SAVE_PREACT
    args = (x, w, b if b is not None else y, y, zz, M, N, K,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1))
    act, alpha = act_args(activation)
    kwargs = dict(ACT=act, ALPHA=alpha, HAS_BIAS=b is not None, SAVE_PREACT=save_preact,
                  PRECISION=precision(x.dtype))
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _linear_fwd(grid, args, kwargs)
    return y, z


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_rows(out_rows: int, out_cols: int, red: int, device: torch.device) -> int:
    """Rows of the reduction each program of the dw GEMM takes, so that its few output tiles fill the GPU.

    dw is N x K (small) reduced over M (large): at 65536x256x256 it has 4 tiles of 128x128 for 132 SMs.
    Aim for one wave of programs (each split adds N*K fp32 partials written and read back: 33 splits at that
    shape are 17 MB of the ~120 MB the dw GEMM moves), each split at least 512 rows long. Not yet measured.
    """
    if device.type != "cuda":
        want = 2 if red >= 128 else 1  # the interpreter: exercise the split path on small shapes
    else:
        tiles = cdiv(out_rows, 128) * cdiv(out_cols, 128)
        want = max(1, min(_sm_count(device.index or 0) // tiles, red // 512, 64))
    rows = cdiv(cdiv(red, want), 64) * 64  # rows per split, a multiple of every BLOCK_K
    return min(rows, max_split_rows(out_rows))


def max_split_rows(row_stride: int) -> int:
    """The most reduction rows one program of the dw GEMM may walk: it advances a 32-bit offset into dy (rows
    ``row_stride`` elements apart) along its split, which must stay below 2^31 (a block past the end included)."""
    return max(64, ((2**31 - 1 - 256) // max(row_stride, 1) - 64) // 64 * 64)


def _gemm_dact(g, s, b, c, db, M, N, K, g_strides, b_strides, c_strides, k_per_split, act):
    """g and s share strides (the caller makes them contiguous); ``act`` is (ACT, ALPHA)."""
    args = (g, s, b, c, db if db is not None else c, M, N, K, k_per_split, *g_strides, *b_strides, *c_strides)
    kwargs = dict(ACT=act[0], ALPHA=act[1], ROWSUM=db is not None, PRECISION=precision(g.dtype))
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),  # noqa: E731
                         cdiv(K, k_per_split))
    _linear_bwd(grid, args, kwargs)


def linear_bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, saved: torch.Tensor,
               activation: Optional[str], has_bias: bool, need_dx: bool = True, need_dw: bool = True
               ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx, dw, db) for 2-D x; ``saved`` is z or y as the module docstring says."""
    M, K = x.shape
    N = w.shape[0]
    x, w = _small_strides(x), _small_strides(w)
    act = act_args(activation)
    dy = dy.contiguous()
    s = saved.contiguous() if act[0] != 0 else dy  # the kernel reads dy and saved with one set of strides
    dx = dw = db = None
    if need_dx:
        dx = x.new_empty((M, K))
        if M > 0 and K > 0 and N > 0:
            _gemm_dact(dy, s, w, dx, None, M, K, N, (dy.stride(0), dy.stride(1)),
                       (w.stride(0), w.stride(1)), (0, dx.stride(0), dx.stride(1)), N, act)
        else:  # an empty sum (N == 0), or nothing to write
            dx.zero_()
    if need_dw or has_bias:
        if M == 0 or N == 0:
            dw = w.new_zeros((N, K))
            db = w.new_zeros((N,)) if has_bias else None
        elif K == 0:  # no dw tile to carry db: the row sums of dy * act'(saved) directly
            dw = w.new_zeros((N, K))
            db = activation_backward(dy, s, activation).sum(0, dtype=torch.float32).to(w.dtype) if has_bias else None
        else:
            rows = split_rows(N, K, M, x.device)
            split = cdiv(M, rows)
            if split == 1:  # (the seed's sizes: dw and db written where they are returned, no reduction launch)
                dw = w.new_empty((N, K))
                c_strides = (0, dw.stride(0), dw.stride(1))
                dbs = torch.empty((N,), device=x.device, dtype=torch.float32) if has_bias else None
            else:
                ws = torch.empty((split, N, K), device=x.device, dtype=torch.float32)
                c_strides = (ws.stride(0), ws.stride(1), ws.stride(2))
                dbs = torch.empty((split, N), device=x.device, dtype=torch.float32) if has_bias else None
            _gemm_dact(dy, s, x, dw if split == 1 else ws, dbs, N, K, M, (dy.stride(1), dy.stride(0)),
                       (x.stride(0), x.stride(1)), c_strides, rows, act)
            if split > 1:
                dw = ws.sum(0).to(w.dtype)
            if has_bias:  # (fp32 row sums, rounded once to the weight's dtype)
                db = dbs if split == 1 else dbs.sum(0)
                db = db if db.dtype == w.dtype else db.to(w.dtype)
        if not need_dw:
            dw = None
    return dx, dw, db
