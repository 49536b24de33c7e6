"""What every pydlx op shares: the exception types of bad input and the shared argument checks, the autocast cast,
and the custom-op scaffold (``implement``, ``autograd``) that registers an op's implementation, fake
implementation and autograd formula against its schema (pydlx/ops/schemas.py)."""
from __future__ import annotations

import collections
import math
import operator
from typing import Callable, Dict, Optional, Sequence

import torch
import torch._decomp
from torch import Tensor

from .. import _backend
from .._tracing import traced, watched  # noqa: F401  (re-exported: the entry points' test)
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
    """``t`` (*, n) as a 2-D (rows, n) view or copy; unlike ``reshape(-1, n)`` also when n or the rows are 0. A 2-D
    ``t`` is returned as it is (no reshape call: one dispatch fewer on every call with 2-D input)."""
    return t if t.dim() == 2 else t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def autocast_cast(device_type: str, tensors: Sequence[Optional[Tensor]]) -> list:
    """Under torch.autocast, the tensors cast to the autocast dtype (as F.linear / F.conv2d cast theirs);
    otherwise unchanged. None entries stay None."""
    if not torch.is_autocast_enabled(device_type):
        return list(tensors)
    dt = torch.get_autocast_dtype(device_type)
    return [t.to(dt) if t is not None else None for t in tensors]


def unrows(t: Tensor, lead) -> Tensor:
    """A 2-D (rows, n) result of an implementation as (*lead, n), not an autograd view of it: an op's output that
    is a view (of a tensor made inside the op) may not be modified in place, and models do that (a Linear on a
    sequence followed by ``nn.Hardswish(inplace=True)``); ``torch.matmul`` returns its N-D results the same way."""
    return torch.ops.aten._unsafe_view(t.contiguous(), (*lead, t.shape[-1]))


def act_name(activation: str) -> Optional[str]:
    """The activation spec an implementation takes from an op's ``activation`` argument ("none": None)."""
    return None if activation == "none" else activation


# ----------------------------------------------------------------------------------------------- the op scaffold
_PLAIN = (Tensor, torch.nn.Parameter)  # tensor types the eager path takes; any other (FakeTensor, DTensor, ...) -> op


