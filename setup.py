"""Build and install pydlx.

    pip install .                           # builds the CUDA extension pydlx._C when it can (see below)
    PYDLX_SKIP_CUDA_BUILD=1 pip install .   # pure Python + Triton; pydlx._C is then built on first use (ninja)

pydlx._C is built when torch is a CUDA build and nvcc is found (CUDA_HOME, else /usr/local/cuda). No hardware
is probed: it builds for sm_80 and sm_90 (flags shared with the JIT loader, pydlx/_ext.py). Building it needs
torch at build time, so install with ``--no-build-isolation`` into an environment that has torch.
"""
import importlib.util
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py as _build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_ext_module():
    spec = importlib.util.spec_from_file_location("_pydlx_ext", os.path.join(HERE, "pydlx", "_ext.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extensions():
    if os.environ.get("PYDLX_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        print("pydlx: PYDLX_SKIP_CUDA_BUILD is set: not building pydlx._C")
        return [], {}
    try:
        ext = _load_ext_module()
    except ImportError as e:  # torch missing from the build environment
        print(f"pydlx: not building pydlx._C ({e}); install with --no-build-isolation to build it")
        return [], {}
    reason = ext.why_cannot_build()
    if reason:
        print(f"pydlx: not building pydlx._C: {reason}")
        return [], {}
    os.environ.setdefault("CUDA_HOME", ext.find_cuda_home())
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        cpp_extension.CUDA_HOME = ext.find_cuda_home()
    sources = [os.path.relpath(s, HERE) for s in ext.sources()]
    module = cpp_extension.CUDAExtension(
        "pydlx._C", sources, include_dirs=ext.include_dirs(),
        extra_compile_args={"cxx": ext.CXX_FLAGS, "nvcc": ext.NVCC_FLAGS})
    return [module], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


class build_py(_build_py):
    """Also copy csrc/ into the package (pydlx/_csrc), so that an install without the prebuilt extension can
    still build it on first use (pydlx/_ext.py looks there when the checkout's csrc/ is not beside it)."""

    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "pydlx", "_csrc")
        os.makedirs(dest, exist_ok=True)
        for name in os.listdir(os.path.join(HERE, "csrc")):
            if name.endswith((".cu", ".cpp", ".h", ".cuh")):
                shutil.copy2(os.path.join(HERE, "csrc", name), dest)


def _version():
    scope = {}
    with open(os.path.join(HERE, "pydlx", "_version.py")) as f:
        exec(f.read(), scope)  # noqa: S102  (the package's own version file)
    return scope["__version__"]


ext_modules, cmdclass = _extensions()
cmdclass["build_py"] = build_py

setup(
    name="pydlx",
    version=_version(),
    description="Fused GPU kernels (Triton and C++/CUDA) for PyTorch CNN, LSTM and MLP layers",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pydlx", "pydlx.*"]),
    package_data={"pydlx": ["policies/*.json"]},  # the measured dispatch policies (pydlx/_policy.py)
    python_requires=">=3.10",
    # numpy: Triton's interpreter (TRITON_INTERPRET=1, the triton backend on CPU tensors) computes with it
    install_requires=["torch>=2.6", "triton>=3.2; platform_system=='Linux'", "ninja", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark", "matplotlib"],
                    "bench": ["pytest-benchmark", "matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
