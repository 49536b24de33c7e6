"""Compile every shipped Triton kernel config for sm_80 and sm_90 ahead of time, without a GPU, and report
what the chip would get: registers, shared memory, spills and tensor-core instructions in the SASS.

    python tests/aot_compile.py            # a table
    python tests/aot_compile.py --json     # what tests/test_kernels_compile.py reads

    python tests/aot_compile.py --acts all # also every shipped config for each of VARIANT_ACTS (silu, ...)

Runs with TRITON_INTERPRET=0 (under the interpreter @triton.jit functions cannot be compiled), so the test suite
calls it in a subprocess. Each kernel is compiled in its heaviest variant: gelu with the pre-activation stored; in
backward, gelu's derivative from a saved tile (plus the db row sum in the dw GEMM). Every other activation
(VARIANT_ACTS) is compiled as variants "<variant>+<activation>" of the Linear and MLP kernels, with the
configs that ship for that activation (pydlx.triton.linear.ACT_SPILLS, pydlx.triton.mlp.ACT_SPILLS): by default (the
test suite) the first one, for each kernel and arch in one dtype (rotating over the three with the activation and
kernel, so that every dtype is compiled); ``--acts all`` compiles every shipped config in every dtype for each (run
when configs, kernels or activations change: bench/NOTES.md has the last run).
"""
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

if __name__ == "__main__":  # before triton is imported; a test that imports this module keeps its own
    os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pydlx.triton import linear as tri  # noqa: E402
from pydlx.triton import conv_relu_pool as tri_crp  # noqa: E402
from pydlx.triton import lstm as tri_lstm  # noqa: E402
from pydlx.triton import mlp as tri_mlp  # noqa: E402
from pydlx.triton.common import act_args  # noqa: E402
from pydlx.activations import NONE_CODE, TABLE, saves_preact  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ARCHS = (80, 90)
DTYPES = {"fp16": (torch.float16, "*fp16"), "bf16": (torch.bfloat16, "*bf16"), "tf32": (torch.float32, "*fp32")}

# Each kernel as the runtime specialises it for contiguous tensors at the benchmark shapes: unit strides become
# the constant 1, pointers and the other sizes/strides carry Triton's divisible-by-16 hint.
FWD_ARGS = dict(x_ptr="ptr", w_ptr="ptr", b_ptr="ptr", y_ptr="ptr", z_ptr="ptr", M="div16", N="div16", K="div16",
                stride_xm="div16", stride_xk=1, stride_wn="div16", stride_wk=1, stride_ym="div16", stride_yn=1)
VARIANTS = {
    # name: (kernel attribute, config list, {arg: "ptr" | "div16" | 1 | "fp32ptr"}, constexprs)
    "fwd": ("_linear_fwd_kernel", "FWD_CONFIGS", FWD_ARGS, dict(ACT=2, ALPHA=0.0, HAS_BIAS=True, SAVE_PREACT=True)),
    # the wide tiles ship for the cheap epilogues only (pydlx.triton.linear.WIDE_ACTS)
    "fwdwide": ("_linear_fwd_kernel", "FWD_CONFIGS_WIDE", FWD_ARGS,
                dict(ACT=1, ALPHA=0.0, HAS_BIAS=True, SAVE_PREACT=False)),
    "dx": ("_linear_bwd_kernel", "BWD_CONFIGS",  # dx = dact(dy, z) @ w
           dict(g_ptr="ptr", s_ptr="ptr", b_ptr="ptr", c_ptr="ptr", db_ptr="fp32ptr", M="div16", N="div16",
                K="div16", K_PER_SPLIT="div16", stride_gm="div16", stride_gk=1, stride_bk="div16", stride_bn=1,
                stride_cs="div16", stride_cm="div16", stride_cn=1),
           dict(ACT=2, ALPHA=0.0, ROWSUM=False)),
    "dw": ("_linear_bwd_kernel", "BWD_CONFIGS",  # dw = dact(dy, z)^T @ x, split over rows, db row sums
           dict(g_ptr="ptr", s_ptr="ptr", b_ptr="ptr", c_ptr="fp32ptr", db_ptr="fp32ptr", M="div16", N="div16",
                K="div16", K_PER_SPLIT="div16", stride_gm=1, stride_gk="div16", stride_bk="div16", stride_bn=1,
                stride_cs="div16", stride_cm="div16", stride_cn=1),
           dict(ACT=2, ALPHA=0.0, ROWSUM=True)),
}


