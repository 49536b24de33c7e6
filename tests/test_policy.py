"""The measured dispatch policy end to end on the CPU: synthetic benchmark CSVs and GPU test results in, a policy
file out (``python -m pydlx.bench --make-policy``), and ``auto``'s per-call choice on a faked GPU (its name and
compute capability, and backends that report themselves available), with the overrides and the wording of
``backends()`` and ``explain()``."""
import csv
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch
from torch import nn

import pydlx
from pydlx import _backend, _policy, registry
from pydlx.bench import CSV_COLUMNS
from pydlx.bench.__main__ import main as bench_main

GPU = "NVIDIA H100 80GB HBM3 (sm_90)"
DEV = torch.device("cuda", 0)  # (fake_gpu: no CUDA runtime is touched)


def row(family, op, shape, provider, mode, med, p20=None, p80=None, dtype="bf16", gpu=GPU):
    p20 = med * 0.97 if p20 is None else p20
    p80 = med * 1.03 if p80 is None else p80
    return {"family": family, "op": op, "provider": provider, "mode": mode, "dtype": dtype, "shape": shape,
            "median_ms": f"{med}", "p20_ms": f"{p20}", "p80_ms": f"{p80}", "gpu": gpu, "torch": "2.11.0",
            "triton": "3.6.0", "cuda": "13.0", "commit": "abc1234", "timestamp": "2026-11-28T00:00:00+00:00"}


def linear_rows():
    """linear_relu bf16 at three sizes, training (fwdbwd) and inference (fwd):
    256x256x256: triton 2x, cuda 3x (but cuda's GPU tests failed) -> triton;
    1024^3: triton 1.2x but its p80 above eager's median (within the spread) -> eager;
    4096^3: triton 1.5x -> triton; inference: triton loses everywhere -> eager."""
    rows = []
    for shape, eager, tri, cuda, tri_p80 in (("256x256x256", 1.0, 0.5, 0.33, None), ("1024x1024x1024", 1.0, 0.83,
                                                                                         None, 1.05),
                                             ("4096x4096x4096", 10.0, 6.6, None, None)):
        rows.append(row("linear", "linear_relu", shape, "eager", "fwdbwd", eager))
        rows.append(row("linear", "linear_relu", shape, "pydlx-triton", "fwdbwd", tri, p80=tri_p80))
        rows.append(row("linear", "linear_relu", shape, "pydlx", "fwdbwd", tri))  # auto: not used for the policy
        rows.append(row("linear", "linear_relu", shape, "compile", "fwdbwd", tri / 2))
        if cuda is not None:
            rows.append(row("linear", "linear_relu", shape, "pydlx-cuda", "fwdbwd", cuda))
        rows.append(row("linear", "linear_relu", shape, "eager", "fwd", eager / 3))
        rows.append(row("linear", "linear_relu", shape, "pydlx-triton", "fwd", eager / 2.5))
    return rows


PASSED = {"linear": {"triton"}, "mlp": {"triton", "cuda"}}


def test_policy_generation_from_benchmark_rows():
    policy = _policy.make_policy(linear_rows(), PASSED)
    assert (policy["device"], policy["capability"], policy["commit"]) == ("NVIDIA H100 80GB HBM3", "9.0", "abc1234")
    rules = {(r["mode"], r["shape"]): (r["backend"], r["ratio"]) for r in policy["rules"]}
    assert rules[("training", "256x256x256")] == ("triton", 2.0)  # cuda was faster, but its GPU tests failed
    assert rules[("training", "1024x1024x1024")][0] == "reference"  # a 1.2x win inside the spread is no win
    assert rules[("training", "4096x4096x4096")] == ("triton", pytest.approx(1.515, abs=1e-3))
    assert all(rules[("inference", s)][0] == "reference" for s in ("256x256x256", "1024x1024x1024", "4096x4096x4096"))
    # cuda eligible: it wins the small size
    rules = {(r["mode"], r["shape"]): r["backend"] for r in _policy.make_policy(
        linear_rows(), {"linear": {"triton", "cuda"}})["rules"]}
    assert rules[("training", "256x256x256")] == "cuda"
    # nothing passed its GPU tests: eager everywhere
    assert {r["backend"] for r in _policy.make_policy(linear_rows(), {})["rules"]} == {"reference"}