class Op:
    """A pydlx op as its entry points call it, with the op's arguments complete (positional, schema order).

    Eagerly -- no tracing, no mode, no transform, plain tensors (``traced``) -- the implementation is called
    directly: under no gradients as it is; with gradients through one generated ``torch.autograd.Function`` that
    runs the same ``save`` / ``backward`` formulas as the op's registered autograd (``autograd``), so both paths
    compute the same gradients from the same saved tensors. That skips torch.library's Python dispatch and its
    autograd wrapper, which cost several times the eager ops a fused call replaces (bench/NOTES.md, host cost).
    Otherwise the call goes through the op ``overload`` (``pydlx::<name>``): torch.compile, torch.export and the
    modes see one opaque op. A backward op (no ``function``) called with gradients enabled on inputs that need one
    (a backward that builds a graph, ``create_graph=True``, for a double backward) runs the reference's
    implementation directly where the op is marked ``second_order`` (autograd records its PyTorch ops); otherwise it
    goes through the op too, which refuses a second backward with torch's error."""

    __slots__ = ("name", "impl", "overload", "function", "transformable", "tensors", "lists", "names", "backend_at",
                 "second_order")

    def __init__(self, name: str, impl: Callable, overload: torch._ops.OpOverload):
        self.name, self.impl, self.overload, self.function = name, impl, overload, None
        self.transformable = None  # the same Function in torch.func's form (forward without ctx, setup_context)
        args = overload._schema.arguments
        self.names = tuple(a.name for a in args)
        self.tensors = tuple(i for i, a in enumerate(args) if _is_tensor(a.type))
        self.lists = tuple(i for i, a in enumerate(args) if isinstance(a.type, torch.ListType)
                           and _is_tensor(a.type.getElementType()))
        self.backend_at = self.names.index("backend")  # (every op takes the backend that runs it)
        self.second_order = False  # (a backward op: see ``implement``)

    def __call__(self, *args):
        if traced():
            return self.overload(*args) if watched() else self._transformed(args)
        grad = False
        for i in self.tensors:
            t = args[i]
            if t is not None:
                if type(t) not in _PLAIN:
                    return self.overload(*args)
                grad = grad or t.requires_grad
        for i in self.lists:
            for t in args[i]:
                if type(t) not in _PLAIN:
                    return self.overload(*args)
                grad = grad or t.requires_grad
        if grad and torch.is_grad_enabled():
            if self.function is None:  # a backward op inside a backward that records a graph
                if self.second_order and args[self.backend_at] == "reference":
                    return self.impl(*args)
                return self.overload(*args)
            return self.eager(True, *args)
        return self.impl(*args)

    def _transformed(self, args):
        """Under a torch.func transform. On the reference backend the implementation itself: PyTorch ops, which
        every transform handles as it handles the chain as written (grad, vjp, vmap, jvp, jacfwd, hessian,
        per-sample gradients), with torch's own derivatives of the same math. On a kernel backend, a forward op
        through its Function in torch.func's form (grad, vjp and functional_call differentiate it with the op's own
        formulas; vmap and jvp raise torch's error for a Function without a vmap or jvp rule), and a backward op
        (called by those formulas) on the plain tensors under one level of grad / vjp (its result a constant
        there: a kernel's backward is not differentiable)."""
        backend = args[self.backend_at]
        if backend == "reference":
            return self.impl(*args)
        if self.transformable is None:
            plain = list(args)
            for i in self.tensors:
                plain[i] = self._kernel_tensor(backend, args[i])
            for i in self.lists:
                plain[i] = [self._kernel_tensor(backend, t) for t in args[i]]
            with torch._C._DisableFuncTorch():
                return self.impl(*plain)
        if not self.lists:
            return self.transformable.apply(None, *args)
        return self.transformable.apply(tuple(len(args[i]) for i in self.lists), *_flatten(args, self.lists))

    def _kernel_tensor(self, backend: str, t):
        """``t`` as a kernel backend's backward reads it under a torch.func transform: the plain tensor inside one
        level of grad tracking; a batched tensor (vmap, jacrev, jacfwd, hessian) or nested levels raise."""
        F = torch._C._functorch
        if not isinstance(t, Tensor) or not F.is_functorch_wrapped_tensor(t):
            return t
        if F.is_gradtrackingtensor(t):
            inner = F.get_unwrapped(t)
            if not F.is_functorch_wrapped_tensor(inner):
                return inner
        raise RuntimeError(
            f"pydlx::{self.name}: the {backend} backend's backward runs under torch.func's grad and vjp, not under "
            "vmap (jacrev, jacfwd, hessian) or nested transforms (its kernels read plain tensors); use the reference "
            "backend there (pydlx.use_backend('reference'), or auto on a CPU)")

    def eager(self, grad: bool, *args):
        """The eager path for a caller that has checked ``traced()`` and the tensors' types itself (a kept plan):
        ``grad``: whether autograd records the call (grad mode on and an input requires grad)."""
        if not grad:
            return self.impl(*args)
        if not self.lists:
            return self.function.apply(None, *args)
        lengths = tuple(len(args[i]) for i in self.lists)
        return self.function.apply(lengths, *_flatten(args, self.lists))


def plain(*tensors) -> bool:
    """Whether every one of ``tensors`` (None allowed) is a plain tensor or Parameter (no subclass, no proxy)."""
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return False
    return True


def metas(tensors: Sequence[Optional[Tensor]]) -> tuple:
    """What a kept plan depends on of each of ``tensors`` (pydlx/_backend.py ``Plans``): shape, dtype, device and
    requires_grad, or None for None; in one call (a plan's key is built on every call)."""
    out = []
    for t in tensors:
        out.append(None if t is None else (t.shape, t.dtype, t.device, t.requires_grad))
    return tuple(out)


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


# Whether any autocast is on (then the entry points cast before they check): torch's own test, called directly
autocast_enabled = _any_autocast