# Every activation but gelu (the kernels' default variant above), from pydlx's activation table. gelu is not the
# heaviest everywhere (silu's MLP forward spills where gelu's does not), so each is compiled.
VARIANT_ACTS = tuple(a.name for a in TABLE if a.name != "gelu")
WIDE_VARIANT_ACTS = ("leaky_relu", "hardsigmoid", "relu6")


def act_name(spec):
    return spec.split("(")[0]


def act_constexprs(variant, spec):
    """The constexprs of a Linear kernel variant with activation ``spec``, as pydlx.triton.linear launches it."""
    act, alpha = act_args(spec)
    if variant.startswith("fwd"):
        return dict(ACT=act, ALPHA=alpha, HAS_BIAS=True, SAVE_PREACT=saves_preact(spec))
    return dict(ACT=act, ALPHA=alpha, ROWSUM=variant == "dw")


def cfg_id(cfg):
    k = cfg.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}w{cfg.num_warps}s{cfg.num_stages}"


# The fused MLP kernels, compiled for the benchmark MLPs: 64->64x4->16 and 32->128x4->3, with gelu
# hidden activations (z stored and read back: the heaviest variant).
MLP_SIZES = {"w64": (64, 64, 64, 64, 64, 16), "w128": (32, 128, 128, 128, 128, 3)}


def mlp_cfg_id(cfg):
    return f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_K']}w{cfg.num_warps}s{cfg.num_stages}"


def _compiled_here(acts, spec, kernel, dname, dnames=tuple(DTYPES)):
    """Whether the activation ``spec`` is compiled for this kernel in this dtype (see the module docstring);
    ``dnames``: the dtypes the kernel ships configs for on this arch (the rotation's choices)."""
    if acts == "all":
        return True
    if dname not in dnames:
        return False
    k = (VARIANT_ACTS.index(spec) + KERNELS.index(kernel)) % len(dnames)
    return dnames[k] == dname


KERNELS = ("fwd", "fwdwide", "dx", "dw", "mlpfwd-w64", "mlpbwd-w64", "mlpfwd-w128", "mlpbwd-w128")


def cases(acts="ci"):
    """(case id, variant, arch, dtype name, config index) for every shipped config that fits each arch; for the new
    activations (variant "<variant>+<activation>") the configs that ship for each: ``acts="ci"`` the first one in one
    dtype per kernel and arch, ``acts="all"`` every one in every dtype."""
    out = []
    for arch in ARCHS:
        for dname, (dt, _) in DTYPES.items():
            for variant, (_, cfgs_name, _, _) in VARIANTS.items():
                cfgs = getattr(tri, cfgs_name)
                fits = tri.configs_for(cfgs, dt.itemsize, arch, VARIANTS[variant][3]["ACT"])
                for i, cfg in enumerate(cfgs):
                    if cfg in fits:
                        out.append((f"{variant}-sm{arch}-{dname}-{cfg_id(cfg)}", variant, arch, dname, i))
                shipping = tuple(d for d, (t, _) in DTYPES.items() if tri.configs_for(cfgs, t.itemsize, arch))
                for spec in (WIDE_VARIANT_ACTS if variant == "fwdwide" else VARIANT_ACTS):
                    if not _compiled_here(acts, spec, variant, dname, shipping):
                        continue
                    ships = tri.configs_for(cfgs, dt.itemsize, arch, act_args(spec)[0])  # (none: fp32 wide tiles)
                    v = f"{variant}+{act_name(spec)}"
                    for cfg in (ships if acts == "all" else ships[:1]):
                        i = next(j for j, c in enumerate(cfgs) if c is cfg)
                        out.append((f"{v}-sm{arch}-{dname}-{cfg_id(cfg)}", v, arch, dname, i))
            # the seed CNN's block in every dtype; the zoo's variants (padded 3/2 pool after a 7x7 stride-2 conv,
            # the ResNet stem; no pool, the pre-activation stored) in one 16-bit dtype and fp32
            for variant in ("crp",) + (tuple(CRP_VARIANTS) if dname != "fp16" else ()):
                P = CRP_VARIANTS.get(variant, {}).get("P", 2)
                for cfg in tri_crp.configs_for(dt.itemsize, P):
                    i = next(j for j, c in enumerate(tri_crp.FWD_CONFIGS) if c is cfg)
                    out.append((f"{variant}-sm{arch}-{dname}-{crp_cfg_id(cfg)}", variant, arch, dname, i))
            for variant in UNPOOL_VARIANTS:  # the conv block's backward with a pool: one config, no GEMM
                out.append((f"{variant}-sm{arch}-{dname}-{unpool_cfg_id()}", variant, arch, dname, 0))
            for net, sizes in MLP_SIZES.items():
                for kind, cfgs in (("mlpfwd", tri_mlp.FWD_CONFIGS), ("mlpbwd", tri_mlp.BWD_CONFIGS)):
                    ships = tri_mlp.configs_for(kind[3:], tri_mlp.Plan(sizes).pads, dt.itemsize,
                                                (act_args("gelu")[0], NONE_CODE))  # (the default variant's)
                    for cfg in ships:
                        i = next(j for j, c in enumerate(cfgs) if c is cfg)
                        out.append((f"{kind}-{net}-sm{arch}-{dname}-{mlp_cfg_id(cfg)}", f"{kind}-{net}", arch,
                                    dname, i))
                    for spec in VARIANT_ACTS:
                        if not _compiled_here(acts, spec, f"{kind}-{net}", dname):
                            continue
                        code = act_args(spec)[0]
                        ships = tri_mlp.configs_for(kind[3:], tri_mlp.Plan(sizes).pads, dt.itemsize, (code, code))
                        v = f"{kind}-{net}+{act_name(spec)}"
                        for cfg in (ships if acts == "all" else ships[:1]):
                            i = next(j for j, c in enumerate(cfgs) if c is cfg)
                            out.append((f"{v}-sm{arch}-{dname}-{mlp_cfg_id(cfg)}", v, arch, dname, i))
            for i, (kind, bh, seq, resident, proj, warps) in enumerate(tri_lstm.LAUNCHES):
                how = ("seq-resident" if resident else "seq") if seq else "step"
                name = f"lstm{kind}" + (f"-{how}" if kind == "fwd" else "") + ("-proj" if proj else "")
                out.append((f"{name}-sm{arch}-{dname}-{tri_lstm.BLOCK_B}x{bh}w{warps}", "lstm", arch, dname, i))
    return out


