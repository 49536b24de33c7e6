"""``pydlx.ops.mlp``: Linear -> act -> ... -> Linear -> last_activation, fused.

Two paths, chosen per call:
  * fused: every layer at most 128 wide (pydlx/triton/mlp.py): one kernel for the whole forward, one for the
    backward walk through the layers, and the weight gradients as GEMMs over all rows. Op ``pydlx::mlp_fused``.
    Its forced ``cuda`` backend runs csrc/mlp.cu's fused forward (WMMA tensor cores; fp16/bf16, inference only).
  * chain: wider MLPs (the seed's 784-400-200-32 autoencoder) run as a chain of ``pydlx.ops.linear`` calls, each
    a GEMM with bias and activation in its epilogue and the activation's derivative fused into its backward.

Ops (schemas defined once, here):
  pydlx::mlp_fused(input, weights, biases, has_bias, activation, last_activation, save, backend) -> (y, H, Z)
      ``biases`` lists only the layers that have one (``has_bias`` says which): a list holding None would not
      be differentiable through torch.library's autograd.
      H = hidden layers' outputs [M, sum of hidden sizes], Z = pre-activations [M, sum of layer sizes] (only when
      an activation's derivative needs z); both empty unless ``save``. Non-differentiable: saved for backward.
  pydlx::mlp_fused_bwd(grad, input, weights, has_bias, y, H, Z, activation, last_activation, need_dx, backend)
      -> (dx, dweights, dbiases)       empty tensors stand for gradients that are not needed.
Saved for backward: input, weights, y, H (and Z): the activations eager PyTorch also keeps, nothing more.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function

from .. import _backend, registry
from ..activations import check_activation, saves_preact
from ..reference.mlp import fuses_in_one_kernel, mlp as reference_mlp, saves_z
from ..registry import KERNEL_DTYPES
from ._common import (ArgumentError, act_name, autocast_cast, autocast_enabled, autograd, check_floating, check_like,
                      implement, metas, plain, rows, traced, unrows)
from .linear import linear, op_activation


_FOUND = registry.found("mlp")


def _impl(backend: str):
    return _FOUND.get(backend) or registry.implementation("mlp", backend)


def choose(x: Tensor, sizes: Sequence[int], training: bool) -> str:
    """The backend of one fused-MLP call (pydlx/_backend.py): forced, or auto by the GPU's policy / defaults."""
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return _backend.choose("mlp", x.device, registry.MLPCall(x.dtype, training, M, tuple(sizes)), "mlp")


def _sizes(input: Tensor, weights: Sequence[Tensor]) -> List[int]:
    return [input.shape[-1]] + [w.shape[0] for w in weights]


def _expand(biases: Sequence[Tensor], has_bias: Sequence[bool]) -> List[Optional[Tensor]]:
    it = iter(biases)
    return [next(it) if hb else None for hb in has_bias]


def _fwd(input, weights, biases, has_bias, activation, last_activation, save, backend):
    y, H, Z = _impl(backend).mlp_fwd(input if input.dim() == 2 else rows(input), weights,
                                     _expand(biases, has_bias), act_name(activation), act_name(last_activation), save)
    return (y if input.dim() == 2 else unrows(y, input.shape[:-1])), H, Z


def _fwd_fake(input, weights, biases, has_bias, activation, last_activation, save, backend):
    M = input.numel() // input.shape[-1] if input.shape[-1] else 0
    sizes = [w.shape[0] for w in weights]
    y = input.new_empty((*input.shape[:-1], sizes[-1]))
    H = input.new_empty((M, sum(sizes[:-1]))) if save and len(sizes) > 1 else input.new_empty(0)
    Z = input.new_empty((M, sum(sizes))) if save and saves_z(act_name(activation), act_name(last_activation)) \
        else input.new_empty(0)
    return y, H, Z


def _bwd(grad, input, weights, has_bias, y, H, Z, activation, last_activation, need_dx, backend):
    x2d = rows(input)
    dx, dzs = _impl(backend).mlp_bwd(rows(grad), x2d, weights, rows(y), H, Z, act_name(activation),
                                     act_name(last_activation), need_dx)
    # weight gradients: a GEMM over all rows per layer, its input x or a column block of H; bias gradients: a
    # reduction per layer (no concatenated DZ to slice and copy out of)
    dws, dbs, layer_in, col = [], [], x2d, 0
    for i, dz in enumerate(dzs):
        dws.append(torch.mm(dz.t(), layer_in))
        dbs.append(dz.sum(0) if has_bias[i] else input.new_empty(0))
        if i + 1 < len(dzs):
            n = dz.shape[1]
            layer_in, col = H[:, col:col + n], col + n
    dx = (dx if input.dim() == 2 else dx.reshape(input.shape)) if need_dx else input.new_empty(0)
    return dx, dws, dbs


