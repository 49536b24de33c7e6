"""What every pydlx op shares: the dtypes it takes, the kernels' dtype rule, and the autocast cast."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # any backend (reference: float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the Triton and CUDA kernels


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
