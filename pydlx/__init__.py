"""pydlx: fused GPU kernels (Triton and C++/CUDA) for PyTorch's classic CNN, LSTM and MLP hot paths.

    import pydlx
    pydlx.backends()                  # what can run here, and why not
    y = pydlx.ops.linear(x, w, b, activation="relu")
    layer = pydlx.nn.Linear(784, 400, activation="relu")
    with pydlx.use_backend("reference"): ...
    with pydlx.use_policy("off"): ...   # auto without the GPU's measured policy (or a policy file of your own)
    with pydlx.use_policy("measure"): ...  # each new shape measured on first use on this GPU (pydlx.tune)
"""
from . import activations, registry
from . import reference, triton, cuda  # the built-in backends register themselves (in this order)
from . import nn, ops
from ._backend import BackendUnavailableError, backends, clear_caches, current_backend, use_backend
from ._policy import use_policy
from .ops._common import decompositions
from .optimize import explain, optimize, plan, restore
from . import tune

from ._version import __version__

__all__ = ["__version__", "backends", "use_backend", "current_backend", "use_policy", "BackendUnavailableError",
           "clear_caches", "decompositions",
           "optimize", "explain", "plan", "restore", "tune", "nn", "ops", "reference", "registry", "activations"]