def _bwd_fake(grad, input, weights, has_bias, y, H, Z, activation, last_activation, need_dx, backend):
    dx = torch.empty_like(input) if need_dx else input.new_empty(0)
    return dx, [torch.empty_like(w) for w in weights], [
        w.new_empty(w.shape[0]) if hb else input.new_empty(0) for w, hb in zip(weights, has_bias)]


mlp_fused = implement("mlp_fused", _fwd, _fwd_fake, differentiable=True)
mlp_fused_bwd = implement("mlp_fused_bwd", _bwd, _bwd_fake)


def _save(a, out):
    y, H, Z = out
    # y only where backward reads it (the last activation's derivative from y): without a last activation an
    # in-place op on the output (a residual ``+=``, ``nn.Hardswish(inplace=True)``) is as legal as in eager. The
    # biases (parameters: no memory) for a double backward's recompute
    keep_y = act_name(a.last_activation) is not None and not saves_preact(a.last_activation)
    return (a.input, y if keep_y else y.new_empty(0), H, Z, *a.weights, *a.biases)


def _second_order(a, input, weights, biases, grad, needs) -> dict:
    """The gradients as a backward that records a graph (create_graph=True) needs them: H and Z are saved as
    non-differentiable outputs, so the reference recomputes the MLP from its inputs and differentiates that with
    autograd (exact to any order, as the chain as written)."""
    wrt = {"input": [input] if needs.input else [],
           "weights": [w for w, n in zip(weights, needs.weights) if n],
           "biases": [b for b, n in zip(biases, needs.biases) if n]}
    with torch.enable_grad():
        y = reference_mlp(input, weights, _expand(biases, a.has_bias), act_name(a.activation),
                          act_name(a.last_activation))
        got = iter(torch.autograd.grad(y, [t for ts in wrt.values() for t in ts], grad, create_graph=True,
                                       allow_unused=True))
    out = {"input": next(got) if needs.input else None,
           "weights": [next(got) if n else None for n in needs.weights],
           "biases": [next(got) if n else None for n in needs.biases]}
    for k, ts in (("weights", weights), ("biases", biases)):  # (unused: zeros, as eager's nodes would give)
        out[k] = [g if g is not None or not n else torch.zeros_like(t)
                  for g, n, t in zip(out[k], getattr(needs, k), ts)]
    if needs.input and out["input"] is None:
        out["input"] = torch.zeros_like(input)
    return out


def _backward(a, saved, grads, needs):
    input, y, H, Z, *params = saved
    weights, biases = params[:len(a.has_bias)], params[len(a.has_bias):]  # (has_bias: one flag per layer)
    if a.backend == "reference" and torch.is_grad_enabled():  # a backward that records a graph
        return _second_order(a, input, weights, biases, grads[0], needs)
    if not a.save and grads[0].numel():
        raise RuntimeError("pydlx.ops.mlp: backward needs the saved activations, but the forward ran with "
                           "save=False; call pydlx.ops.mlp, which sets it when gradients are needed")
    dx, dws, dbs = mlp_fused_bwd(grads[0], input, weights, a.has_bias, y, H, Z, a.activation, a.last_activation,
                                 needs.input, a.backend)
    return {"input": dx, "weights": list(dws), "biases": [db for db, hb in zip(dbs, a.has_bias) if hb]}


autograd("mlp_fused", _save, _backward, non_differentiable=(1, 2))


def check_mlp_args(input, weights, biases, activation, last_activation) -> None:
    """Raise a clear error naming the bad argument. Runs before any kernel."""
    name = "pydlx.ops.mlp"
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
    if input.dim() == 0:
        raise ArgumentError(f"{name}: input must have at least 1 dimension, got a 0-D tensor")
    if not isinstance(weights, (list, tuple)) or len(weights) == 0:
        raise ArgumentError(f"{name}: weights must be a non-empty list of 2-D tensors (out_features, in_features)")
    if not isinstance(biases, (list, tuple)) or len(biases) != len(weights):
        raise ArgumentError(f"{name}: biases must be a list with one tensor or None per weight ({len(weights)}), "
                            f"got {len(biases) if isinstance(biases, (list, tuple)) else type(biases).__name__}")
    for a, arg in ((activation, "activation"), (last_activation, "last_activation")):
        try:
            check_activation(a, arg)
        except ValueError as e:
            raise ArgumentError(f"{name}: {e}") from None
    check_floating(name, "input", input)
    fan_in = input.shape[-1]
    for i, (w, b) in enumerate(zip(weights, biases)):
        if not isinstance(w, Tensor) or w.dim() != 2:
            got = f"shape {tuple(w.shape)}" if isinstance(w, Tensor) else type(w).__name__
            raise ArgumentError(f"{name}: weights[{i}] must be a 2-D tensor (out_features, in_features), got {got}")
        if w.shape[1] != fan_in:
            what = "input's last dimension" if i == 0 else f"weights[{i - 1}].shape[0]"
            raise ArgumentError(f"{name}: weights[{i}].shape[1] ({w.shape[1]}) must equal {what} ({fan_in})")
        if b is not None and (not isinstance(b, Tensor) or b.dim() != 1 or b.shape[0] != w.shape[0]):
            got = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ArgumentError(f"{name}: biases[{i}] must be None or 1-D with {w.shape[0]} elements, got {got}")
        check_like(name, f"weights[{i}]", w, input)
        check_like(name, f"biases[{i}]", b, input)
        fan_in = w.shape[0]


