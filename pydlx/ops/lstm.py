"""``pydlx.ops.lstm`` / ``pydlx.ops.lstm_cell``: torch.nn.LSTM / LSTMCell as functions, on pydlx's kernels.

Ops (schemas defined once, here), one layer in one direction, time-major:
  pydlx::lstm_layer_fwd(x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reverse, save, backend)
      -> (y, h_n, c_n, hs, cs, acts, rs); backend: "triton" or "cuda"; w_hr [P, H] a projection (proj_size P) or
      None; with it h, y and hs are P wide and rs [T, B, H] saves the unprojected o * tanh(c)
      x [T, B, I]; bias = b_ih + b_hh or None; lengths int32 [B] (packed input) or None; y [T, B, H] (0 past a
      sequence's end); hs [T+1, B, H], cs [T+1, B, H] fp32 and acts [T, B, 4H] fp32 (the gate activations) are
      saved for backward (non-differentiable outputs).
  pydlx::lstm_layer_bwd(dy, dh_n, dc_n, x, w_ih, w_hh, w_hr, hs, cs, acts, rs, lengths, reverse, has_bias,
      need_input, need_weight, backend) -> (dx, dw_ih, dw_hh, dw_hr, db, dh0, dc0)
The layer op runs one backend (chosen by the dispatcher, pydlx/_backend.py, and passed in: the backward runs where
the forward ran): the input projection of all steps as one GEMM (the backend's linear), then its recurrence
(pydlx/triton/lstm.py: one sequence launch or one launch a step, backward through time in one launch;
pydlx/cuda/lstm.py: csrc/lstm.cu's persistent kernels, no projections), then the weight gradients as GEMMs over all
steps. Layers, directions, inter-layer dropout, batch_first, unbatched input and PackedSequence (lengths as a mask
per step, no re-batching) are pydlx.reference.lstm.lstm_layers' orchestration around the layer op.
The reference backend is ATen's LSTM (cuDNN on GPUs), or the per-layer math under torch.compile and in 16 bits on a
CPU. `auto` runs it until a GPU's measured policy says where the kernels win (bench/NOTES.md).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from .. import _backend, registry
from ._common import (ArgumentError, autocast_cast, autograd, check_floating, check_like, implement, metas, plain,
                      traced)
from ..reference import lstm as ref

NAME = "pydlx.ops.lstm"


# ----------------------------------------------------------------------------------------------- layer ops
def _impl(family: str, backend: str):
    return registry.implementation(family, backend)


def _fwd(x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reverse, save, backend):
    T, B, I = x.shape
    H = w_hh.shape[0] // 4
    # the input projection of every step as one GEMM (the backend's linear), then the backend's recurrence
    G = _impl("linear", backend).linear_fwd(x.reshape(T * B, I), w_ih, bias, None, False)[0].view(T, B, 4 * H)
    y, hs, cs, acts, rs = _impl("lstm", backend).lstm_fwd(G, w_hh, h0, c0, lengths, reverse, save, w_hr=w_hr)
    final = 0 if reverse else T
    return y, hs[final].clone(), cs[final].to(x.dtype, copy=True), hs, cs, acts, rs


def _fwd_fake(x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reverse, save, backend):
    T, B, _ = x.shape
    H, P = w_hh.shape[0] // 4, w_hh.shape[1]
    state = dict(dtype=ref.state_dtype(x.dtype))
    return (x.new_empty((T, B, P)), x.new_empty((B, P)), x.new_empty((B, H)), x.new_empty((T + 1, B, P)),
            x.new_empty((T + 1, B, H), **state),
            x.new_empty((T, B, 4 * H), **state) if save else x.new_empty(0, **state),
            x.new_empty((T, B, H)) if w_hr is not None else x.new_empty(0))


def _bwd(dy, dh_n, dc_n, x, w_ih, w_hh, w_hr, hs, cs, acts, rs, lengths, reverse, has_bias, need_input,
         need_weight, backend):
    T, B, I = x.shape
    H, P = w_hh.shape[0] // 4, w_hh.shape[1]
    x2 = x.reshape(T * B, I)
    h_prev = (hs[1:] if reverse else hs[:T]).reshape(T * B, P)
    empty = lambda: x.new_empty(0)  # noqa: E731  (a fresh one per output: outputs must not alias)
    lin = _impl("linear", backend)
    # backward through time, then the weight gradients and dx as GEMMs over all T*B rows at once
    dz, dh0, dc0, dht = _impl("lstm", backend).lstm_bwd(dy, dh_n, dc_n, acts, cs, w_hh, lengths, reverse, w_hr=w_hr)
    dz2 = dz.view(T * B, 4 * H)
    dx, dw_ih, db = lin.linear_bwd(dz2, x2, w_ih, dz2, None, has_bias, need_input, need_weight)
    dw_hh = dw_hr = None
    if need_weight:
        dw_hh = lin.linear_bwd(dz2, h_prev, w_hh, dz2, None, False, False, True)[1]
        if w_hr is not None:  # dW_hr = sum_t dL/dh_t^T r_t
            dht2 = dht.view(T * B, P)
            dw_hr = lin.linear_bwd(dht2, rs.reshape(T * B, H), w_hr, dht2, None, False, False, True)[1]
    return (dx.view(T, B, I) if need_input else empty(), dw_ih if need_weight else empty(),
            dw_hh if dw_hh is not None else empty(), dw_hr if dw_hr is not None else empty(),
            db if has_bias else empty(), dh0.to(x.dtype), dc0.to(x.dtype))


def _bwd_fake(dy, dh_n, dc_n, x, w_ih, w_hh, w_hr, hs, cs, acts, rs, lengths, reverse, has_bias, need_input,
              need_weight, backend):
    empty = x.new_empty(0)
    return (torch.empty_like(x) if need_input else empty, torch.empty_like(w_ih) if need_weight else empty,
            torch.empty_like(w_hh) if need_weight else empty,
            torch.empty_like(w_hr) if (need_weight and w_hr is not None) else empty,
            w_ih.new_empty(w_ih.shape[0]) if has_bias else empty, torch.empty_like(dh_n), torch.empty_like(dc_n))


def _fwd_lowered(x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reverse, save, backend):
    """The layer as exported programs lower it: the reference's step loop for what backward saves (dropped from an
    inference graph, where nothing reads it), and, without lengths, y, h_n and c_n from ATen's LSTM, which torch's
    ONNX exporter translates to ONNX's LSTM op (as it does for nn.LSTM) and which keeps the sequence length free."""
    outs = _fwd(x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reverse, save, backend)
    if lengths is not None:
        return outs
    weights = [w_ih, w_hh] if bias is None else [w_ih, w_hh, bias, torch.zeros_like(bias)]
    if w_hr is not None:
        weights.append(w_hr)
    y, h_n, c_n = torch.lstm(x.flip(0) if reverse else x, (h0.unsqueeze(0), c0.unsqueeze(0)), weights,
                             bias is not None, 1, 0.0, False, False, False)
    return (y.flip(0) if reverse else y, h_n.squeeze(0), c_n.squeeze(0), *outs[3:])


