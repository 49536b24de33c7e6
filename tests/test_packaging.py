"""Installing pydlx: the wheel and sdist under pip's default build isolation, the binary wheel with pydlx._C compiled
in (installed into a fresh environment without nvcc), and the loader's behaviour when the binary is missing,
mismatched or corrupt, or when a first-use build hangs on a lock: ``import pydlx`` always works, the cuda backend
says why it is unavailable, and nothing is compiled at import."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import pydlx
from pydlx import _backend, _ext, registry

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """The loader as in a fresh process, looking for the prebuilt extension in ``tmp_path`` (the package folder of
    an install)."""
    monkeypatch.setattr(_ext, "_PKG", str(tmp_path))
    monkeypatch.setattr(_ext, "_state", {"loaded": None, "error": None})
    return tmp_path


def _write_build_info(folder: Path, **info) -> None:
    (folder / "_build.json").write_text(json.dumps(dict({"extension": "_C.so", "archs": ["sm_80", "sm_90"],
                                                         "torch": torch.__version__, "cuda": "13.0",
                                                         "stable_abi": "2.11"}, **info)))


def test_a_corrupt_prebuilt_extension_warns_once_and_the_cuda_backend_says_why(fresh_loader):
    (fresh_loader / "_C.so").write_bytes(b"not an ELF file")
    _write_build_info(fresh_loader)
    with pytest.warns(RuntimeWarning, match=r"_C.so is not used: it cannot be loaded .*Fix: reinstall the pydlx "):
        assert _ext.load() is False
    assert _ext.load() is False  # (once: the failure is kept)
    assert _ext.status().startswith("not built: RuntimeError: the prebuilt")
    why = registry.BACKENDS["cuda"].why_not_on(torch.device("cuda", 0))
    assert why.startswith("the C++/CUDA extension pydlx._C is unavailable: not built: RuntimeError: the prebuilt")
    with pydlx.use_backend("cuda"), pytest.raises(pydlx.BackendUnavailableError, match="cannot be loaded"):
        _backend.decide("linear", torch.device("cuda", 0), registry.LinearCall(torch.float16, False, 8, 8, 8))


def test_a_prebuilt_extension_for_an_older_torch_or_abi_is_not_loaded(fresh_loader, monkeypatch):
    """The extension is on PyTorch's stable ABI: it loads under every torch from its target on, and is refused
    (with the reason) under an older one; one built by an older pydlx, without it, needs its exact torch."""
    (fresh_loader / "_C.so").write_bytes(b"\x7fELF, built elsewhere")
    _write_build_info(fresh_loader)
    monkeypatch.setattr(torch, "__version__", "2.10.0+cu128")
    with pytest.warns(RuntimeWarning, match=r"it needs torch 2.11 or newer \(PyTorch's stable ABI\), and this is "
                                            r"torch 2.10.0\+cu128"):
        assert _ext.load() is False
    assert _ext.why_cannot_build().startswith("torch 2.10.0+cu128 is older than torch 2.11")
    monkeypatch.undo()
    assert _ext.mismatch({"torch": "2.9.1+cu128", "archs": ["sm_90"]}).startswith(
        "it was built against torch 2.9.1+cu128 without the stable ABI")
    assert _ext.mismatch({"torch": "2.11.0", "stable_abi": "2.11"}) is None


def test_the_loader_reports_what_a_build_left_out(fresh_loader):
    (fresh_loader / "_build.json").write_text(json.dumps({"extension": None, "why": "PYDLX_SKIP_CUDA_BUILD is set"}))
    assert _ext.status().startswith("not built ahead of time (PYDLX_SKIP_CUDA_BUILD is set); ")
    _write_build_info(fresh_loader)
    (fresh_loader / "_C.so").write_bytes(b"")
    assert _ext.status() == (f"built ahead of time: sm_80, sm_90, built with torch {torch.__version__} (CUDA 13.0) "
                             "for torch >= 2.11; loaded on first use")


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text("")
    assert _ext.clear_stale_lock(str(tmp_path), older_than_s=60) is None and lock.exists()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert _ext.clear_stale_lock(str(tmp_path), older_than_s=60).startswith(str(lock))
    assert not lock.exists()


def test_a_first_use_build_waiting_on_a_lock_times_out_with_the_fix(tmp_path):
    assert _ext.why_cannot_build() is None, "the test suite builds pydlx._C (a CUDA build of torch and nvcc)"
    (tmp_path / "lock").write_text("")  # another build's (fresh: not stale)
    with pytest.raises(RuntimeError, match=r"did not finish in 8 s \(PYDLX_JIT_TIMEOUT\); if no other build is "
                                           r"running, delete .*lock"):
        _ext.jit_build(str(tmp_path), timeout=8)


def test_import_compiles_nothing_and_loads_no_extension():
    """``import pydlx`` (after torch, which runs ldconfig on import) starts no process (no compiler), loads no
    extension and imports none of the kernel modules (they load on first use)."""
    code = ("import subprocess, sys, torch\n"
            "def refuse(*a, **k): raise AssertionError(f'import pydlx started a process: {a}')\n"
            "subprocess.Popen = refuse\n"
            "import pydlx\n"
            "from pydlx import _ext\n"
            "assert _ext._state == {'loaded': None, 'error': None}, _ext._state\n"
            "kernels = [m for m in sys.modules if m.startswith(('pydlx.triton.', 'pydlx.cuda.'))]\n"
            "assert not kernels, kernels\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ----------------------------------------------------------------------------------------------- packages
def _pip(*args, cwd=ROOT, timeout=900, env=None):
    out = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, cwd=cwd,
                         timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_the_wheel_and_the_sdist_build_under_default_isolation(tmp_path):
    """pip's default build isolation (no torch in the build environment): the package builds and says what it did
    not build, and why; the sdist holds the extension's sources and builds the same way."""
    _pip("wheel", ".", "--no-deps", "-w", str(tmp_path / "w"))
    (wheel,) = (tmp_path / "w").glob("pydlx-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    info = json.loads(zipfile.ZipFile(wheel).read("pydlx/_build.json"))
    assert info["extension"] is None and "torch is not importable in the build environment" in info["why"]
    out = subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path / "s")], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (sdist,) = (tmp_path / "s").glob("pydlx-*.tar.gz")
    _pip("wheel", str(sdist), "--no-deps", "-w", str(tmp_path / "w2"))
    (wheel2,) = (tmp_path / "w2").glob("pydlx-*.whl")
    names = zipfile.ZipFile(wheel2).namelist()
    assert "pydlx/_csrc/linear.cu" in names and "pydlx/_build.json" in names