def mlp(input: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
        activation: Optional[str] = "relu", last_activation: Optional[str] = None) -> Tensor:
    """``Linear(s0, s1) -> activation -> ... -> Linear(s[-2], s[-1]) -> last_activation``.

    weights[i]: (s[i+1], s[i]) as nn.Linear stores them; biases[i]: (s[i+1],) or None. Any leading dims.
    activation / last_activation: an activation spec as pydlx.ops.linear takes (None, "relu", "leaky_relu(0.2)", ...).
    Layers all at most 128 wide run fused (one kernel forward, one backward walk + weight-gradient GEMMs);
    wider MLPs run as a chain of pydlx.ops.linear (GEMMs with the activation in their epilogues).
    """
    if not traced() and isinstance(weights, (list, tuple)) and isinstance(biases, (list, tuple)) and \
            plain(input, *weights, *biases):
        if autocast_enabled() and len(weights) == len(biases):
            input, *params = autocast_cast(input.device.type, (input, *weights, *biases))
            weights, biases = params[:len(weights)], params[len(weights):]
        key = (metas((input, *weights, None, *biases)), activation, last_activation,
               torch.is_grad_enabled(), _backend.state())
        plan = _PLANS.get(key)
        if plan is None:
            plan = _PLANS.keep(key, _plan(input, weights, biases, activation, last_activation))
        if plan is _EAGER:
            return reference_mlp(input, weights, biases, activation, last_activation)
        if plan is _CHAIN:
            return _chain(input, weights, biases, activation, last_activation)
        backend, act, last, has_bias, needs_grad = plan
        return mlp_fused.eager(needs_grad, input, list(weights), [b for b in biases if b is not None], has_bias,
                               act, last, needs_grad, backend)[0]
    relevant = (input, *weights, *[b for b in biases if b is not None])
    if has_torch_function(relevant):  # e.g. torch.fx proxies: recorded as one call of this function
        return handle_torch_function(mlp, relevant, input, weights, biases, activation=activation,
                                     last_activation=last_activation)
    tensors = (input, *weights, *biases)
    if all(isinstance(t, Tensor) and t.is_floating_point() for t in tensors if t is not None) and \
            len(weights) == len(biases):
        # under torch.autocast, cast first (as F.linear does), so a bf16 activation meets fp32 weights
        input, *params = autocast_cast(input.device.type, tensors)
        weights, biases = params[:len(weights)], params[len(weights):]
    check_mlp_args(input, weights, biases, activation, last_activation)
    if _backend.cpu_auto(input):
        return reference_mlp(input, weights, biases, activation, last_activation)  # see ops.linear
    sizes = _sizes(input, weights)
    if input.dtype in KERNEL_DTYPES and fuses_in_one_kernel(sizes):
        needs_grad = torch.is_grad_enabled() and (input.requires_grad or any(
            t.requires_grad for t in (*weights, *[b for b in biases if b is not None])))
        backend = choose(input, sizes, needs_grad)
        if _backend.runs_eager(backend):
            return reference_mlp(input, weights, biases, activation, last_activation)
        y, _, _ = mlp_fused(input, list(weights), [b for b in biases if b is not None],
                            [int(b is not None) for b in biases], op_activation(activation),
                            op_activation(last_activation), needs_grad, backend)
        return y
    return _chain(input, weights, biases, activation, last_activation)


def _chain(input, weights, biases, activation, last_activation) -> Tensor:
    h = input
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = linear(h, w, b, activation if i + 1 < len(weights) else last_activation)
    return h


_PLANS = _backend.Plans()
_EAGER, _CHAIN = "eager", "chain"  # plans: plain eager PyTorch (auto chose the reference, or CPU + auto); a chain of linear calls


def _plan(input, weights, biases, activation, last_activation):
    """What a call of ``mlp`` runs, derived once per signature: _EAGER, _CHAIN, or (backend, the op's activation
    specs, has_bias, whether autograd records the call) for the fused op."""
    check_mlp_args(input, weights, biases, activation, last_activation)
    if _backend.cpu_auto(input):
        return _EAGER
    sizes = _sizes(input, weights)
    if not (input.dtype in KERNEL_DTYPES and fuses_in_one_kernel(sizes)):
        return _CHAIN
    needs_grad = torch.is_grad_enabled() and (input.requires_grad or any(
        t.requires_grad for t in (*weights, *[b for b in biases if b is not None])))
    backend = choose(input, sizes, needs_grad)
    if _backend.runs_eager(backend):
        return _EAGER
    return (backend, op_activation(activation), op_activation(last_activation), [int(b is not None) for b in biases],
            needs_grad)