def _is_tensor(t) -> bool:
    return isinstance(t, torch.TensorType) or (isinstance(t, torch.OptionalType)
                                               and isinstance(t.getElementType(), torch.TensorType))


def _flatten(args: Sequence, lists: Sequence[int]) -> list:
    """``args`` with each Tensor[] argument (positions ``lists``) spread in place: autograd.Function tracks only
    top-level tensors."""
    flat: list = []
    for i, a in enumerate(args):
        if i in lists:
            flat.extend(a)
        else:
            flat.append(a)
    return flat


def _unflatten(flat: Sequence, lists: Sequence[int], lengths: Optional[Sequence[int]]) -> list:
    if lengths is None:
        return list(flat)
    out, pos, k = [], 0, 0
    for _ in range(len(flat) - sum(lengths) + len(lengths)):  # (one per argument; an empty list is one too)
        if len(out) in lists:
            out.append(list(flat[pos:pos + lengths[k]]))
            pos, k = pos + lengths[k], k + 1
        else:
            out.append(flat[pos])
            pos += 1
    return out


def implement(name: str, impl: Callable, fake: Callable, differentiable: bool = False,
              decomposition: Optional[Callable] = None, second_order: bool = False) -> Op:
    """Register ``impl`` (every device: it calls the backend named by its ``backend`` argument) and ``fake`` (shapes
    only, for torch.compile / torch.export) for the op ``pydlx::<name>`` of pydlx/ops/schemas.py; returns the ``Op``
    the entry points call. ``differentiable``: its autograd formula follows (``autograd``); otherwise (the backward
    ops) a backward through it raises torch's RuntimeError rather than pass a wrong gradient, except where
    ``second_order``: on the reference backend a backward op's implementation is PyTorch ops, exact to differentiate
    when every tensor it reads carries its autograd history -- the forward op's inputs and differentiable outputs,
    not a saved non-differentiable output such as a pre-activation, whose dependence on the inputs autograd does not
    see. The op's backward formula guarantees that in a backward that records a graph (it recomputes such a tensor
    from the inputs there); such a call (``Op``) then runs the implementation directly, so a second backward goes
    through its ops. A kernel backend's backward (Triton, C++/CUDA) never does. ``decomposition``: what the op lowers to (``_decomposes``), if not ``impl`` on
    the reference backend."""
    LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"pydlx::{name}", fake, lib=LIB)
    if not differentiable:
        def refuse(ctx, *grads):
            raise RuntimeError(f"Trying to backward through pydlx::{name} but no autograd formula was registered: "
                               "pydlx's backward ops are not differentiable on a forced kernel backend, nor the "
                               "LSTM's (double backward is supported on the reference backend and under auto "
                               "otherwise)")
        torch.library.register_autograd(f"pydlx::{name}", refuse, lib=LIB)
    _OPS[name] = Op(name, impl, op(name))
    _OPS[name].second_order = second_order
    _decomposes(_OPS[name], fake, decomposition or impl)
    return _OPS[name]


_OPS: Dict[str, Op] = {}
DECOMPOSITIONS: Dict[torch._ops.OpOverload, Callable] = {}  # pydlx::<op> -> its reference in plain ATen ops


def decompositions() -> Dict[torch._ops.OpOverload, Callable]:
    """A decomposition table that lowers every ``pydlx::`` op to plain ATen ops (its reference implementation), for
    ``exported.run_decompositions(pydlx.decompositions())``: the lowered program runs in a process that never
    imports pydlx. (``torch.onnx.export`` needs nothing: pydlx registers the same table with torch.)"""
    return dict(DECOMPOSITIONS)