def test_policy_generation_ties_ops_dtypes_and_bad_input():
    rows = [row("linear", op, "512x512x512", p, "fwdbwd", m, dtype=dt) for dt in ("bf16", "fp32")
            for op, tri in (("linear_relu", 0.5), ("linear_gelu", 0.9 if dt == "fp32" else 0.6))
            for p, m in (("eager", 1.0), ("pydlx-triton", tri))]
    rules = {r["dtype"]: (r["backend"], r["ratio"]) for r in _policy.make_policy(rows, PASSED)["rules"]}
    # two ops at one size (linear_relu, linear_gelu) make one rule: here both pick triton, the smaller ratio kept
    # (fp32: gelu's 1.11x is a win, its p80 0.93 below eager's median); dtypes stay apart
    assert rules["bf16"] == ("triton", pytest.approx(1.667, abs=1e-3))
    assert rules["fp32"] == ("triton", pytest.approx(1.111, abs=1e-3))
    rows_disagree = [row("linear", op, "512x512x512", p, "fwdbwd", m) for op, tri in (("linear_relu", 0.5),
                                                                                      ("linear_gelu", 1.5))
                     for p, m in (("eager", 1.0), ("pydlx-triton", tri))]
    assert _policy.make_policy(rows_disagree, PASSED)["rules"][0]["backend"] == "reference"
    # exact tie between two eligible backends: the first of (triton, cuda)
    tie = [row("mlp", "mlp_64x4", "65536:64-64-64-64-64-16", p, "fwd", m)
           for p, m in (("eager", 1.0), ("pydlx-triton", 0.5), ("pydlx-cuda", 0.5))]
    assert _policy.make_policy(tie, PASSED)["rules"][0]["backend"] == "triton"
    with pytest.raises(ValueError, match="CPU rows"):
        _policy.make_policy([row("linear", "linear_relu", "8x8x8", "eager", "fwd", 1.0, gpu="cpu")], PASSED)
    with pytest.raises(ValueError, match="compute capability"):
        _policy.make_policy([row("linear", "linear_relu", "8x8x8", "eager", "fwd", 1.0, gpu="Some GPU")], PASSED)
    with pytest.raises(ValueError, match="no GPU rows"):
        _policy.make_policy([row("model", "cnn", "batch 256", "eager", "fwd", 1.0)], PASSED)


def test_passed_backends_from_junit(tmp_path):
    xml = tmp_path / "gpu.xml"
    xml.write_text("""<testsuites><testsuite>
<testcase classname="tests.test_linear" name="test_gpu_backends[37x70-relu-bf16-triton]"/>
<testcase classname="tests.test_linear" name="test_gpu_backends[37x70-relu-bf16-cuda]"><failure message="x"/></testcase>
<testcase classname="tests.test_linear" name="test_gpu_backends[1x1-relu-fp32-cuda]"/>
<testcase classname="tests.test_lstm" name="test_gpu_cuda_kernels[h768]"/>
<testcase classname="tests.test_lstm" name="test_gpu[packed-triton]"><skipped message="s"/></testcase>
<testcase classname="tests.test_mlp" name="test_reference_float64[triton]"/>
<testcase classname="tests.test_conv_relu_pool" name="test_gpu_every_config[64x32]"><properties>
<property name="pydlx_backend" value="triton"/></properties></testcase>
</testsuite></testsuites>""")
    assert _policy.passed_backends([xml]) == {"linear": {"triton"}, "lstm": {"cuda"}, "conv_relu_pool": {"triton"}}


def test_gpu_tests_record_their_backend_for_the_junit_report(tmp_path):
    """tests/conftest.py tags each GPU test with the backend it verifies, in the junit report the GPU check writes
    (skipped here without a GPU, the tags are there all the same)."""
    xml = tmp_path / "gpu.xml"
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                        os.path.join(here, "test_linear.py"), "-k", "backend_against_reference",
                        f"--junitxml={xml}"], capture_output=True, text=True, timeout=600, cwd=here)
    assert xml.exists(), r.stdout[-2000:] + r.stderr[-2000:]
    tags = {}
    for case in ET.parse(xml).iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        tags[case.get("name")] = props.get("pydlx_backend")
    assert tags and all(v == n.rsplit("-", 1)[1].rstrip("]") or (v is None and n.endswith("-reference]"))
                        for n, v in tags.items()), tags


