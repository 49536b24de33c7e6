"""Build pydlx (metadata: pyproject.toml; this file builds the C++/CUDA extension pydlx._C when it can).

    pip install .                           # pip's default build isolation: the pure-Python package (+ Triton);
                                            # pydlx._C is then built on first use on a CUDA machine (ninja, nvcc)
    bash scripts/build_wheel.sh             # the binary wheel: pydlx._C compiled in, for sm_80 and sm_90 + PTX
    pip install --no-build-isolation .      # in an environment with a CUDA build of torch and nvcc: pydlx._C built

pydlx._C is built when torch can be imported here (not under build isolation), is a CUDA build, and nvcc is found
(CUDA_HOME, else /usr/local/cuda); PYDLX_SKIP_CUDA_BUILD=1 skips it, PYDLX_REQUIRE_CUDA_BUILD=1 makes a build that
cannot compile it fail (scripts/build_wheel.sh). No hardware is probed: it is compiled for sm_80 and sm_90 plus PTX
(flags shared with the first-use build, pydlx/_ext.py). What was built, or why not, is printed (pip install -v
shows it) and recorded in the package as pydlx/_build.json, which pydlx.backends()["cuda"] reports. The extension
has no Python bindings (it registers torch ops), so the wheel is tagged py3-none-<platform>: one wheel for every
Python version.
"""
import importlib.util
import json
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel as _bdist_wheel
except ImportError:  # (setuptools < 70.1)
    from wheel.bdist_wheel import bdist_wheel as _bdist_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = {}  # what this build does about pydlx._C: written into the package as pydlx/_build.json


def _load_ext_module():
    spec = importlib.util.spec_from_file_location("_pydlx_ext", os.path.join(HERE, "pydlx", "_ext.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _skip(why: str):
    print(f"pydlx: built the Python package (Triton kernels included); NOT built: pydlx._C, {why}. It is built on "
          "first use on a CUDA machine with nvcc and ninja, or install the binary wheel (scripts/build_wheel.sh).")
    if os.environ.get("PYDLX_REQUIRE_CUDA_BUILD", "0") not in ("", "0"):
        raise SystemExit(f"pydlx: PYDLX_REQUIRE_CUDA_BUILD is set, but pydlx._C cannot be built: {why}")
    BUILD.update(extension=None, why=why)
    return [], {}


def _extensions():
    if os.environ.get("PYDLX_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return _skip("PYDLX_SKIP_CUDA_BUILD is set")
    try:
        ext = _load_ext_module()
    except ImportError as e:  # torch missing from the build environment (pip's build isolation)
        return _skip(f"torch is not importable in the build environment ({e}: pip's build isolation; "
                     "--no-build-isolation builds it against the installed torch)")
    reason = ext.why_cannot_build()
    if reason:
        return _skip(reason)
    os.environ.setdefault("CUDA_HOME", ext.find_cuda_home())
    import torch
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        cpp_extension.CUDA_HOME = ext.find_cuda_home()
    sources = [os.path.relpath(s, HERE) for s in ext.sources()]
    module = cpp_extension.CUDAExtension(
        "pydlx._C", sources, include_dirs=ext.include_dirs(),
        extra_compile_args={"cxx": ext.CXX_FLAGS, "nvcc": ext.NVCC_FLAGS})
    BUILD.update(extension="_C.so", archs=ext.archs(ext.NVCC_FLAGS), torch=torch.__version__,
                 cuda=torch.version.cuda, stable_abi=".".join(map(str, ext.STABLE_ABI_TARGET)))
    print(f"pydlx: building pydlx._C for {', '.join(BUILD['archs'])} with torch {torch.__version__} (CUDA "
          f"{torch.version.cuda}), on PyTorch's stable ABI: it loads under torch {BUILD['stable_abi']} and newer")
    # no Python ABI suffix: the library has no Python bindings and loads under any Python (torch.ops.load_library)
    return [module], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)}


class build_py(_build_py):
    """Also copy csrc/ into the package (pydlx/_csrc), so that an install without the prebuilt extension can still
    build it on first use (pydlx/_ext.py looks there when the checkout's csrc/ is not beside it), and write
    pydlx/_build.json (what this build did about pydlx._C)."""

    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "pydlx", "_csrc")
        os.makedirs(dest, exist_ok=True)
        for name in os.listdir(os.path.join(HERE, "csrc")):
            if name.endswith((".cu", ".cpp", ".h", ".cuh")):
                shutil.copy2(os.path.join(HERE, "csrc", name), dest)
        with open(os.path.join(self.build_lib, "pydlx", "_build.json"), "w") as f:
            json.dump(BUILD, f, indent=1)


class bdist_wheel(_bdist_wheel):
    """py3-none-<platform>: the extension is a plain shared library (no Python C API), one wheel for every Python."""

    def get_tag(self):
        python, abi, plat = super().get_tag()
        return ("py3", "none", plat) if self.distribution.has_ext_modules() else (python, abi, plat)


ext_modules, cmdclass = _extensions()
cmdclass.update(build_py=build_py, bdist_wheel=bdist_wheel)
setup(ext_modules=ext_modules, cmdclass=cmdclass)
