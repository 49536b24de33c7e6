"""Reference LSTM: eager PyTorch. ``lstm``/``lstm_cell`` are ATen's own (what torch.nn.LSTM runs: cuDNN on GPUs),
the CPU fallback and the `auto` path; ``lstm_layer`` is the per-layer math that pydlx's kernels implement, spelled
out step by step (time-major, per-sequence lengths by masking, the reverse direction starting at each sequence's
own last step): the readable oracle of the decomposition, checked against torch.nn.LSTM in the tests.
``lstm_layers`` runs a multi-layer (bidirectional, packed, dropout) LSTM from any such per-layer function: the
kernels' layer op (pydlx/ops/lstm.py) or ``lstm_layer`` itself (``lstm_unrolled``: the reference backend under
torch.compile, and in 16 bits on a CPU, where ATen's LSTM goes to oneDNN, whose bf16 RNN needs AVX-512)."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def lstm(input: Tensor, hx: Tuple[Tensor, Tensor], weights: List[Tensor], bias: bool, num_layers: int,
         dropout: float, training: bool, bidirectional: bool, batch_first: bool,
         batch_sizes: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(output, h_n, c_n) from ATen's LSTM; with batch_sizes, input is a PackedSequence's data."""
    if batch_sizes is None:
        return torch.lstm(input, hx, weights, bias, num_layers, dropout, training, bidirectional, batch_first)
    return torch.lstm(input, batch_sizes, hx, weights, bias, num_layers, dropout, training, bidirectional)


def lstm_cell(input: Tensor, hx: Tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
              b_hh: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return torch.lstm_cell(input, hx, w_ih, w_hh, b_ih, b_hh)


def lstm_layer(x: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor], h0: Tensor, c0: Tensor,
               lengths: Optional[Tensor] = None, reverse: bool = False, w_hr: Optional[Tensor] = None
               ) -> Tuple[Tensor, Tensor, Tensor]:
    """(y [T, B, P], h_n, c_n) for time-major x [T, B, I]; rows past their length keep h, c and output 0; w_hr
    [P, H] projects h (proj_size = P), else P = H. 16-bit inputs are computed in fp32 (as pydlx's kernels compute
    them), the outputs rounded to the input's dtype once."""
    if x.dtype in (torch.float16, torch.bfloat16):
        up = [t.float() if t is not None else None for t in (x, w_ih, w_hh, bias, h0, c0, w_hr)]
        y, h, c = lstm_layer(*up[:6], lengths, reverse, up[6])
        return y.to(x.dtype), h.to(x.dtype), c.to(x.dtype)
    T = x.shape[0]
    G = x @ w_ih.t() + (bias if bias is not None else 0)
    h, c = h0, c0
    ys = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        i, f, g, o = (G[t] + h @ w_hh.t()).chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        if lengths is None:
            h, c, ys[t] = h_new, c_new, h_new
        else:
            on = (t < lengths).unsqueeze(-1)
            h, c = torch.where(on, h_new, h), torch.where(on, c_new, c)
            ys[t] = torch.where(on, h_new, torch.zeros_like(h_new))
    return torch.stack(ys) if T else x.new_empty((0, *h0.shape)), h, c


_16BIT = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------- the layer's recurrence
def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the cell states and gate activations a layer keeps: fp32 (float64 for float64 input)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def supports(call, device) -> Optional[str]:
    return None  # eager PyTorch runs any layer


