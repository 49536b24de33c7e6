"""What every pydlx op shares: the exception types of bad input and the shared argument checks, the autocast cast,
and the custom-op scaffold (``implement``, ``autograd``) that registers an op's implementation, fake
implementation and autograd formula against its schema (pydlx/ops/schemas.py)."""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import Tensor

from .schemas import LIB, op


class ArgumentError(ValueError, RuntimeError):
    """Bad input (shape, size, option), raised before any kernel runs. A ValueError, and also the RuntimeError that
    torch raises for the same misuse (F.linear, F.conv2d, nn.LSTM's hidden-state checks, nn.LSTMCell), so code
    written against torch.nn catches it unchanged."""


class DtypeError(TypeError, ValueError, RuntimeError):
    """A dtype torch would also refuse (integer input, input and weights of different dtypes). A TypeError, and
    also what torch raises for it: RuntimeError from F.linear / F.conv2d, ValueError from nn.LSTM."""


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # any backend (reference: float64)


# ----------------------------------------------------------------------------------------------- argument checks
def check_floating(op_name: str, name: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise DtypeError(f"{op_name}: {name} must be a floating-point tensor (float16, bfloat16, float32, float64), "
                         f"got {t.dtype}")


def check_like(op_name: str, name: str, t: Optional[Tensor], like: Tensor, like_name: str = "input") -> None:
    """``t`` (None: nothing to check) is a floating-point tensor on ``like``'s device, of ``like``'s dtype."""
    if t is None:
        return
    check_floating(op_name, name, t)
    if t.device != like.device:
        raise ArgumentError(f"{op_name}: {name} is on {t.device} but {like_name} is on {like.device}; all tensors "
                            "must be on one device")
    if t.dtype != like.dtype:
        raise DtypeError(f"{op_name}: {name} has dtype {t.dtype} but {like_name} has {like.dtype}; they must match "
                         "(or run under torch.autocast)")


def rows(t: Tensor) -> Tensor:
    """``t`` (*, n) as a 2-D (rows, n) view or copy; unlike ``reshape(-1, n)`` also when n or the rows are 0."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def autocast_cast(device_type: str, tensors: Sequence[Optional[Tensor]]) -> list:
    """Under torch.autocast, the tensors cast to the autocast dtype (as F.linear / F.conv2d cast theirs);
    otherwise unchanged. None entries stay None."""
    if not torch.is_autocast_enabled(device_type):
        return list(tensors)
    dt = torch.get_autocast_dtype(device_type)
    return [t.to(dt) if t is not None else None for t in tensors]


def act_name(activation: str) -> Optional[str]:
    """The activation spec an implementation takes from an op's ``activation`` argument ("none": None)."""
    return None if activation == "none" else activation


# ----------------------------------------------------------------------------------------------- the op scaffold
def implement(name: str, impl: Callable, fake: Callable, differentiable: bool = False) -> torch._ops.OpOverload:
    """Register ``impl`` (every device: it calls the backend named by its ``backend`` argument) and ``fake`` (shapes
    only, for torch.compile / torch.export) for the op ``pydlx::<name>`` of pydlx/ops/schemas.py; returns the op.
    ``differentiable``: its autograd formula follows (``autograd``); otherwise (the backward ops) a backward through
    it raises torch's RuntimeError -- double backward is not supported -- rather than pass a wrong gradient."""
    LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"pydlx::{name}", fake, lib=LIB)
    if not differentiable:
        def refuse(ctx, *grads):
            raise RuntimeError(f"Trying to backward through pydlx::{name} but no autograd formula was registered: "
                               "pydlx's backward ops are not differentiable (double backward is not supported)")
        torch.library.register_autograd(f"pydlx::{name}", refuse, lib=LIB)
    return op(name)


def autograd(name: str, save: Callable, backward: Callable, non_differentiable: Sequence[int] = (),
             materialize_grads: bool = False) -> None:
    """The autograd formula of the op ``pydlx::<name>``, written once for every pydlx op:

    * ``save(args, outputs) -> tensors``: what backward needs (``args``: the op's inputs by their schema names);
    * ``backward(args, saved, grads, needs) -> {input name: gradient}``: ``args`` holds the op's non-tensor inputs
      (the backend among them: the backward runs where the forward ran) and, for each tensor input ``t``,
      ``args.has_t`` (whether it was given); ``saved`` the tensors ``save`` chose; ``grads`` one per output (None
      where unused: ``grads[0]`` is never None when it is called); ``needs`` which inputs need a gradient, by name.
      Gradients for inputs that do not need one are dropped here;
    * ``non_differentiable``: the outputs that exist only to be saved for backward;
    * ``materialize_grads``: unused outputs' gradients come as zeros rather than None (an op whose several outputs
      each feed backward: the LSTM's y, h_n, c_n); else an unused first output means no gradient at all.
    """
    names = [a.name for a in op(name)._schema.arguments]

    def setup_context(ctx, inputs, output):
        outputs = output if isinstance(output, tuple) else (output,)
        ctx.mark_non_differentiable(*(outputs[i] for i in non_differentiable))
        ctx.set_materialize_grads(materialize_grads)
        given = dict(zip(names, inputs))
        ctx.save_for_backward(*save(SimpleNamespace(**given), outputs))
        plain: Dict[str, object] = {}
        for k, v in given.items():
            if isinstance(v, Tensor) or (isinstance(v, (list, tuple)) and v and isinstance(v[0], Tensor)):
                plain[f"has_{k}"] = True
            elif v is None:
                plain[f"has_{k}"] = False
            else:
                plain[k] = v
        ctx.args = SimpleNamespace(**plain)

    def backward_fn(ctx, *grads):
        needs = ctx.needs_input_grad
        got = {} if grads[0] is None else backward(ctx.args, ctx.saved_tensors, grads,
                                                   SimpleNamespace(**dict(zip(names, needs))))
        out = []
        for n, need in zip(names, needs):
            g = got.get(n)
            if isinstance(need, (list, tuple)):  # a Tensor[] input: one gradient (or None) per tensor
                out.append([gi if ni else None for gi, ni in zip(g if g is not None else [None] * len(need), need)])
            else:
                out.append(g if need else None)
        return tuple(out)

    torch.library.register_autograd(f"pydlx::{name}", backward_fn, setup_context=setup_context, lib=LIB)