def _decomposes(the_op: Op, fake: Callable, impl: Callable) -> None:
    """Register the op's decomposition: ``impl`` (the op's implementation) on the reference backend, whatever
    backend the call names, so that tracing it yields plain ATen ops. It goes into torch's decomposition
    table, which torch.onnx.export's lowering uses (so ONNX export needs no argument), and into ``DECOMPOSITIONS``,
    the table ``pydlx.decompositions()`` gives to ``ExportedProgram.run_decompositions``."""
    schema, at = the_op.overload._schema.arguments, the_op.backend_at

    def decomposition(*args, **kwargs):
        full = list(args)
        for a in schema[len(args):]:
            full.append(kwargs[a.name] if a.name in kwargs else a.default_value)
        full[at] = "reference"
        return impl(*full)

    decomposition.__name__ = f"pydlx_{the_op.name}_reference"
    decomposition.__qualname__ = decomposition.__name__
    DECOMPOSITIONS[the_op.overload] = decomposition
    torch._decomp.register_decomposition(the_op.overload)(decomposition)
    # FakeTensorMode prefers a decomposition over the op's fake implementation under symbolic sizes unless the op
    # has a Python meta: the fake implementation, declared as one, keeps torch.compile's tracing on it.
    torch._decomp.register_decomposition(the_op.overload, type="meta")(fake)


def _records(name: str, op: Op):
    """(Args, Needs, mask) for the op's formulas: ``Args(*inputs)``, the op's inputs by schema name;
    ``mask(inputs)`` the same record with each tensor (or Tensor[]) input replaced by whether it was given (what a
    backward keeps: no reference to an input it did not save), read as ``has_<t>``; ``Needs(*flags)`` which inputs
    need a gradient, by name. Named tuples: built once per op, cheap per call (made with ``tuple.__new__``: a
    namedtuple's own constructors are Python functions, and these run on every training call)."""
    tensor_at = tuple(i for i in range(len(op.names)) if i in op.tensors or i in op.lists)
    props = {f"has_{op.names[i]}": property(operator.itemgetter(i)) for i in tensor_at}
    Args = type(f"{name}_args", (collections.namedtuple(f"{name}_args", op.names),), {"__slots__": (), **props})
    Needs = collections.namedtuple(f"{name}_needs", op.names)

    def mask(inputs):
        masked = list(inputs)
        for i in tensor_at:
            masked[i] = masked[i] is not None
        return _new(Args, masked)
    return Args, Needs, mask


_new = tuple.__new__  # (a named tuple from an iterable, in C)


def _gradients(names: Sequence[str], needs: Sequence, got: Dict[str, object]) -> list:
    """One gradient (or None) per input, in schema order, from ``backward``'s {name: gradient}; a Tensor[] input
    (``needs`` entry a list) gets a list."""
    out = []
    for n, need in zip(names, needs):
        g = got.get(n)
        if isinstance(need, (list, tuple)):  # a Tensor[] input: one gradient (or None) per tensor
            out.append([gi if ni else None for gi, ni in zip(g if g is not None else [None] * len(need), need)])
        else:
            out.append(g if need else None)
    return out