def _lstm_source(ptr, idx):
    """The LSTM kernels as lstm_fwd / lstm_bwd launch them, packed input (lengths), reverse direction."""
    kind, bh, seq, resident, proj, warps = tri_lstm.LAUNCHES[idx]
    f32, scalars = "*fp32", {n: "i32" for n in ("T", "B", "H", "P")}
    if kind == "fwd":
        fn = tri_lstm._lstm_fwd_kernel
        sig = {"g_ptr": ptr, "w_ptr": ptr, "wr_ptr": ptr, "hs_ptr": ptr, "cs_ptr": f32, "y_ptr": ptr, "a_ptr": f32,
               "r_ptr": ptr, "len_ptr": "*i32", **scalars, "t_first": "i32", "n_steps": "i32"}
        const = dict(SAVE=True, ALL_HIDDEN=seq, RESIDENT=resident)
    else:
        fn = tri_lstm._lstm_bwd_kernel
        sig = {"dy_ptr": ptr, "a_ptr": f32, "cs_ptr": f32, "w_ptr": ptr, "wr_ptr": ptr, "dz_ptr": ptr,
               "dh_ptr": f32, "dc_ptr": f32, "dht_ptr": ptr, "len_ptr": "*i32", **scalars}
        const = {}
    const.update(REVERSE=True, HAS_LEN=True, HAS_PROJ=proj, BLOCK_B=tri_lstm.BLOCK_B, BLOCK_H=bh, BLOCK_K=bh)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items() if t.startswith("*")}
    elt = {"*fp16": 2, "*bf16": 2, "*fp32": 4}[ptr]
    cfg = triton.Config({}, num_warps=warps, num_stages=tri_lstm.stages(elt, bh), maxnreg=tri_lstm.MAXNREG)
    return fn, cfg, sig, attrs, const


def crp_cfg_id(cfg):
    k = cfg.kwargs
    return f"{k['BLOCK_P']}x{k['BLOCK_K']}x{k['BLOCK_C']}w{cfg.num_warps}s{cfg.num_stages}"


