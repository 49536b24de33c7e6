"""``pydlx.ops.lstm`` / ``pydlx.ops.lstm_cell``: torch.nn.LSTM / LSTMCell as functions, on pydlx's kernels.

Ops (schemas defined once, here), one layer in one direction, time-major:
  pydlx::lstm_layer_fwd(x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reverse, save, kernel)
      -> (y, h_n, c_n, hs, cs, acts, rs); kernel: "triton" or "cuda"; w_hr [P, H] a projection (proj_size P) or
      None; with it h, y and hs are P wide and rs [T, B, H] saves the unprojected o * tanh(c)
      x [T, B, I]; bias = b_ih + b_hh or None; lengths int32 [B] (packed input) or None; y [T, B, H] (0 past a
      sequence's end); hs [T+1, B, H], cs [T+1, B, H] fp32 and acts [T, B, 4H] fp32 (the gate activations) are
      saved for backward (non-differentiable outputs).
  pydlx::lstm_layer_bwd(dy, dh_n, dc_n, x, w_ih, w_hh, w_hr, hs, cs, acts, rs, lengths, reverse, has_bias,
      need_input, need_weight, kernel) -> (dx, dw_ih, dw_hh, dw_hr, db, dh0, dc0)
The Triton path (pydlx/triton/lstm.py): the input projection of all steps as one GEMM, then the recurrence as one
sequence launch (or one launch a step); backward through time in one launch with fused pointwise gradients, then
the weight gradients as GEMMs over all steps. Layers, directions, inter-layer dropout, batch_first, unbatched input
and PackedSequence (per-sequence lengths: a mask per step, no re-batching) are handled here, around the ops.
The cuda backend runs csrc/lstm.cu's persistent kernels instead (W_hh split across the SMs and kept in shared
memory for the whole sequence, one grid-wide sync per step; cuBLAS for the GEMMs over all steps).
`auto` runs ATen's LSTM (cuDNN on GPUs) until GPU measurements say where the kernels win (bench/NOTES.md); the
triton and cuda backends, forced, run the kernels (projections, proj_size > 0: triton only, sequence launches).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from .. import _backend
from ._common import ArgumentError, DtypeError, FLOAT_DTYPES, autocast_cast, why_not_kernel_dtype
from ..reference import lstm as ref

NAME = "pydlx.ops.lstm"


# ----------------------------------------------------------------------------------------------- layer ops
@torch.library.custom_op("pydlx::lstm_layer_fwd", mutates_args=())
def lstm_layer_fwd(x: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor], w_hr: Optional[Tensor],
                   h0: Tensor, c0: Tensor, lengths: Optional[Tensor], reverse: bool, save: bool, kernel: str
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    T, B, I = x.shape
    H = w_hh.shape[0] // 4
    if kernel == "cuda":  # cuBLAS input projection + csrc/lstm.cu's persistent recurrence (no projections)
        G = torch.nn.functional.linear(x.reshape(T * B, I), w_ih, bias).view(T, B, 4 * H)
        y, hs, cs, acts = torch.ops.pydlx.lstm_seq_fwd_cuda(G, w_hh, h0, c0, lengths, reverse, save)
        rs = x.new_empty(0)
    else:
        from ..triton import linear as tri_linear
        from ..triton import lstm as tri

        G = tri_linear.linear_fwd(x.reshape(T * B, I), w_ih, bias, None, False)[0].view(T, B, 4 * H)
        y, hs, cs, acts, rs = tri.lstm_fwd(G, w_hh, h0, c0, lengths, reverse, save, w_hr=w_hr)
    final = 0 if reverse else T
    return y, hs[final].clone(), cs[final].to(x.dtype, copy=True), hs, cs, acts, rs


@lstm_layer_fwd.register_fake
def _(x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reverse, save, kernel):
    T, B, _ = x.shape
    H, P = w_hh.shape[0] // 4, w_hh.shape[1]
    f32 = dict(dtype=torch.float32)
    return (x.new_empty((T, B, P)), x.new_empty((B, P)), x.new_empty((B, H)), x.new_empty((T + 1, B, P)),
            x.new_empty((T + 1, B, H), **f32), x.new_empty((T, B, 4 * H), **f32) if save else x.new_empty(0, **f32),
            x.new_empty((T, B, H)) if w_hr is not None else x.new_empty(0))


@torch.library.custom_op("pydlx::lstm_layer_bwd", mutates_args=())
def lstm_layer_bwd(dy: Tensor, dh_n: Tensor, dc_n: Tensor, x: Tensor, w_ih: Tensor, w_hh: Tensor,
                   w_hr: Optional[Tensor], hs: Tensor, cs: Tensor, acts: Tensor, rs: Tensor,
                   lengths: Optional[Tensor], reverse: bool, has_bias: bool, need_input: bool, need_weight: bool,
                   kernel: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    T, B, I = x.shape
    H, P = w_hh.shape[0] // 4, w_hh.shape[1]
    x2 = x.reshape(T * B, I)
    h_prev = (hs[1:] if reverse else hs[:T]).reshape(T * B, P)
    empty = lambda: x.new_empty(0)  # noqa: E731  (a fresh one per output: outputs must not alias)
    dw_hh = dw_hr = None
    # backward through time, then the weight gradients and dx as GEMMs over all T*B rows at once
    if kernel == "cuda":
        dz, dh0, dc0 = torch.ops.pydlx.lstm_seq_bwd_cuda(dy, dh_n, dc_n, acts, cs, w_hh, lengths, reverse)
        dz2 = dz.view(T * B, 4 * H)
        dx = dz2 @ w_ih if need_input else None
        dw_ih = dz2.t() @ x2 if need_weight else None
        db = dz2.sum(0, dtype=torch.float32).to(x.dtype) if has_bias else None
        if need_weight:
            dw_hh = dz2.t() @ h_prev
    else:
        from ..triton import linear as tri_linear
        from ..triton import lstm as tri

        dz, dh0, dc0, dht = tri.lstm_bwd(dy, dh_n, dc_n, acts, cs, w_hh, lengths, reverse, w_hr=w_hr)
        dz2 = dz.view(T * B, 4 * H)
        dx, dw_ih, db = tri_linear.linear_bwd(dz2, x2, w_ih, dz2, None, has_bias, need_input, need_weight)
        if need_weight:
            dw_hh = tri_linear.linear_bwd(dz2, h_prev, w_hh, dz2, None, False, False, True)[1]
            if w_hr is not None:  # dW_hr = sum_t dL/dh_t^T r_t
                dht2 = dht.view(T * B, P)
                dw_hr = tri_linear.linear_bwd(dht2, rs.reshape(T * B, H), w_hr, dht2, None, False, False, True)[1]
    return (dx.view(T, B, I) if need_input else empty(), dw_ih if need_weight else empty(),
            dw_hh if dw_hh is not None else empty(), dw_hr if dw_hr is not None else empty(),
            db if has_bias else empty(), dh0.to(x.dtype), dc0.to(x.dtype))


@lstm_layer_bwd.register_fake
def _(dy, dh_n, dc_n, x, w_ih, w_hh, w_hr, hs, cs, acts, rs, lengths, reverse, has_bias, need_input, need_weight,
      kernel):
    empty = x.new_empty(0)
    return (torch.empty_like(x) if need_input else empty, torch.empty_like(w_ih) if need_weight else empty,
            torch.empty_like(w_hh) if need_weight else empty,
            torch.empty_like(w_hr) if (need_weight and w_hr is not None) else empty,
            w_ih.new_empty(w_ih.shape[0]) if has_bias else empty, torch.empty_like(dh_n), torch.empty_like(dc_n))


def _setup_context(ctx, inputs, output):
    x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reverse, save, kernel = inputs
    y, h_n, c_n, hs, cs, acts, rs = output
    ctx.mark_non_differentiable(hs, cs, acts, rs)
    ctx.save_for_backward(x, w_ih, w_hh, w_hr, hs, cs, acts, rs, lengths)
    ctx.args = (reverse, bias is not None, kernel)


def _backward(ctx, dy, dh_n, dc_n, _dhs, _dcs, _dacts, _drs):
    x, w_ih, w_hh, w_hr, hs, cs, acts, rs, lengths = ctx.saved_tensors
    reverse, has_bias, kernel = ctx.args
    need_x, need_wih, need_whh, need_b, need_whr, need_h0, need_c0 = ctx.needs_input_grad[:7]
    dx, dw_ih, dw_hh, dw_hr, db, dh0, dc0 = lstm_layer_bwd(
        dy.contiguous(), dh_n.contiguous(), dc_n.contiguous(), x, w_ih, w_hh, w_hr, hs, cs, acts, rs, lengths,
        reverse, has_bias and need_b, need_x, need_wih or need_whh or need_whr, kernel)
    return (dx if need_x else None, dw_ih if need_wih else None, dw_hh if need_whh else None,
            db if (has_bias and need_b) else None, dw_hr if (w_hr is not None and need_whr) else None,
            dh0 if need_h0 else None, dc0 if need_c0 else None, None, None, None, None)


torch.library.register_autograd("pydlx::lstm_layer_fwd", _backward, setup_context=_setup_context)


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


def _check_tensor(name: str, t: Tensor, like: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise DtypeError(f"{NAME}: {name} must be a floating-point tensor, got {t.dtype}")
    if t.dtype != like.dtype:
        raise DtypeError(f"{NAME}: {name} has dtype {t.dtype} but input has {like.dtype}")
    if t.device != like.device:
        raise ArgumentError(f"{NAME}: {name} is on {t.device} but input is on {like.device}")


_16BIT = (torch.float16, torch.bfloat16)


def cpu_16bit(x: Tensor) -> bool:
    """A CPU call computed in 16 bits: 16-bit tensors, or CPU autocast to a 16-bit dtype."""
    return x.device.type == "cpu" and (x.dtype in _16BIT or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in _16BIT))


def _math_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in _16BIT else t.dtype


def _align16(n: int) -> int:
    return (n + 15) // 16 * 16


def cuda_smem_bytes(H: int, elt: int, sms: int) -> int:
    """Shared memory a block of csrc/lstm.cu's persistent kernels needs (the larger of forward and backward):
    ceil(H / SMs) hidden units a block, their W_hh rows (forward) or columns (backward) plus the staged h / dz."""
    HB = -(-H // sms)
    r4 = lambda v: -(-v // 4) * 4  # noqa: E731
    fwd = _align16(elt * 4 * HB * r4(H)) + 4 * 8 * r4(H)
    bwd = _align16(elt * HB * 4 * H) + 4 * 4 * 4 * H
    return max(fwd, bwd)


def _why_not_triton(x: Tensor, B: int, H: int, P: int) -> Optional[str]:
    why = why_not_kernel_dtype(x)
    if why is not None:
        return why
    from ..triton import lstm as tri  # (choose() has checked that triton imports)
    return tri.why_too_large(B, H, P)


def _why_not_cuda(x: Tensor, proj_size: int, H: int) -> Optional[str]:
    if proj_size > 0:
        return "proj_size > 0 is not supported by the C++/CUDA LSTM kernel (auto runs cuDNN for it)"
    why = why_not_kernel_dtype(x)
    if why is not None:
        return why
    props = torch.cuda.get_device_properties(x.device)
    need = cuda_smem_bytes(H, x.element_size(), props.multi_processor_count)
    if need > props.shared_memory_per_block_optin:
        return (f"hidden_size {H} does not fit the persistent kernel: W_hh split over {props.multi_processor_count} "
                f"SMs needs {need} bytes of shared memory a block, the GPU has "
                f"{props.shared_memory_per_block_optin}; the triton backend takes it")
    return None


# ----------------------------------------------------------------------------------------------- functional
def lstm(input: Union[Tensor, PackedSequence], weights: Sequence[Tensor],
         hx: Optional[Tuple[Tensor, Tensor]] = None, *, num_layers: int = 1, bias: bool = True,
         batch_first: bool = False, dropout: float = 0.0, training: bool = False, bidirectional: bool = False,
         proj_size: int = 0):
    """``torch.nn.LSTM``'s forward as a function: ``(output, (h_n, c_n))`` for ``input`` (L, N, H_in), (N, L, H_in)
    with batch_first, unbatched (L, H_in), or a PackedSequence; ``weights`` in nn.LSTM's ``_flat_weights`` order
    (per layer and direction: w_ih, w_hh[, b_ih, b_hh][, w_hr]); ``hx`` = (h0, c0) or None (zeros)."""
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
    if data.dtype not in FLOAT_DTYPES:
        raise DtypeError(f"{NAME}: input must be a floating-point tensor, got {data.dtype}")
    for k, ws in enumerate(layers):
        for name, t in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"), ws):
            if t is not None:
                _check_tensor(f"{name} #{k}", t, data)
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
            _check_tensor(name, t, data)
        if unbatched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        if packed and input.sorted_indices is not None:  # states follow the packed (sorted) batch order
            h0, c0 = h0.index_select(1, input.sorted_indices), c0.index_select(1, input.sorted_indices)
    else:
        h0 = data.new_zeros((num_layers * dirs, B, H_out))
        c0 = data.new_zeros((num_layers * dirs, B, H))
    if unbatched:
        data = data.unsqueeze(1)

    backend = _backend.choose("lstm", data, lambda t: (), extra_check={
        "triton": lambda: _why_not_triton(data, B, H, H_out),
        "cuda": lambda: _why_not_cuda(data, proj_size, H)})
    flat = [t for ws in layers for t in ws if t is not None]
    if backend == "reference" and (torch.compiler.is_compiling() or cpu_16bit(data)):
        # The per-layer math of pydlx.reference.lstm.lstm_layer, unrolled over the steps, instead of ATen's LSTM:
        # * under torch.compile: AOTAutograd cannot trace ATen's LSTM with gradients (torch 2.14: "expected all
        #   tensors_saved_with_vc_check to be Tensors");
        # * in 16 bits on a CPU (bf16/fp16 weights, or CPU autocast): ATen's goes to oneDNN, whose bf16 RNN needs
        #   AVX-512 ("could not create a primitive descriptor for the LSTM forward propagation primitive"
        #   elsewhere); this one runs on any CPU, in fp32 from the 16-bit inputs, outputs rounded once.
        dev = data.device.type
        data, h0, c0 = autocast_cast(dev, (data, h0, c0))
        layers = [tuple(autocast_cast(dev, ws)) for ws in layers]
        with torch.autocast(dev, enabled=False):
            out, h_n, c_n = _lstm_kernels(data, input.batch_sizes if packed else None, h0, c0, layers, num_layers,
                                          dirs, float(dropout), training,
                                          batch_first and not packed and not unbatched, "unrolled")
    elif backend == "reference":
        out, h_n, c_n = ref.lstm(data, (h0, c0), flat, bias, num_layers, float(dropout), training, bidirectional,
                                 batch_first and not packed and not unbatched,
                                 input.batch_sizes if packed else None)
    else:
        dev = data.device.type
        data, h0, c0 = autocast_cast(dev, (data, h0, c0))
        layers = [tuple(autocast_cast(dev, ws)) for ws in layers]
        out, h_n, c_n = _lstm_kernels(data, input.batch_sizes if packed else None, h0, c0, layers, num_layers, dirs,
                                      float(dropout), training, batch_first and not packed and not unbatched,
                                      backend)
    if packed:
        if input.unsorted_indices is not None:
            h_n, c_n = h_n.index_select(1, input.unsorted_indices), c_n.index_select(1, input.unsorted_indices)
        return PackedSequence(out, input.batch_sizes, input.sorted_indices, input.unsorted_indices), (h_n, c_n)
    if unbatched:
        return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
    return out, (h_n, c_n)


def _packed_layout(batch_sizes: Tensor, device) -> Tuple[int, int, Tensor, Tensor]:
    """(T, B, flat row of each packed row in a [T * B] time-major padded buffer, lengths int32 [B]) from a
    PackedSequence's (CPU) batch_sizes; the batch stays in the packed (sorted) order."""
    bs = batch_sizes.to("cpu", torch.int64)
    T, B = bs.numel(), int(bs[0])
    t_idx = torch.repeat_interleave(torch.arange(T), bs)
    offsets = torch.cumsum(bs, 0) - bs
    j_idx = torch.arange(int(bs.sum())) - torch.repeat_interleave(offsets, bs)
    lengths = (bs.unsqueeze(1) > torch.arange(B).unsqueeze(0)).sum(0).to(torch.int32)
    return T, B, (t_idx * B + j_idx).to(device), lengths.to(device)


