"""Loader for the C++/CUDA extension ``pydlx._C`` (csrc/).

The extension is a plain shared library whose static initialisers register its ops with
``TORCH_LIBRARY_FRAGMENT`` / ``TORCH_LIBRARY_IMPL(pydlx, CUDA, ...)``; loading it is ``torch.ops.load_library``.
Where it comes from, in order:
  1. built ahead of time (the binary wheel, scripts/build_wheel.sh, or ``pip install --no-build-isolation .``:
     setup.py) next to this file as ``_C.so``, with ``_build.json`` naming its architectures and the torch it was
     built against (``build_info``);
  2. built on first use with ninja (``torch.utils.cpp_extension.load``) when a CUDA device is present, torch is
     a CUDA build and nvcc is found (``CUDA_HOME``, else /usr/local/cuda), into $PYDLX_BUILD_DIR or
     ~/.cache/pydlx/torch<version>, in a child process bounded by $PYDLX_JIT_TIMEOUT seconds (default 1200); a
     lock left there by a build that died is removed once it is older than that. Set PYDLX_NO_JIT=1 to forbid it.
``import pydlx`` neither loads nor builds it, and never fails because of it. A missing, mismatched or corrupt
prebuilt ``_C`` warns once, when first needed, with the reason and the fix; ``auto`` then runs the other backends,
and a forced ``cuda`` backend raises BackendUnavailableError with the reason (``status``).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from typing import List, Optional

import torch

_PKG = os.path.dirname(os.path.abspath(__file__))
_state = {"loaded": None, "error": None}  # loaded: a description of what was loaded


def sources() -> List[str]:
    """The extension's sources: every .cu and .cpp file in the checkout's csrc/ (shared with setup.py), or in the
    copy that setup.py installs as pydlx/_csrc."""
    for root in (os.path.join(os.path.dirname(_PKG), "csrc"), os.path.join(_PKG, "_csrc")):
        found = sorted(glob.glob(os.path.join(root, "*.cu")) + glob.glob(os.path.join(root, "*.cpp")))
        if found:
            return found
    return []


# The extension uses PyTorch's stable C ABI only (csrc/torch_stable.h): built for this target, one build loads under
# every torch from it on, whichever torch's headers it was compiled with.
STABLE_ABI_TARGET = (2, 11)
_TARGET = f"-DTORCH_TARGET_VERSION=0x{STABLE_ABI_TARGET[0]:02X}{STABLE_ABI_TARGET[1]:02X}000000000000ULL"
# Flags shared with setup.py. sm_80 and sm_90 machine code, plus PTX for newer chips. USE_CUDA: the stable C shim's
# CUDA functions (the current stream).
COMMON_FLAGS = ["-O3", "-DUSE_CUDA", _TARGET]
NVCC_FLAGS = [*COMMON_FLAGS, "-lineinfo",
              "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
              "-gencode=arch=compute_90,code=compute_90"]
CXX_FLAGS = list(COMMON_FLAGS)  # the C++ standard is the one torch.utils.cpp_extension picks for this torch


def archs(flags: List[str]) -> List[str]:
    """The architectures nvcc ``flags`` compile for: "sm_80" (machine code), "PTX compute_90" (for newer chips)."""
    out = []
    for f in flags:
        m = re.fullmatch(r"-gencode=arch=compute_(\d+),code=(sm|compute)_(\d+)", f)
        if m:
            out.append(f"sm_{m.group(3)}" if m.group(2) == "sm" else f"PTX compute_{m.group(3)}")
    return out


def nvcc_flags() -> List[str]:
    """NVCC_FLAGS, or with PYDLX_CUDA_ARCHS (e.g. "90", "80,90", or "native": the current GPU's) machine code for
    those archs only: the GPU check builds for its own chip, about half the compile time of two archs."""
    archs = os.environ.get("PYDLX_CUDA_ARCHS", "").strip()
    if not archs:
        return list(NVCC_FLAGS)
    if archs == "native":
        major, minor = torch.cuda.get_device_capability()
        archs = f"{major}{minor}"
    codes = [a.strip().replace(".", "") for a in archs.split(",") if a.strip()]
    return [*COMMON_FLAGS, "-lineinfo"] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in codes]


def find_cuda_home() -> Optional[str]:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def include_dirs() -> List[str]:
    """Extra include dirs: the CUDA math-library headers that pip's CUDA wheels of torch ship."""
    dirs = []
    try:
        import nvidia  # namespace package of the nvidia-* wheels

        for base in nvidia.__path__:
            dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
    except ImportError:
        pass
    return dirs


def why_cannot_build() -> Optional[str]:
    if _older_than_target():
        return f"torch {torch.__version__} is older than {_target()}, the stable ABI the extension is written for"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (no CUDA headers/libraries)"
    if find_cuda_home() is None:
        return "nvcc not found (set CUDA_HOME)"
    return None


def default_build_dir() -> str:
    """Where first-use builds go: $PYDLX_BUILD_DIR, else ~/.cache/pydlx/torch<version>."""
    return os.environ.get("PYDLX_BUILD_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pydlx",
                                                             "torch" + torch.__version__)


JIT_TIMEOUT_S = 1200.0  # a first-use build's bound (PYDLX_JIT_TIMEOUT): 2 architectures take minutes on few cores


def jit_timeout() -> float:
    try:
        return float(os.environ.get("PYDLX_JIT_TIMEOUT") or JIT_TIMEOUT_S)
    except ValueError:
        return JIT_TIMEOUT_S


def clear_stale_lock(build_dir: str, older_than_s: float) -> Optional[str]:
    """Remove the lock torch's build leaves in ``build_dir`` while it runs when it is older than ``older_than_s``
    (no build still running holds it that long: its builder died); returns what was removed, or None. A build
    that finds the lock waits for it forever (pytorch/pytorch#189245)."""
    lock = os.path.join(build_dir, "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return None
    if age < older_than_s:
        return None
    try:
        os.remove(lock)
    except OSError:
        return None
    return f"{lock} ({age:.0f} s old)"


def jit_build(build_dir: Optional[str] = None, verbose: bool = False, timeout: Optional[float] = None) -> str:
    """Build the extension with ninja, in a child process bounded by ``timeout`` seconds (default: jit_timeout()),
    and load it; returns the path of the built library."""
    reason = why_cannot_build()
    if reason:
        raise RuntimeError(f"cannot build pydlx._C: {reason}")
    timeout = jit_timeout() if timeout is None else timeout
    build_dir = build_dir or default_build_dir()
    os.makedirs(build_dir, exist_ok=True)
    removed = clear_stale_lock(build_dir, timeout)
    if removed:
        warnings.warn(f"pydlx: removed the lock {removed} left by a build of pydlx._C that did not finish",
                      RuntimeWarning, stacklevel=2)
    env = dict(os.environ, CUDA_HOME=os.environ.get("CUDA_HOME") or find_cuda_home())
    code = ("import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('_pydlx_ext', sys.argv[1])\n"
            "ext = importlib.util.module_from_spec(spec); spec.loader.exec_module(ext)\n"
            "ext._build_here(sys.argv[2], sys.argv[3] == '1')\n")
    try:
        done = subprocess.run([sys.executable, "-c", code, os.path.abspath(__file__), build_dir,
                               "1" if verbose else "0"], env=env, timeout=timeout,
                              stdout=None if verbose else subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"building pydlx._C in {build_dir} did not finish in {timeout:.0f} s (PYDLX_JIT_TIMEOUT); "
                           f"if no other build is running, delete {os.path.join(build_dir, 'lock')}") from None
    if done.returncode != 0:
        raise RuntimeError(f"building pydlx._C in {build_dir} failed:\n{(done.stdout or '')[-3000:]}")
    path = os.path.join(build_dir, "pydlx_C.so")
    torch.ops.load_library(path)
    _state["loaded"] = f"JIT-built with ninja in {build_dir}"
    _state["error"] = None
    return path


def _build_here(build_dir: str, verbose: bool) -> None:
    """The child process of ``jit_build``."""
    cuda_home = find_cuda_home()
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:  # read at import time, before CUDA_HOME may have been set
        cpp_extension.CUDA_HOME = cuda_home
    cpp_extension.load(name="pydlx_C", sources=sources(), extra_cflags=CXX_FLAGS, extra_cuda_cflags=nvcc_flags(),
                       extra_include_paths=include_dirs(), build_directory=build_dir, is_python_module=False,
                       verbose=verbose)


def prebuilt() -> Optional[str]:
    """The extension built ahead of time next to this file, if any."""
    found = sorted(glob.glob(os.path.join(_PKG, "_C*.so")))
    return found[0] if found else None


def build_info() -> dict:
    """What setup.py recorded about the prebuilt extension (_build.json: its architectures, the torch and CUDA it
    was built against), or {}."""
    try:
        with open(os.path.join(_PKG, "_build.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _target() -> str:
    return "torch " + ".".join(map(str, STABLE_ABI_TARGET))


def _older_than_target() -> bool:
    try:
        return tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < STABLE_ABI_TARGET
    except ValueError:  # (an unparsable local build: let loading tell)
        return False


def mismatch(info: dict) -> Optional[str]:
    """Why a prebuilt extension cannot load under this torch, or None: it uses PyTorch's stable C ABI, so it loads
    under every torch from the target it was built for (``_build.json``'s "stable_abi") on."""
    built = info.get("torch")
    if "stable_abi" not in info and built and built.split("+")[0] != torch.__version__.split("+")[0]:
        return (f"it was built against torch {built} without the stable ABI (by an older pydlx), and this is torch "
                f"{torch.__version__}")
    if _older_than_target():
        return f"it needs {_target()} or newer (PyTorch's stable ABI), and this is torch {torch.__version__}"
    return None


def load() -> bool:
    """Load the extension if it is not loaded yet; True when its ops are registered."""
    if _state["loaded"]:
        return True
    if _state["error"]:
        return False
    path = prebuilt()
    try:
        if path:
            why = mismatch(build_info())
            if why is None:
                try:
                    torch.ops.load_library(path)
                except OSError as e:
                    why = f"it cannot be loaded ({str(e).splitlines()[0]})"
            if why is not None:
                raise RuntimeError(f"the prebuilt {path} is not used: {why}")
            _state["loaded"] = f"prebuilt {os.path.basename(path)}" + _describe(build_info())
            return True
        if os.environ.get("PYDLX_NO_JIT", "0") not in ("", "0"):
            raise RuntimeError("not built ahead of time, and PYDLX_NO_JIT is set")
        if not torch.cuda.is_available():
            raise RuntimeError("not built ahead of time, and no CUDA device to build it for on first use")
        jit_build()
        return True
    except Exception as e:  # any build or load failure is reported through backends(), never at import
        _state["error"] = f"{type(e).__name__}: {e}"
        if path:
            warnings.warn(f"pydlx: {e}. The cuda backend is unavailable (auto runs the others). Fix: reinstall the "
                          f"pydlx binary wheel (it needs {_target()} or newer), or build pydlx._C here: pip install "
                          "--no-build-isolation --force-reinstall --no-deps <pydlx source>", RuntimeWarning,
                          stacklevel=2)
        return False


def _describe(info: dict) -> str:
    if not info.get("archs"):
        return ""
    return (f": {', '.join(info['archs'])}, built with torch {info.get('torch')} (CUDA {info.get('cuda')}) for "
            f"torch >= {info.get('stable_abi', info.get('torch'))}")


def status() -> str:
    if _state["loaded"]:
        return f"available ({_state['loaded']})"
    if _state["error"]:
        return f"not built: {_state['error']}"
    if prebuilt():
        return "built ahead of time" + _describe(build_info()) + "; loaded on first use"
    info = build_info()
    if info.get("why"):
        return f"not built ahead of time ({info['why']}); " + (
            "built on first use with ninja" if why_cannot_build() is None and torch.cuda.is_available() else
            f"cannot be built here: {why_cannot_build() or 'no CUDA device'}")
    reason = why_cannot_build()
    if reason:
        return f"not built: {reason}"
    if not torch.cuda.is_available():
        return "not built: no CUDA device (the extension is built on first use with ninja when one is present)"
    return "not built yet: built on first use with ninja"