lstm_layer_fwd = implement("lstm_layer_fwd", _fwd, _fwd_fake, differentiable=True, decomposition=_fwd_lowered)
lstm_layer_bwd = implement("lstm_layer_bwd", _bwd, _bwd_fake)


def _save(a, out):
    y, h_n, c_n, hs, cs, acts, rs = out
    return a.x, a.w_ih, a.w_hh, a.w_hr, hs, cs, acts, rs, a.lengths


def _backward(a, saved, grads, needs):
    x, w_ih, w_hh, w_hr, hs, cs, acts, rs, lengths = saved
    dy, dh_n, dc_n = (g.contiguous() for g in grads[:3])
    has_bias = a.has_bias and needs.bias
    dx, dw_ih, dw_hh, dw_hr, db, dh0, dc0 = lstm_layer_bwd(
        dy, dh_n, dc_n, x, w_ih, w_hh, w_hr, hs, cs, acts, rs, lengths, a.reverse, has_bias, needs.x,
        needs.w_ih or needs.w_hh or needs.w_hr, a.backend)
    return {"x": dx, "w_ih": dw_ih, "w_hh": dw_hh, "bias": db if has_bias else None,
            "w_hr": dw_hr if a.has_w_hr else None, "h0": dh0, "c0": dc0}


# (y, h_n and c_n each feed backward: their unused gradients come as zeros)
autograd("lstm_layer_fwd", _save, _backward, non_differentiable=(3, 4, 5, 6), materialize_grads=True)