def _lstm_kernels(data: Tensor, batch_sizes, h0: Tensor, c0: Tensor, layers, num_layers: int, dirs: int,
                  dropout: float, training: bool, batch_first: bool, kernel: str):
    lengths = None
    if batch_sizes is not None:
        T, B, flat_rows, lengths = _packed_layout(batch_sizes, data.device)
        x = data.new_zeros((T * B, data.shape[-1])).index_copy(0, flat_rows, data).view(T, B, -1)
    else:
        x = data.transpose(0, 1) if batch_first else data
    save = torch.is_grad_enabled() and any(
        t.requires_grad for t in (data, h0, c0, *[w for ws in layers for w in ws if w is not None]))
    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            w_ih, w_hh, b_ih, b_hh, w_hr = layers[k]
            if b_ih is None:
                b = None
            elif kernel == "unrolled":  # (the per-layer math runs in fp32 or fp64: sum the biases there)
                b = b_ih.to(_math_dtype(b_ih)) + b_hh.to(_math_dtype(b_hh))
            else:
                b = b_ih + b_hh
            if kernel == "unrolled":
                y, h, c = ref.lstm_layer(x, w_ih, w_hh, b, h0[k], c0[k], lengths, d == 1, w_hr)
            else:
                y, h, c, _, _, _, _ = lstm_layer_fwd(x.contiguous(), w_ih, w_hh, b, w_hr, h0[k], c0[k], lengths,
                                                     d == 1, save, kernel)
            outs.append(y)
            h_n.append(h)
            c_n.append(c)
        x = torch.cat(outs, dim=-1) if dirs == 2 else outs[0]
        if dropout > 0 and training and layer < num_layers - 1:
            x = torch.nn.functional.dropout(x, dropout, training=True)
    if lengths is not None:
        out = x.reshape(-1, x.shape[-1]).index_select(0, flat_rows)
    else:
        out = x.transpose(0, 1) if batch_first else x
    return out, torch.stack(h_n), torch.stack(c_n)