def lstm_fwd(G: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor, lengths: Optional[Tensor], reverse: bool, save: bool,
             path: Optional[str] = None, w_hr: Optional[Tensor] = None
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The recurrence of one layer, step by step, with the buffers and signature of pydlx/triton/lstm.py's
    ``lstm_fwd`` (see there; ``path`` is ignored): (y [T, B, P], hs [T+1, B, P], cs [T+1, B, H], acts [T, B, 4H] the
    gate activations i, f, g, o when ``save``, rs [T, B, H] the unprojected o tanh(c) with a projection). The forward
    direction reads step t's state from slot t and writes slot t + 1, the reverse one reads slot t + 1 and writes
    slot t; a row whose sequence has ended keeps its h and c and outputs 0."""
    T, B, H4 = G.shape
    H, P = H4 // 4, w_hh.shape[1]
    md = state_dtype(G.dtype)
    # (steps collected and stacked, not written into buffers: the math stays functional, so that the op's
    # decomposition traces to a graph torch.export and the ONNX exporter accept)
    hs, cs = [None] * (T + 1), [None] * (T + 1)
    y, acts, rs = [None] * T, [None] * T, [None] * T
    first = T if reverse else 0
    hs[first], cs[first] = h0.to(G.dtype), c0.to(md)
    w = w_hh.to(md).t()
    on = None
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        prev, nxt = (t + 1, t) if reverse else (t, t + 1)
        i, f, g, o = (G[t].to(md) + hs[prev].to(md) @ w).chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * cs[prev] + i * g
        r = o * torch.tanh(c)
        h = (r.to(G.dtype) @ w_hr.t()) if w_hr is not None else r.to(G.dtype)
        if lengths is not None:
            on = (t < lengths).unsqueeze(-1)
        hs[nxt] = h if on is None else torch.where(on, h, hs[prev])
        cs[nxt] = c if on is None else torch.where(on, c, cs[prev])
        y[t] = h if on is None else torch.where(on, h, torch.zeros_like(h))
        if save:
            acts[t] = torch.cat((i, f, g, o), dim=-1)
        if w_hr is not None:
            rs[t] = r.to(G.dtype)

    def stacked(steps, shape, dtype):
        return torch.stack(steps) if steps else G.new_empty(shape, dtype=dtype)
    return (stacked(y, (0, B, P), G.dtype), torch.stack(hs), torch.stack(cs),
            stacked(acts, (0, B, 4 * H), md) if save else G.new_empty(0, dtype=md),
            stacked(rs, (0, B, H), G.dtype) if w_hr is not None else G.new_empty(0))


def lstm_bwd(dy: Tensor, dh_n: Tensor, dc_n: Tensor, acts: Tensor, cs: Tensor, w_hh: Tensor,
             lengths: Optional[Tensor], reverse: bool, w_hr: Optional[Tensor] = None
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward through time of ``lstm_fwd``, with pydlx/triton/lstm.py's ``lstm_bwd`` signature: (dz [T, B, 4H]
    the gradient of the pre-activation gates in w_hh's dtype, dh0 [B, P], dc0 [B, H] in the state dtype, dht
    [T, B, P]: dL/dh_t with a projection, else empty). Rows past their sequence's end pass dh and dc through and
    have dz = 0."""
    T, B, H4 = acts.shape
    H, P = H4 // 4, w_hh.shape[1]
    md = acts.dtype
    dz = w_hh.new_empty((T, B, 4 * H))
    dht = w_hh.new_empty((T, B, P)) if w_hr is not None else w_hh.new_empty(0)
    dh, dc = dh_n.to(md), dc_n.to(md)
    w, wr = w_hh.to(md), (w_hr.to(md) if w_hr is not None else None)
    on = None
    for t in (range(T) if reverse else range(T - 1, -1, -1)):  # the forward's steps, last first
        prev, nxt = (t + 1, t) if reverse else (t, t + 1)
        i, f, g, o = acts[t].chunk(4, dim=-1)
        d_h = dh + dy[t].to(md)
        dr = d_h @ wr if wr is not None else d_h
        tc = torch.tanh(cs[nxt])
        d_c = dc + dr * o * ((1 - tc) * (1 + tc))
        dzt = torch.cat((d_c * g * i * (1 - i), d_c * cs[prev] * f * (1 - f), d_c * i * ((1 - g) * (1 + g)),
                         dr * tc * o * (1 - o)), dim=-1)
        if lengths is not None:
            on = (t < lengths).unsqueeze(-1)
            dzt = torch.where(on, dzt, torch.zeros_like(dzt))
        dz[t] = dzt
        if wr is not None:
            dht[t] = d_h if on is None else torch.where(on, d_h, torch.zeros_like(d_h))
        dh = dzt @ w if on is None else torch.where(on, dzt @ w, dh)
        dc = d_c * f if on is None else torch.where(on, d_c * f, dc)
    return dz, dh, dc, dht


def packed_layout(batch_sizes: Tensor, device) -> Tuple[int, int, Tensor, Tensor]:
    """(T, B, flat row of each packed row in a [T * B] time-major padded buffer, lengths int32 [B]) from a
    PackedSequence's (CPU) batch_sizes; the batch stays in the packed (sorted) order."""
    bs = batch_sizes.to("cpu", torch.int64)
    T, B = bs.numel(), int(bs[0])
    t_idx = torch.repeat_interleave(torch.arange(T), bs)
    offsets = torch.cumsum(bs, 0) - bs
    j_idx = torch.arange(int(bs.sum())) - torch.repeat_interleave(offsets, bs)
    lengths = (bs.unsqueeze(1) > torch.arange(B).unsqueeze(0)).sum(0).to(torch.int32)
    return T, B, (t_idx * B + j_idx).to(device), lengths.to(device)


# layer(x [T, B, I], w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, lengths or None, reverse) -> (y, h_n, c_n)
Layer = Callable[..., Tuple[Tensor, Tensor, Tensor]]


def lstm_layers(data: Tensor, batch_sizes: Optional[Tensor], h0: Tensor, c0: Tensor, layers: Sequence[tuple],
                num_layers: int, dirs: int, dropout: float, training: bool, batch_first: bool, layer: Layer
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """(output, h_n, c_n) of a multi-layer LSTM from a per-layer function; ``layers[k]`` = (w_ih, w_hh, b_ih,
    b_hh, w_hr) for layer k // dirs, direction k % dirs; a PackedSequence's data is padded time-major and its
    lengths masked, not re-batched."""
    lengths = None
    if batch_sizes is not None:
        T, B, flat_rows, lengths = packed_layout(batch_sizes, data.device)
        x = data.new_zeros((T * B, data.shape[-1])).index_copy(0, flat_rows, data).view(T, B, -1)
    else:
        x = data.transpose(0, 1) if batch_first else data
    h_n, c_n = [], []
    for li in range(num_layers):
        outs = []
        for d in range(dirs):
            k = li * dirs + d
            y, h, c = layer(x, *layers[k], h0[k], c0[k], lengths, d == 1)
            outs.append(y)
            h_n.append(h)
            c_n.append(c)
        x = torch.cat(outs, dim=-1) if dirs == 2 else outs[0]
        if dropout > 0 and training and li < num_layers - 1:
            x = torch.nn.functional.dropout(x, dropout, training=True)
    if lengths is not None:
        out = x.reshape(-1, x.shape[-1]).index_select(0, flat_rows)
    else:
        out = x.transpose(0, 1) if batch_first else x
    return out, torch.stack(h_n), torch.stack(c_n)


def _unrolled_layer(x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, lengths, reverse):
    math_dtype = lambda t: torch.float32 if t.dtype in _16BIT else t.dtype  # noqa: E731
    b = b_ih.to(math_dtype(b_ih)) + b_hh.to(math_dtype(b_hh)) if b_ih is not None else None
    return lstm_layer(x, w_ih, w_hh, b, h0, c0, lengths, reverse, w_hr)


def lstm_unrolled(data: Tensor, batch_sizes: Optional[Tensor], h0: Tensor, c0: Tensor, layers: Sequence[tuple],
                  num_layers: int, dirs: int, dropout: float, training: bool, batch_first: bool
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """``lstm_layers`` over ``lstm_layer`` (16-bit inputs computed in fp32)."""
    return lstm_layers(data, batch_sizes, h0, c0, layers, num_layers, dirs, dropout, training, batch_first,
                       _unrolled_layer)


def cpu_16bit(x: Tensor) -> bool:
    """A CPU call computed in 16 bits: 16-bit tensors, or CPU autocast to a 16-bit dtype (oneDNN's bf16 RNN, which
    ATen's LSTM would run, needs AVX-512)."""
    return x.device.type == "cpu" and (x.dtype in _16BIT or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in _16BIT))