# ----------------------------------------------------------------------------------------------- checks
def _per_layer(weights: Sequence[Tensor], num_layers: int, dirs: int, bias: bool, proj_size: int):
    """nn.LSTM's _flat_weights order -> [(w_ih, w_hh, b_ih, b_hh, w_hr)] per (layer, direction)."""
    per = 2 + 2 * bias + (proj_size > 0)
    if len(weights) != num_layers * dirs * per:
        raise ArgumentError(f"{NAME}: expected {num_layers * dirs * per} weight tensors (num_layers={num_layers}, "
                         f"bidirectional={dirs == 2}, bias={bias}, proj_size={proj_size}: nn.LSTM's _flat_weights "
                         f"order), got {len(weights)}")
    out = []
    for k in range(num_layers * dirs):
        ws = list(weights[k * per:(k + 1) * per])
        w_ih, w_hh = ws[0], ws[1]
        b_ih, b_hh = (ws[2], ws[3]) if bias else (None, None)
        w_hr = ws[-1] if proj_size > 0 else None
        out.append((w_ih, w_hh, b_ih, b_hh, w_hr))
    return out


def choose(x: Tensor, T: int, B: int, H: int, P: int, training: bool, op: str) -> str:
    """The backend of one LSTM / LSTMCell call (pydlx/_backend.py): forced, or auto by the GPU's policy (without
    one: cuDNN, the reference)."""
    return _backend.choose("lstm", x.device, registry.LSTMCall(x.dtype, training, T, B, H, P, op == "lstm_cell"), op)


# ----------------------------------------------------------------------------------------------- functional
def lstm(input: Union[Tensor, PackedSequence], weights: Sequence[Tensor],
         hx: Optional[Tuple[Tensor, Tensor]] = None, *, num_layers: int = 1, bias: bool = True,
         batch_first: bool = False, dropout: float = 0.0, training: bool = False, bidirectional: bool = False,
         proj_size: int = 0):
    """``torch.nn.LSTM``'s forward as a function: ``(output, (h_n, c_n))`` for ``input`` (L, N, H_in), (N, L, H_in)
    with batch_first, unbatched (L, H_in), or a PackedSequence; ``weights`` in nn.LSTM's ``_flat_weights`` order
    (per layer and direction: w_ih, w_hh[, b_ih, b_hh][, w_hr]); ``hx`` = (h0, c0) or None (zeros)."""
    packed = isinstance(input, PackedSequence)
    if not packed and not traced() and plain(input, *weights) and (
            hx is None or (type(hx) is tuple and len(hx) == 2 and plain(*hx))):
        key = (metas((input, *weights)), None if hx is None else metas(hx), num_layers,
               bias, batch_first, dropout, training, bidirectional, proj_size, torch.is_grad_enabled(),
               _backend.state())
        plan = _PLANS.get(key)
        if plan is None:
            plan = _PLANS.keep(key, _plan(input, weights, hx, num_layers, bias, batch_first, bidirectional,
                                          proj_size))
        B, H, H_out, unbatched, T, save, backend = plan
        dirs = 2 if bidirectional else 1
        if hx is None:
            h0 = input.new_zeros((num_layers * dirs, B, H_out))
            c0 = input.new_zeros((num_layers * dirs, B, H))
        else:
            h0, c0 = hx
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        return _compute(input, False, input.unsqueeze(1) if unbatched else input, h0, c0, weights, num_layers, bias,
                        batch_first, dropout, training, bidirectional, proj_size, plan)
    _, B, H, H_out, unbatched = _check(input, weights, hx, num_layers, bias, batch_first, bidirectional, proj_size)
    data = input.data if packed else input
    dirs = 2 if bidirectional else 1
    if hx is not None:
        h0, c0 = hx
        if unbatched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        if packed and input.sorted_indices is not None:  # states follow the packed (sorted) batch order
            h0, c0 = h0.index_select(1, input.sorted_indices), c0.index_select(1, input.sorted_indices)
    else:
        h0 = data.new_zeros((num_layers * dirs, B, H_out))
        c0 = data.new_zeros((num_layers * dirs, B, H))
    if unbatched:
        data = data.unsqueeze(1)
    T = int(input.batch_sizes.numel()) if packed else data.shape[1 if (batch_first and not unbatched) else 0]
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (data, h0, c0, *weights))
    plan = (B, H, H_out, unbatched, T, save, choose(data, T, B, H, H_out, save, "lstm"))
    return _compute(input, packed, data, h0, c0, weights, num_layers, bias, batch_first, dropout, training,
                    bidirectional, proj_size, plan)


_PLANS = _backend.Plans()