def lstm_cell(input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``torch.nn.LSTMCell``'s forward as a function: (h_1, c_1) for input (N, H_in) or unbatched (H_in,)."""
    name = "pydlx.ops.lstm_cell"
    if not isinstance(input, Tensor) or input.dim() not in (1, 2):
        got = f"{input.dim()}-D" if isinstance(input, Tensor) else type(input).__name__
        raise ArgumentError(f"{name}: input must be 2-D (N, input_size) or 1-D unbatched, got {got}")
    if input.shape[-1] != w_ih.shape[1]:
        raise ArgumentError(f"{name}: input has {input.shape[-1]} features, expected input_size={w_ih.shape[1]}")
    if input.dtype not in FLOAT_DTYPES:
        raise DtypeError(f"{name}: input must be a floating-point tensor, got {input.dtype}")
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
            _check_tensor(nm, t, input)
        if unbatched:
            h0, c0 = h0.unsqueeze(0), c0.unsqueeze(0)
    for nm, t in (("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih), ("bias_hh", b_hh)):
        if t is not None:
            _check_tensor(nm, t, input)
    backend = _backend.choose("lstm_cell", x, lambda t: (), extra_check={
        "triton": lambda: _why_not_triton(x, x.shape[0], H, H),
        "cuda": lambda: "the C++/CUDA LSTM kernel is for whole sequences (pydlx.nn.LSTM); cells run on triton"})
    if backend == "reference" and cpu_16bit(x):  # as in lstm(): fp32 math from the 16-bit inputs, any CPU
        b = b_ih.float() + b_hh.float() if b_ih is not None else None
        _, h, c = ref.lstm_layer(x.unsqueeze(0), w_ih, w_hh, b, h0, c0)
    elif backend == "reference":
        h, c = ref.lstm_cell(x, (h0, c0), w_ih, w_hh, b_ih, b_hh)
    else:
        if x.device.type == "cuda":  # autocast lists lstm_cell for CUDA only (on the CPU it stays fp32)
            x, h0, c0, w_ih, w_hh, b_ih, b_hh = autocast_cast("cuda", (x, h0, c0, w_ih, w_hh, b_ih, b_hh))
        b = b_ih + b_hh if b_ih is not None else None
        save = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                               for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh))
        _, h, c, _, _, _, _ = lstm_layer_fwd(x.unsqueeze(0).contiguous(), w_ih, w_hh, b, None, h0, c0, None,
                                             False, save, "triton")
    return (h.squeeze(0), c.squeeze(0)) if unbatched else (h, c)