# The conv kernel's variants besides the seed CNN's ("crp"): constexprs that change the generated code.
CRP_VARIANTS = {
    "crp-stem-pool3p1": dict(R=7, STRIDE=2, PAD=3, P=3, Q=2, PPAD=1, ACT=1, SAVE_Z=False),
    "crp-nopool-silu-z": dict(R=3, STRIDE=1, PAD=1, P=1, Q=1, PPAD=0, ACT=4, SAVE_Z=True),
    # the heaviest epilogue (mish: exp, two divisions) without a pool; a parametrised one (DCGAN's leaky_relu(0.2))
    "crp-nopool-mish-z": dict(R=1, STRIDE=1, PAD=0, P=1, Q=1, PPAD=0, ACT=act_args("mish")[0], SAVE_Z=True),
    "crp-pool2-leaky0.2": dict(R=3, STRIDE=1, PAD=1, P=2, Q=2, PPAD=0, ACT=act_args("leaky_relu")[0],
                               ALPHA=0.2, SAVE_Z=False),
    # the plain convolution (no activation, no pool): the training-mode Conv -> BatchNorm's conv, forward and recompute
    "crp-conv-only": dict(R=3, STRIDE=1, PAD=1, P=1, Q=1, PPAD=0, ACT=0, SAVE_Z=False),
    # the seed CNN's block in inference: no argmax written
    "crp-infer-noidx": dict(R=3, STRIDE=1, PAD=1, P=2, Q=2, PPAD=0, ACT=1, SAVE_Z=False, SAVE_IDX=False),
}


# The conv block's unpooling backward (pydlx.triton.conv_relu_pool._unpool_bwd_kernel): the seed CNN's 2/2 pool and
# the most gathers a position takes (a 3/1 pool: nine windows), with a derivative that multiplies (sigmoid).
UNPOOL_VARIANTS = {
    "unpool-pool2-relu": dict(P=2, Q=2, PPAD=0, ACT=act_args("relu")[0]),
    "unpool-pool3s1p1-sigmoid": dict(P=3, Q=1, PPAD=1, ACT=act_args("sigmoid")[0]),
}


def unpool_cfg_id():
    cfg = tri_crp.UNPOOL_CONFIG
    return f"{cfg.kwargs['BLOCK']}w{cfg.num_warps}"


def _unpool_source(ptr, variant):
    fn, cfg = tri_crp._unpool_bwd_kernel, tri_crp.UNPOOL_CONFIG
    sig = {"g_ptr": ptr, "y_ptr": ptr, "idx_ptr": "*i8", "dz_ptr": ptr,
           **{n: "i32" for n in ("K", "HO", "WO", "HP", "WP", "blocks", "stride_gn", "stride_gk", "stride_gh")}}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in ("g_ptr", "y_ptr", "idx_ptr", "dz_ptr")}
    const = dict(stride_gw=1, ALPHA=0.0, **UNPOOL_VARIANTS[variant])
    return fn, cfg, sig, attrs, const


def _crp_source(ptr, idx, variant="crp"):
    """The fused Conv+act(+MaxPool) forward: as the seed CNN's layers run it (3x3, pad 1, 2x2 pool, ReLU, NCHW), or
    one of CRP_VARIANTS."""
    fn, cfg = tri_crp._conv_relu_pool_fwd_kernel, tri_crp.FWD_CONFIGS[idx]
    sig = {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "y_ptr": ptr, "idx_ptr": "*i8", "z_ptr": ptr,
           **{n: "i32" for n in ("C", "H", "W", "K", "HO", "WO", "HP", "WP", "stride_xn", "stride_xc",
                                 "stride_xh")}}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in ("x_ptr", "w_ptr", "b_ptr", "y_ptr",
                                                                            "idx_ptr", "z_ptr", "stride_xn",
                                                                            "stride_xc")}
    const = dict(stride_xw=1, HAS_BIAS=True, ALPHA=0.0)
    const.update(CRP_VARIANTS.get(variant, dict(R=3, STRIDE=1, PAD=1, P=2, Q=2, PPAD=0, ACT=1, SAVE_Z=False)))
    const.setdefault("SAVE_IDX", const["P"] > 1)  # (training: the argmax written with a pool)
    return fn, cfg, sig, attrs, const


def _spec(variant):
    """The activation spec of a "<variant>+<activation>" case (None: the variant's own)."""
    name = variant.partition("+")[2]
    return next(s for s in VARIANT_ACTS if act_name(s) == name) if name else None