@pytest.mark.slow
def test_the_binary_wheel_installs_and_loads_without_a_compiler(tmp_path):
    """scripts/build_wheel.sh's wheel, installed into a fresh environment whose PATH has no nvcc (torch from this
    one): it imports, reports the architectures inside, and a corrupted pydlx._C still imports, with the
    warning."""
    assert _ext.why_cannot_build() is None, "the test suite builds pydlx._C (a CUDA build of torch and nvcc)"
    out = subprocess.run(["bash", "scripts/build_wheel.sh", str(tmp_path / "dist")], cwd=ROOT, capture_output=True,
                         text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("pydlx-*-py3-none-linux_*.whl")
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True, timeout=120)
    site = next(fresh.glob("lib/python*/site-packages"))
    torch_site = Path(torch.__file__).resolve().parent.parent
    (site / "torch_from_the_test_env.pth").write_text(str(torch_site) + "\n")  # (a plain path: no editable hooks)
    _pip("install", "--no-deps", "--no-compile", "--target", str(site), str(wheel))
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if not os.path.exists(os.path.join(p, "nvcc")) and "cuda" not in p.lower())
    code = ("import shutil, pydlx; from pydlx import _ext\n"
            "assert shutil.which('nvcc') is None\n"
            "print(pydlx.__file__); print(pydlx.backends()['cuda']); print(_ext.load())\n")
    py = str(fresh / "bin" / "python")
    run = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    where, cuda, loaded = run.stdout.splitlines()[:3]
    assert where.startswith(str(site))
    assert cuda == (f"built ahead of time: sm_80, sm_90, PTX compute_90, built with torch {torch.__version__} "
                    f"(CUDA {torch.version.cuda}) for torch >= 2.11; loaded on first use")
    assert loaded == "True"  # (the library loads and registers its ops: no GPU is needed for that)
    (site / "pydlx" / "_C.so").write_bytes(b"corrupted")
    run = subprocess.run([py, "-W", "always", "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[2] == "False"
    assert "_C.so is not used: it cannot be loaded" in run.stderr and "Fix: reinstall the pydlx binary" in run.stderr
