"""The ``reference`` backend: eager PyTorch implementations of every family (pydlx/reference/<family>.py, with the
functions and signatures every backend's module of that family has). It is the CPU fallback, what ``auto`` runs
wherever no kernel is measured faster, and the test oracle; it runs anywhere, in any floating dtype.

The package holds the family modules under their names (``pydlx.reference.linear`` is the module; its ``linear``
function is ``pydlx.reference.linear.linear``)."""
from .. import registry
from . import batchnorm, conv_relu_pool, linear, lstm, mlp

BACKEND = registry.register_backend(registry.Backend(
    "reference", package=__name__, candidate=False,
    doc="eager PyTorch (cuDNN / cuBLAS on GPUs): runs anywhere, the CPU fallback and the oracle"))

__all__ = ["BACKEND", "batchnorm", "conv_relu_pool", "linear", "lstm", "mlp"]