def _mlp_source(variant, ptr, idx):
    base, spec = variant.partition("+")[0], _spec(variant)
    kind, net = base.split("-")
    plan = tri_mlp.Plan(MLP_SIZES[net])
    tup = tuple([ptr] * plan.L)
    if kind == "mlpfwd":
        fn, cfg = tri_mlp._mlp_fwd_kernel, tri_mlp.FWD_CONFIGS[idx]
        sig = {"x_ptr": ptr, "ws": tup, "bs": tup, "y_ptr": ptr, "h_ptr": ptr, "z_ptr": ptr, "M": "i32",
               "stride_xm": "i32"}
        const = dict(stride_xk=1, HAS_B=(True,) * plan.L, ACT=2, ALPHA=0.0, LAST_ACT=0, LAST_ALPHA=0.0, SAVE_H=True,
                     SAVE_Z=True)
    else:
        fn, cfg = tri_mlp._mlp_bwd_kernel, tri_mlp.BWD_CONFIGS[idx]
        sig = {"g_ptr": ptr, "y_ptr": ptr, "ws": tup, "h_ptr": ptr, "z_ptr": ptr, "dz_ptr": ptr, "dx_ptr": ptr,
               "M": "i32", "stride_gm": "i32"}
        const = dict(ACT=2, ALPHA=0.0, LAST_ACT=0, LAST_ALPHA=0.0, HID_FROM_Z=True, LAST_FROM_Z=False,
                     NEED_DX=True)
    if spec is not None:  # the new activation hidden and last (z saved and read back where its derivative needs it)
        act, alpha = act_args(spec)
        pre = saves_preact(spec)
        const.update(ACT=act, ALPHA=alpha, LAST_ACT=act, LAST_ALPHA=alpha)
        const.update(dict(SAVE_Z=pre) if kind == "mlpfwd" else dict(HID_FROM_Z=pre, LAST_FROM_Z=pre))
    const.update(plan.constexprs())
    # pointers are 16-byte aligned at run time (tuple elements are addressed as (argument, element))
    attrs = {}
    for name, t in sig.items():
        i = fn.arg_names.index(name)
        if isinstance(t, tuple):
            attrs.update({(i, j): [["tt.divisibility", 16]] for j in range(len(t))})
        elif t.startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return fn, cfg, sig, attrs, const


def compile_one(case):
    cid, variant, arch, dname, idx = case
    ptr = DTYPES[dname][1]
    if variant.startswith("mlp"):
        fn, cfg, sig, attrs, const = _mlp_source(variant, ptr, idx)
    elif variant.startswith("crp"):
        fn, cfg, sig, attrs, const = _crp_source(ptr, idx, variant)
    elif variant.startswith("unpool"):
        fn, cfg, sig, attrs, const = _unpool_source(ptr, variant)
    elif variant == "lstm":
        fn, cfg, sig, attrs, const = _lstm_source(ptr, idx)
    else:
        base, spec = variant.partition("+")[0], _spec(variant)
        fn_name, cfgs_name, args, const = VARIANTS[base]
        fn, cfg = getattr(tri, fn_name), getattr(tri, cfgs_name)[idx]
        sig, attrs, const = {}, {}, dict(const) if spec is None else act_constexprs(base, spec)
        for name, kind in args.items():
            if kind == 1:
                const[name] = 1
                continue
            sig[name] = {"ptr": ptr, "fp32ptr": "*fp32", "div16": "i32"}[kind]
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    const.update(cfg.kwargs)
    if "PRECISION" in fn.arg_names:  # (the GEMM kernels')
        const["PRECISION"] = "tf32"
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const, attrs=attrs)
    try:
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                    **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {})})
    except Exception as e:  # reported per case: the test fails with the compiler's message
        return cid, {"error": f"{type(e).__name__}: {e}"[:2000]}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True).stdout
    regs = next((int(t.split(":")[1]) for t in usage.split() if t.startswith("REG:")), -1)
    return cid, {"arch": arch, "shared": k.metadata.shared, "smem_limit": tri.SMEM_LIMIT[arch], "regs": regs,
                 "spills": sass.count("LDL") + sass.count("STL"), "hmma": "HMMA" in sass, "hgmma": "HGMMA" in sass}


def main():
    all_cases = cases(sys.argv[sys.argv.index("--acts") + 1] if "--acts" in sys.argv else "ci")
    if "--only" in sys.argv:  # --only dx,lstm: the cases whose id starts with one of these (for development)
        want = sys.argv[sys.argv.index("--only") + 1].split(",")
        all_cases = [c for c in all_cases if c[0].startswith(tuple(want))]
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        results = dict(pool.map(compile_one, all_cases))
    if "--json" in sys.argv:
        print(json.dumps(results))
        return
    print(f"{'case':40s} {'regs':>5s} {'smem':>7s} spills tensor-cores")
    for cid, r in results.items():
        if "error" in r:
            print(f"{cid:40s} ERROR {r['error'][:80]}")
        else:
            mma = "HGMMA" if r["hgmma"] else ("HMMA" if r["hmma"] else "none")
            print(f"{cid:40s} {r['regs']:5d} {r['shared']:7d} {r['spills']:6d} {mma}")


if __name__ == "__main__":
    main()
