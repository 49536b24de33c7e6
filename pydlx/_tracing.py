"""Whether a call is off the plain eager path (traced, watched by a mode, or under a torch.func transform): the
test every pydlx entry point and op makes on every call, and the measuring on first use before it times anything.
Its own module, below the dispatcher and the ops, which both ask it."""
from __future__ import annotations

import torch


def watched() -> bool:
    """Whether a call must go through the torch.library op: torch.compile / torch.export trace it, a dispatch or
    torch-function mode (FakeTensorMode, FlopCounterMode, ...) watches it, or torch.jit.trace records it.
    ``is_compiling`` comes first: Dynamo folds it to True and stops."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._get_tracing_state() is not None)


def traced() -> bool:
    """Whether a call is off the plain eager path: ``watched``, or a torch.func transform (grad, vjp, vmap, ...) is
    active (written out: this runs on every entry point's call). The entry points then keep no plan and call their
    ``Op`` with everything checked afresh."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._get_tracing_state() is not None
            or torch._C._functorch.peek_interpreter_stack() is not None)
