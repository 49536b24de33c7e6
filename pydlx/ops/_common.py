"""What every pydlx op shares: the dtypes it takes, the kernels' dtype rule, the autocast cast, and the exception
types of bad input."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

class ArgumentError(ValueError, RuntimeError):
    """Bad input (shape, size, option), raised before any kernel runs. A ValueError, and also the RuntimeError that
    torch raises for the same misuse (F.linear, F.conv2d, nn.LSTM's hidden-state checks, nn.LSTMCell), so code
    written against torch.nn catches it unchanged."""


class DtypeError(TypeError, ValueError, RuntimeError):
    """A dtype torch would also refuse (integer input, input and weights of different dtypes). A TypeError, and
    also what torch raises for it: RuntimeError from F.linear / F.conv2d, ValueError from nn.LSTM."""


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # any backend (reference: float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the Triton and CUDA kernels


def rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` (*, n) as a 2-D (rows, n) view or copy; unlike ``reshape(-1, n)`` also when n or the rows are 0."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def why_not_kernel_dtype(x: torch.Tensor) -> Optional[str]:
    if x.dtype in KERNEL_DTYPES:
        return None
    return f"dtype {x.dtype} is not supported (supported: float16, bfloat16, float32)"


def autocast_cast(device_type: str, tensors: Sequence[Optional[torch.Tensor]]) -> list:
    """Under torch.autocast, the tensors cast to the autocast dtype (as F.linear / F.conv2d cast theirs);
    otherwise unchanged. None entries stay None."""
    if not torch.is_autocast_enabled(device_type):
        return list(tensors)
    dt = torch.get_autocast_dtype(device_type)
    return [t.to(dt) if t is not None else None for t in tensors]