def autograd(name: str, save: Callable, backward: Callable, non_differentiable: Sequence[int] = (),
             materialize_grads: bool = False) -> None:
    """The autograd formula of the op ``pydlx::<name>``, written once for every pydlx op, and registered twice:
    as the op's (torch.library: what torch.compile / torch.export see) and as the eager ``Op``'s
    ``torch.autograd.Function``.

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
    the_op = _OPS[name]
    names = the_op.names
    Args, Needs, mask = _records(name, the_op)

    # the non-differentiable outputs, picked without a Python call: one by its index, several by an itemgetter
    one_nd = non_differentiable[0] if len(non_differentiable) == 1 else None
    many_nd = operator.itemgetter(*non_differentiable) if len(non_differentiable) > 1 else None

    def setup_context(ctx, inputs, output):
        outputs = output if isinstance(output, tuple) else (output,)
        if one_nd is not None:
            ctx.mark_non_differentiable(outputs[one_nd])
        elif many_nd is not None:
            ctx.mark_non_differentiable(*many_nd(outputs))
        if not materialize_grads:
            ctx.set_materialize_grads(False)
        ctx.save_for_backward(*save(_new(Args, inputs), outputs))
        ctx.args = mask(inputs)

    # torch.library's calls may leave trailing arguments at their schema defaults out of ``inputs`` and of
    # ``needs_input_grad``: completed here (the eager path below always passes every argument)
    fill = tuple(a.default_value for a in the_op.overload._schema.arguments)

    def setup_context_op(ctx, inputs, output):
        setup_context(ctx, (*inputs, *fill[len(inputs):]), output)

    def backward_fn(ctx, *grads):
        given = ctx.needs_input_grad
        needs = (*given, *(False,) * (len(names) - len(given)))
        got = {} if grads[0] is None else backward(ctx.args, ctx.saved_tensors, grads, _new(Needs, needs))
        return tuple(_gradients(names, needs, got))[:len(given)]

    torch.library.register_autograd(f"pydlx::{name}", backward_fn, setup_context=setup_context_op, lib=LIB)

    lists, none = the_op.lists, (None,) * (len(names) + 1)

    # ``ctx.auto_kernel``: whether ``auto`` ran the call on a kernel backend. In a backward that records a graph
    # (create_graph=True) of such a call, the formula gets the reference backend instead: the same saved tensors
    # (every backend saves the reference's layouts), read by the reference's backward, which is differentiable
    # (``implement``'s ``second_order``; a kernel's backward never is). A forced backend keeps its own, and refuses.
    # (Written out in both Functions: their forward and backward run on every training call.)
    at = the_op.backend_at

    if lists:
        # eager: forward(ctx, lengths of the Tensor[] inputs, *inputs with those lists spread)
        def forward(ctx, lengths, *flat):
            inputs = _unflatten(flat, lists, lengths)
            outputs = the_op.impl(*inputs)
            setup_context(ctx, inputs, outputs)
            ctx.auto_kernel = inputs[at] != "reference" and _backend.current_backend() == "auto"
            ctx.lengths = lengths
            return outputs

        def backward_eager(ctx, *grads):
            lengths = ctx.lengths
            needs = _unflatten(ctx.needs_input_grad[1:], lists, lengths)
            args = ctx.args._replace(backend="reference") if ctx.auto_kernel and torch.is_grad_enabled() else ctx.args
            got = {} if grads[0] is None else backward(args, ctx.saved_tensors, grads, _new(Needs, needs))
            return (None, *_flatten(_gradients(names, needs, got), lists))
    else:  # (most ops: the same, with no lists to spread and gather, on the hot path of every call; lengths None)
        def forward(ctx, lengths, *inputs):
            outputs = the_op.impl(*inputs)
            setup_context(ctx, inputs, outputs)
            ctx.auto_kernel = inputs[at] != "reference" and _backend.current_backend() == "auto"
            return outputs

        def backward_eager(ctx, *grads):
            if grads[0] is None:
                return none
            needs = ctx.needs_input_grad
            args = ctx.args._replace(backend="reference") if ctx.auto_kernel and torch.is_grad_enabled() else ctx.args
            got = backward(args, ctx.saved_tensors, grads, _new(Needs, needs[1:]))
            return (None, *[got.get(n) if need else None for n, need in zip(names, needs[1:])])

    # (built with type() so that autograd names the node after the op: pydlx_<name>Backward)
    Function = type(f"pydlx_{name}", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward_eager)})
    the_op.function = Function

    # torch.func's form of the same Function (forward without ctx, then setup_context): what grad / vjp need. Not
    # the eager path's: its apply binds the arguments through inspect.signature on every call.
    def forward_transformable(lengths, *flat):
        return the_op.impl(*_unflatten(flat, lists, lengths))

    def setup_transformable(ctx, inputs, output):
        lengths, flat = inputs[0], inputs[1:]
        setup_context(ctx, _unflatten(flat, lists, lengths), output)
        ctx.lengths = lengths
        ctx.auto_kernel = False  # (under a transform auto runs the reference: a kernel here was forced)

    the_op.transformable = type(f"pydlx_{name}", (torch.autograd.Function,), {
        "forward": staticmethod(forward_transformable), "setup_context": staticmethod(setup_transformable),
        "backward": staticmethod(backward_eager)})
