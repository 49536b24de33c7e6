"""Loader for the C++/CUDA extension ``pydlx._C`` (csrc/).

The extension is a plain shared library whose static initialisers register its ops with
``TORCH_LIBRARY_FRAGMENT`` / ``TORCH_LIBRARY_IMPL(pydlx, CUDA, ...)``; loading it is ``torch.ops.load_library``.
Where it comes from, in order:
  1. built ahead of time by ``pip install .`` (setup.py) next to this file as ``_C*.so``;
  2. built on first use with ninja (``torch.utils.cpp_extension.load``) when a CUDA device is present, torch is
     a CUDA build and nvcc is found (``CUDA_HOME``, else /usr/local/cuda), into $PYDLX_BUILD_DIR or
     ~/.cache/pydlx/torch<version>. Set PYDLX_NO_JIT=1 to forbid it.
``import pydlx`` never fails because of it; ``pydlx.backends()["cuda"]`` says why it is missing.
"""
from __future__ import annotations

import glob
import os
import shutil
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


# Flags shared with setup.py. sm_80 and sm_90 machine code, plus PTX for newer chips.
NVCC_FLAGS = ["-O3", "-lineinfo",
              "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
              "-gencode=arch=compute_90,code=compute_90"]
CXX_FLAGS = ["-O3"]  # the C++ standard is the one torch.utils.cpp_extension picks for this torch


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
    return ["-O3", "-lineinfo"] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in codes]


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
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (no CUDA headers/libraries)"
    if find_cuda_home() is None:
        return "nvcc not found (set CUDA_HOME)"
    return None


def default_build_dir() -> str:
    """Where first-use builds go: $PYDLX_BUILD_DIR, else ~/.cache/pydlx/torch<version>."""
    return os.environ.get("PYDLX_BUILD_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pydlx",
                                                             "torch" + torch.__version__)


def jit_build(build_dir: Optional[str] = None, verbose: bool = False) -> str:
    """Build the extension with ninja and load it; returns the path of the built library."""
    reason = why_cannot_build()
    if reason:
        raise RuntimeError(f"cannot build pydlx._C: {reason}")
    cuda_home = find_cuda_home()
    os.environ.setdefault("CUDA_HOME", cuda_home)
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:  # read at import time, before CUDA_HOME may have been set
        cpp_extension.CUDA_HOME = cuda_home
    build_dir = build_dir or default_build_dir()
    os.makedirs(build_dir, exist_ok=True)
    cpp_extension.load(name="pydlx_C", sources=sources(), extra_cflags=CXX_FLAGS, extra_cuda_cflags=nvcc_flags(),
                       extra_include_paths=include_dirs(), build_directory=build_dir, is_python_module=False,
                       verbose=verbose)
    path = os.path.join(build_dir, "pydlx_C.so")
    _state["loaded"] = f"JIT-built with ninja in {build_dir}"
    _state["error"] = None
    return path


def load() -> bool:
    """Load the extension if it is not loaded yet; True when its ops are registered."""
    if _state["loaded"]:
        return True
    if _state["error"]:
        return False
    prebuilt = sorted(glob.glob(os.path.join(_PKG, "_C*.so")))
    try:
        if prebuilt:
            torch.ops.load_library(prebuilt[0])
            _state["loaded"] = f"prebuilt {os.path.basename(prebuilt[0])}"
            return True
        if os.environ.get("PYDLX_NO_JIT", "0") not in ("", "0"):
            raise RuntimeError("not built ahead of time, and PYDLX_NO_JIT is set")
        if not torch.cuda.is_available():
            raise RuntimeError("not built ahead of time, and no CUDA device to build it for on first use")
        jit_build()
        return True
    except Exception as e:  # any build or load failure is reported through backends(), never at import
        _state["error"] = f"{type(e).__name__}: {e}"
        return False


def status() -> str:
    if _state["loaded"]:
        return f"available ({_state['loaded']})"
    if _state["error"]:
        return f"not built: {_state['error']}"
    if glob.glob(os.path.join(_PKG, "_C*.so")):
        return "built ahead of time, loaded on first use"
    reason = why_cannot_build()
    if reason:
        return f"not built: {reason}"
    if not torch.cuda.is_available():
        return "not built: no CUDA device (the extension is built on first use with ninja when one is present)"
    return "not built yet: built on first use with ninja"
