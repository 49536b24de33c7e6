"""Reference LSTM: eager PyTorch. ``lstm``/``lstm_cell`` are ATen's own (what torch.nn.LSTM runs: cuDNN on GPUs),
the CPU fallback and the `auto` path; ``lstm_layer`` is the per-layer math that pydlx's kernels implement, spelled
out step by step (time-major, per-sequence lengths by masking, the reverse direction starting at each sequence's
own last step): the readable oracle of the decomposition, checked against torch.nn.LSTM in the tests."""
from __future__ import annotations

from typing import List, Optional, Tuple

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