def _plan(input, weights, hx, num_layers, bias, batch_first, bidirectional, proj_size) -> tuple:
    """What a (not packed) call of ``lstm`` runs, derived once per signature: (B, H, H_out, unbatched, T, save,
    backend)."""
    _, B, H, H_out, unbatched = _check(input, weights, hx, num_layers, bias, batch_first, bidirectional, proj_size)
    T = input.shape[1 if (batch_first and not unbatched) else 0]
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (input, *weights, *(hx or ())))
    x = input.unsqueeze(1) if unbatched else input
    return B, H, H_out, unbatched, T, save, choose(x, T, B, H, H_out, save, "lstm")


def _check(input, weights, hx, num_layers, bias, batch_first, bidirectional, proj_size):
    """``lstm``'s argument checks (torch.nn.LSTM's errors, with its exception types): (per-layer weights, B, H,
    H_out, unbatched)."""
    packed = isinstance(input, PackedSequence)
    data = input.data if packed else input
    if not isinstance(data, Tensor):
        raise TypeError(f"{NAME}: input must be a Tensor or a PackedSequence, got {type(input).__name__}")
    dirs = 2 if bidirectional else 1
    layers = _per_layer(weights, num_layers, dirs, bias, proj_size)
    H = layers[0][1].shape[0] // 4
    H_out = proj_size if proj_size > 0 else H
    in_size = layers[0][0].shape[1]
    if packed:
        if data.dim() != 2:
            raise ArgumentError(f"{NAME}: a PackedSequence's data must be 2-D (sum of lengths, input_size), got "
                             f"{data.dim()}-D")
        unbatched = False
        B = int(input.batch_sizes[0])
    else:
        if data.dim() not in (2, 3):
            raise ArgumentError(f"{NAME}: input must be 3-D (L, N, H_in) / (N, L, H_in) with batch_first, or 2-D "
                             f"unbatched (L, H_in); got {data.dim()}-D")
        unbatched = data.dim() == 2
        B = 1 if unbatched else data.shape[0 if batch_first else 1]
    if data.shape[-1] != in_size:
        raise ArgumentError(f"{NAME}: input.size(-1) must be equal to input_size. Expected {in_size}, got "
                         f"{data.shape[-1]}")
    if not packed and data.shape[1 if (batch_first and not unbatched) else 0] == 0:
        raise ArgumentError(f"{NAME}: expected sequence length to be larger than 0 (as torch.nn.LSTM), got input "
                            f"of shape {tuple(data.shape)}")
    check_floating(NAME, "input", data)
    for k, ws in enumerate(layers):
        for name, t in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"), ws):
            if t is not None:
                check_like(NAME, f"{name} #{k}", t, data)
    if hx is not None:
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError(f"{NAME}: hx must be a tuple (h0, c0), got {type(hx).__name__}")
        h0, c0 = hx
        state_dims = 2 if unbatched else 3
        for name, t, width in (("h0", h0, H_out), ("c0", c0, H)):
            want = (num_layers * dirs, width) if unbatched else (num_layers * dirs, B, width)
            if not isinstance(t, Tensor) or t.dim() != state_dims or tuple(t.shape) != want:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ArgumentError(f"{NAME}: expected {name} of shape {want}, got {got}")
            check_like(NAME, name, t, data)
    return layers, B, H, H_out, unbatched


