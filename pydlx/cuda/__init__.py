"""The ``cuda`` backend: the Python faces of the C++/CUDA extension (csrc/<family>.cu, loaded as ``pydlx._C``), one
module per family with the functions and signatures of pydlx/reference/<family>.py. This package registers the
backend; importing it does not load the extension, which the backend's device check (``why_not_on``) loads, or
reports as unavailable, before the backend is chosen."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext, registry


def why_not_on(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got a tensor on {device}"
    if not _ext.load():
        return "the C++/CUDA extension pydlx._C is unavailable: " + _ext.status()
    return None


BACKEND = registry.register_backend(registry.Backend(
    "cuda", package=__name__, why_not_on=why_not_on, dtypes=registry.KERNEL_DTYPES, status=_ext.status,
    doc="the C++/CUDA extension pydlx._C (csrc/): CUDA tensors"))
