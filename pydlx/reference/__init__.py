"""Eager PyTorch implementations of every pydlx op: the CPU fallback, the ``reference`` backend (each family's
module, pydlx/reference/<family>.py, has the functions and signatures of pydlx/triton/<family>.py) and the test
oracle. The package holds the family modules under their names (``pydlx.reference.linear`` is the module; its
``linear`` function is ``pydlx.reference.linear.linear``)."""
from . import batchnorm, conv_relu_pool, linear, lstm, mlp

__all__ = ["batchnorm", "conv_relu_pool", "linear", "lstm", "mlp"]