def _compute(input, packed, data, h0, c0, weights, num_layers, bias, batch_first, dropout, training, bidirectional,
             proj_size, plan):
    """``lstm`` after its checks: ``data`` time- or batch-major with a batch dimension, ``h0`` / ``c0`` [L D, B, *]
    (packed: in the packed batch order), ``plan`` what ``_plan`` derives."""
    B, H, H_out, unbatched, T, save, backend = plan
    dirs = 2 if bidirectional else 1
    batch_sizes = input.batch_sizes if packed else None
    time_major = batch_first and not packed and not unbatched
    if backend == "reference" and ((torch.compiler.is_compiling() and not torch.compiler.is_exporting())
                                   or ref.cpu_16bit(data)):
        # pydlx's per-layer math instead of ATen's LSTM: under torch.compile (AOTAutograd cannot trace ATen's LSTM
        # with gradients, torch 2.14: "expected all tensors_saved_with_vc_check to be Tensors"; torch.export keeps
        # ATen's LSTM, as it does for nn.LSTM, which ONNX translates to its LSTM op), and in 16 bits on
        # a CPU (oneDNN's bf16 RNN needs AVX-512: "could not create a primitive descriptor for the LSTM forward
        # propagation primitive" elsewhere); in fp32 from the 16-bit inputs, outputs rounded once
        dev = data.device.type
        data, h0, c0 = autocast_cast(dev, (data, h0, c0))
        layers = [tuple(autocast_cast(dev, ws)) for ws in _per_layer(weights, num_layers, dirs, bias, proj_size)]
        with torch.autocast(dev, enabled=False):
            out, h_n, c_n = ref.lstm_unrolled(data, batch_sizes, h0, c0, layers, num_layers, dirs, float(dropout),
                                              training, time_major)
    elif backend == "reference":
        out, h_n, c_n = ref.lstm(data, (h0, c0), list(weights), bias, num_layers, float(dropout), training, bidirectional,
                                 time_major, batch_sizes)
    else:
        dev = data.device.type
        data, h0, c0 = autocast_cast(dev, (data, h0, c0))
        layers = [tuple(autocast_cast(dev, ws)) for ws in _per_layer(weights, num_layers, dirs, bias, proj_size)]

        def layer(x, w_ih, w_hh, b_ih, b_hh, w_hr, h0k, c0k, lengths, reverse):
            b = b_ih + b_hh if b_ih is not None else None
            y, h, c, _, _, _, _ = lstm_layer_fwd(x.contiguous(), w_ih, w_hh, b, w_hr, h0k, c0k, lengths, reverse,
                                                 save, backend)
            return y, h, c

        out, h_n, c_n = ref.lstm_layers(data, batch_sizes, h0, c0, layers, num_layers, dirs, float(dropout),
                                        training, time_major, layer)
    if packed:
        if input.unsorted_indices is not None:
            h_n, c_n = h_n.index_select(1, input.unsorted_indices), c_n.index_select(1, input.unsorted_indices)
        return PackedSequence(out, input.batch_sizes, input.sorted_indices, input.unsorted_indices), (h_n, c_n)
    if unbatched:
        return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
    return out, (h_n, c_n)


def lstm_cell(input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``torch.nn.LSTMCell``'s forward as a function: (h_1, c_1) for input (N, H_in) or unbatched (H_in,)."""
    name = "pydlx.ops.lstm_cell"
    if not isinstance(input, Tensor) or input.dim() not in (1, 2):
        got = f"{input.dim()}-D" if isinstance(input, Tensor) else type(input).__name__
        raise ArgumentError(f"{name}: input must be 2-D (N, input_size) or 1-D unbatched, got {got}")
    if input.shape[-1] != w_ih.shape[1]:
        raise ArgumentError(f"{name}: input has {input.shape[-1]} features, expected input_size={w_ih.shape[1]}")
    check_floating(name, "input", input)
    H = w_hh.shape[1]
    unbatched = input.dim() == 1
    x = input.unsqueeze(0) if unbatched else input
    if hx is None:
        h0 = c0 = x.new_zeros((x.shape[0], H))
    else:
        h0, c0 = hx
        for nm, t in (("h0", h0), ("c0", c0)):
            want = (H,) if unbatched else (x.shape[0], H)
            if not isinstance(t, Tensor) or tuple(t.shape) != want:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ArgumentError(f"{name}: expected {nm} of shape {want}, got {got}")
            check_like(name, nm, t, input)
        if unbatched:
            h0, c0 = h0.unsqueeze(0), c0.unsqueeze(0)
    for nm, t in (("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih), ("bias_hh", b_hh)):
        if t is not None:
            check_like(name, nm, t, input)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh))
    backend = choose(x, 1, x.shape[0], H, H, save, "lstm_cell")
    if backend == "reference" and ref.cpu_16bit(x):  # as in lstm(): fp32 math from the 16-bit inputs, any CPU
        b = b_ih.float() + b_hh.float() if b_ih is not None else None
        _, h, c = ref.lstm_layer(x.unsqueeze(0), w_ih, w_hh, b, h0, c0)
    elif backend == "reference":
        h, c = ref.lstm_cell(x, (h0, c0), w_ih, w_hh, b_ih, b_hh)
    else:
        if x.device.type == "cuda":  # autocast lists lstm_cell for CUDA only (on the CPU it stays fp32)
            x, h0, c0, w_ih, w_hh, b_ih, b_hh = autocast_cast("cuda", (x, h0, c0, w_ih, w_hh, b_ih, b_hh))
        b = b_ih + b_hh if b_ih is not None else None
        _, h, c, _, _, _, _ = lstm_layer_fwd(x.unsqueeze(0).contiguous(), w_ih, w_hh, b, None, h0, c0, None,
                                             False, save, backend)
    return (h.squeeze(0), c.squeeze(0)) if unbatched else (h, c)
