"""Every shipped Triton kernel config compiles for sm_80 and sm_90 without a GPU: no
local-memory spills, shared memory within the chip's limit, and tensor-core instructions in the SASS of the
fp16/bf16/tf32 GEMMs (HMMA on sm_80, HGMMA — wgmma — on sm_90; the fused MLP's row blocks under 64 rows use
HMMA on sm_90 as well). The compiling happens in tests/aot_compile.py,
run once in a subprocess (it needs TRITON_INTERPRET=0); each config is one test here."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aot_compile  # noqa: E402  (the case list only; compiling runs in the subprocess)

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aot_compile.py")
CASES = aot_compile.cases()


@pytest.fixture(scope="module")
def compiled():
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, SCRIPT, "--json"], capture_output=True, text=True, env=env, timeout=1200)
    assert out.returncode == 0, f"aot_compile.py failed:\n{out.stderr[-4000:]}"
    return json.loads(out.stdout)


def test_every_arch_and_dtype_keeps_configs():
    for kind in ("fwd", "dx", "dw", "mlpfwd-w64", "mlpbwd-w64", "mlpfwd-w128", "mlpbwd-w128", "crp", "lstm",
                 *aot_compile.CRP_VARIANTS, *aot_compile.UNPOOL_VARIANTS):
        for arch in aot_compile.ARCHS:
            for dname in aot_compile.DTYPES:
                if kind in aot_compile.CRP_VARIANTS and dname == "fp16":
                    continue  # the conv variants compile in bf16 and fp32 (fp16's code is bf16's)
                assert any(c[1] == kind and c[2] == arch and c[3] == dname for c in CASES), (kind, arch, dname)


def test_every_activation_is_compiled_on_both_archs_in_every_dtype():
    """Every activation of pydlx's table: gelu as each kernel's default variant, every other one as a variant of each
    Linear and MLP kernel on sm_80 and sm_90 (the configs that ship for it), every dtype for each across the kernels;
    the wide forward tiles for those that take them, where they ship (sm_90; relu is their default variant)."""
    from pydlx.activations import TABLE
    from pydlx.triton import linear as tri
    from pydlx.triton.common import act_args

    kinds = ("fwd", "dx", "dw", "mlpfwd-w64", "mlpbwd-w64", "mlpfwd-w128", "mlpbwd-w128")
    for spec in [a.name for a in TABLE if a.name != "gelu"]:
        name = aot_compile.act_name(spec)
        for arch in aot_compile.ARCHS:
            wide = spec in aot_compile.WIDE_VARIANT_ACTS and tri.configs_for(tri.FWD_CONFIGS_WIDE, 2, arch)
            for kind in kinds + (("fwdwide",) if wide else ()):
                assert any(c[1] == f"{kind}+{name}" and c[2] == arch for c in CASES), (spec, kind, arch)
        for dname in aot_compile.DTYPES:
            assert any(c[1].endswith(f"+{name}") and c[3] == dname for c in CASES), (spec, dname)
    assert {act_args(s)[0] for s in aot_compile.WIDE_VARIANT_ACTS} == set(tri.WIDE_ACTS) - {0, 1}


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in CASES])
def test_config_compiles_without_spills_on_tensor_cores(case, compiled):
    cid, variant, arch, dname, _ = case
    r = compiled[cid]
    assert "error" not in r, f"{cid}: {r.get('error')}"
    assert not r["spills"], f"{cid}: local-memory spills (LDL/STL in the SASS)"
    assert r["shared"] <= r["smem_limit"], f"{cid}: {r['shared']} B of shared memory > sm_{arch}'s {r['smem_limit']}"
    if variant in aot_compile.UNPOOL_VARIANTS:  # (elementwise: no GEMM, no tensor cores)
        return
    if arch == 90 and variant.startswith(("mlp", "crp", "lstm")) and int(cid.rsplit("-", 1)[1].split("x")[0]) < 64:
        # wgmma needs 64 rows a warpgroup: the small row blocks of the fused MLP, conv and LSTM kernels (the LSTM's
        # are batch rows, 16 or 32) run on mma.sync (HMMA) on sm_90 too
        assert r["hmma"] or r["hgmma"], f"{cid}: no tensor-core instruction in the SASS"
        return
    mma = "hgmma" if arch == 90 else "hmma"
    assert r[mma], f"{cid}: no {mma.upper()} tensor-core instruction in the SASS"


def test_configs_that_spill_with_an_activation_are_not_shipped_for_it():
    """pydlx/triton/{linear,mlp}.py's ACT_SPILLS (found by tests/aot_compile.py --acts all): dropped for that
    activation only, and every activation keeps at least one config for every kernel, dtype and arch."""
    from pydlx.activations import NONE_CODE, TABLE
    from pydlx.triton import linear as tri, mlp as tri_mlp

    for code in [NONE_CODE] + [a.code for a in TABLE]:
        for elt in (2, 4):
            for arch in aot_compile.ARCHS:
                for cfgs in (tri.FWD_CONFIGS, tri.BWD_CONFIGS):
                    ships = tri.configs_for(cfgs, elt, arch, code)
                    assert ships and not any(c is o for c in ships for o in tri.ACT_SPILLS.get((code, elt), ()))
            for sizes in aot_compile.MLP_SIZES.values():
                pads = tri_mlp.Plan(sizes).pads
                for kind in ("fwd", "bwd"):
                    ships = tri_mlp.configs_for(kind, pads, elt, (code, code))
                    spills = tri_mlp.ACT_SPILLS.get((kind, max(pads[1:]) > 64, elt), {}).get(code, ())
                    assert ships and not any(c is o for c in ships for o in spills), (code, elt, kind, sizes)
    assert tri_mlp.configs_for("fwd", (32, 128, 3), 4, (8, 8)) == tri_mlp.FWD_WIDE_SMALL
    codes = {a.name: a.code for a in TABLE}
    assert tri_mlp.configs_for("fwd", (32, 128, 3), 4, (codes["tanh"],) * 2) == tri_mlp.FWD_WIDE_SMALL
    assert tri_mlp.configs_for("fwd", (32, 128, 3), 4, (codes["silu"],) * 2) == tri_mlp.FWD_WIDE_K32_W4
    assert tri_mlp.configs_for("fwd", (32, 128, 3), 4, (codes["gelu"], 0)) == tri_mlp.FWD_WIDE_FP32[1:]
    assert tri_mlp.configs_for("fwd", (32, 128, 3), 4, (codes["relu"], 0)) == tri_mlp.FWD_WIDE_FP32  # the others'
    assert tri.configs_for(tri.FWD_CONFIGS_WIDE, 2, 80) == [] and tri.configs_for(tri.FWD_CONFIGS_WIDE, 2, 90)