def test_bucket_rule():
    p = _policy.Policy({"version": 1, "device": "G", "capability": "9.0", "commit": "c", "rules": [
        {"family": "linear", "dtype": "bf16", "mode": "training", "size": 1e6, "shape": "a", "backend": "triton",
         "ratio": 1.5},
        {"family": "linear", "dtype": "bf16", "mode": "training", "size": 1e8, "shape": "b", "backend": "triton",
         "ratio": 1.2},
        {"family": "linear", "dtype": "bf16", "mode": "training", "size": 1e10, "shape": "c", "backend": "reference",
         "ratio": 1.0}]})
    look = lambda size, **k: p.lookup("linear", k.get("dtype", "bf16"), k.get("mode", "training"), size)  # noqa
    assert look(1e8).shape == "b"  # measured
    assert look(3e6).backend == "triton" and look(3e6).shape == "a"  # between agreeing rules: the nearer (log)
    assert look(5e7).shape == "b"
    assert look(1e9).backend == "reference"  # between a triton and an eager rule: eager
    assert look(6e5).shape == "a" and look(4e5) is None  # below the range: within a factor of 2 only
    assert look(2e10).shape == "c" and look(3e10) is None  # above it likewise
    assert look(1e8, dtype="fp32") is None and look(1e8, mode="inference") is None  # kept apart
    assert look(0) is None


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device named like an H100 (sm_90) on which the triton and cuda backends report themselves
    available: enough for the dispatcher's choice (no kernel runs)."""
    for name in ("triton", "cuda"):
        monkeypatch.setattr(registry.BACKENDS[name], "why_not_on", lambda device: None)
    monkeypatch.setattr(_policy, "device_key", lambda device=None: ("NVIDIA H100 80GB HBM3", "9.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("PYDLX_POLICY", raising=False)
    monkeypatch.setattr(_policy, "_cache", {})


def _write_policy(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(_policy.make_policy(linear_rows(), PASSED)))
    return path


def test_auto_follows_the_policy_per_call_with_overrides(fake_gpu, tmp_path, monkeypatch):
    t = DEV
    small = registry.LinearCall(torch.bfloat16, True, 256, 256, 256)
    mid = registry.LinearCall(torch.bfloat16, True, 1024, 1024, 1024)
    infer = registry.LinearCall(torch.bfloat16, False, 256, 256, 256)
    conv = registry.ConvCall(torch.bfloat16, True, 8, 3, 32, 32, 16, 3, 1, 1, 2, 2, 0, False, "relu",
                             (3 * 32 * 32, 32 * 32, 32, 1))
    # no policy for this GPU: the unmeasured defaults (triton for linear, eager for conv)
    assert _backend.decide("linear", t, small) == ("triton", "triton: not measured on this GPU (default)")
    assert _backend.decide("conv_relu_pool", t, conv)[1] == "eager: not measured on this GPU"
    assert pydlx.backends()["policy"].startswith("none for NVIDIA H100 80GB HBM3 (sm_90)")
    path = _write_policy(tmp_path)
    with pydlx.use_policy(path):
        backend, why = _backend.decide("linear", t, small)
        assert backend == "triton" and why.startswith("triton: 2.00x eager on NVIDIA H100 80GB HBM3 (sm_90) at abc1234")
        assert _backend.decide("linear", t, mid)[0] == "reference"
        assert _backend.decide("linear", t, infer)[0] == "reference"
        assert pydlx.backends()["policy"].startswith("NVIDIA H100 80GB HBM3 (sm_90)")
        # a forced backend is not the policy's business
        with pydlx.use_backend("cuda"):
            assert _backend.decide("linear", t, mid)[0] == "cuda"
        with pydlx.use_policy("off"):
            assert _backend.decide("linear", t, mid)[0] == "triton"
            assert pydlx.backends()["policy"].startswith("off")
    monkeypatch.setenv("PYDLX_POLICY", str(path))
    assert _backend.decide("linear", t, mid)[0] == "reference"
    monkeypatch.setenv("PYDLX_POLICY", "off")
    assert _backend.decide("linear", t, mid)[0] == "triton"
    # the shipped file for the device, found by name and capability
    monkeypatch.delenv("PYDLX_POLICY")
    monkeypatch.setattr(_policy, "POLICY_DIR", tmp_path)
    monkeypatch.setattr(_policy, "_cache", {})  # (policies are read once per device)
    (tmp_path / _policy.file_name("NVIDIA H100 80GB HBM3", "9.0")).write_text(path.read_text())
    assert _backend.decide("linear", t, mid)[0] == "reference"


def test_a_policy_choice_the_backend_cannot_run_falls_through(fake_gpu, tmp_path, monkeypatch):
    monkeypatch.setattr(registry.BACKENDS["triton"], "why_not_on", lambda device: "triton is broken here")
    with pydlx.use_policy(_write_policy(tmp_path)):
        backend, _ = _backend.decide("linear", DEV, registry.LinearCall(torch.bfloat16, True, 256, 256, 256))
    assert backend == "cuda"  # linear's next default; never a backend that cannot run the call


def test_explain_says_what_auto_runs_here(fake_gpu, tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2)).bfloat16()
    auto = {b.modules: b.auto for b in pydlx.plan(model).fused}
    assert auto[("0",)] == ("auto on NVIDIA H100 80GB HBM3 (sm_90): triton (the unmeasured default): not measured on "
                            "this GPU (no measured policy for this GPU)")
    assert auto[("2",)].startswith("auto on NVIDIA H100 80GB HBM3 (sm_90): eager: not measured on this GPU")
    with pydlx.use_policy(_write_policy(tmp_path)):
        auto = {b.modules: b.auto for b in pydlx.plan(model).fused}
    assert auto[("0",)] == ("auto on NVIDIA H100 80GB HBM3 (sm_90): triton at 2 of 6 measured sizes (up to 2.00x eager "
                            "at 256x256x256, commit abc1234), eager at the others")


def test_make_policy_command(tmp_path, capsys):
    csv_path = tmp_path / "gpu.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(linear_rows())
    junit = tmp_path / "gpu.xml"
    junit.write_text('<testsuite><testcase classname="tests.test_linear" name="test_gpu_backends[a-triton]"/>'
                     '</testsuite>')
    assert bench_main(["--make-policy", str(csv_path), "--tests", str(junit), "--policy-dir", str(tmp_path)]) == 0
    written = _policy.load(tmp_path / "nvidia_h100_80gb_hbm3_sm90.json")
    assert written.lookup("linear", "bf16", "training", 256.0 ** 3).backend == "triton"
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_main(["--make-policy", str(csv_path)])  # --tests is required


def test_ops_import_no_backend_internals():
    """pydlx/ops/<family>.py holds schemas, fakes, autograd and checks; the implementations are reached through
    the registry (pydlx/registry.py implementation()), never imported or called directly."""
    import ast
    import pathlib

    ops = pathlib.Path(pydlx.__file__).parent / "ops"
    for path in sorted(ops.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = "." * node.level + (node.module or "")
                assert not mod.lstrip(".").startswith(("triton", "cuda", "_ext")), f"{path.name} imports {mod}"
                assert not mod.startswith(("pydlx.triton", "pydlx.cuda", "pydlx._ext")), f"{path.name}: {mod}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and \
                    getattr(node.value, "attr", "") == "pydlx" and node.attr.endswith("_cuda"):
                raise AssertionError(f"{path.name} calls torch.ops.pydlx.{node.attr} directly")


def test_a_new_policy_object_is_never_taken_for_a_freed_one(fake_gpu, tmp_path):
    """Kept decisions are keyed by the policy setting in force. A key holding a policy's id would let a later policy
    object, allocated at a freed one's address, find the freed one's decisions; each use_policy block's policy has
    a name never reused, and it is let go when the block ends (a server entering a block per request keeps none)."""
    import gc
    import weakref

    policy = _policy.load(_write_policy(tmp_path))
    alive = weakref.ref(policy)
    mid = registry.LinearCall(torch.bfloat16, True, 1024, 1024, 1024)
    with pydlx.use_policy(policy):
        assert _backend.decide("linear", DEV, mid)[0] == "reference"  # eager: the policy says so at this size
    del policy
    gc.collect()
    assert alive() is None  # kept decisions hold its name, not the policy
    for _ in range(3):  # (new objects, possibly at the freed one's address)
        with pydlx.use_policy(_policy.Policy(dict(_policy.load(tmp_path / "policy.json").data, rules=[]))):
            assert _backend.decide("linear", DEV, mid)[0] == "triton"  # no rule: the unmeasured default
