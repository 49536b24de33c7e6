"""``pydlx.nn.LSTM`` / ``pydlx.nn.LSTMCell``: torch.nn.LSTM / LSTMCell on pydlx's kernels.

Constructor arguments, parameters (names, shapes, initialisation: the same random draws), state_dict, inputs
(batched, unbatched, (h0, c0), PackedSequence) and outputs are torch.nn's; only forward differs. ``LSTM`` is an
``nn.RNNBase`` built exactly as ``nn.LSTM`` builds itself (mode "LSTM") but not an ``nn.LSTM`` subclass:
torch.compile refuses to trace ``nn.LSTM`` instances (Dynamo's "Attempted to wrap RNN, GRU, or LSTM") and pydlx's
forward is traceable. ``LSTMCell`` subclasses ``nn.LSTMCell``.
"""
from __future__ import annotations

from torch import nn

from ..ops.lstm import lstm, lstm_cell


def _adopt(cls, module: nn.Module, base: type, name: str):
    """A ``cls`` that shares ``module``'s parameters and settings (no copy)."""
    if not isinstance(module, base):
        raise TypeError(f"pydlx.nn.{name}.from_module: expected an nn.{name}, got {type(module).__name__}")
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    return new


class LSTM(nn.RNNBase):
    """``torch.nn.LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, proj_size=0, device=None, dtype=None)``, computed by ``pydlx.ops.lstm``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None) -> None:
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device, dtype)

    @classmethod
    def from_module(cls, module: nn.LSTM) -> "LSTM":
        """A pydlx LSTM sharing ``module``'s parameters and settings (no copy)."""
        return _adopt(cls, module, nn.LSTM, "LSTM")

    def forward(self, input, hx=None):
        self._update_flat_weights()  # as nn.LSTM does: a parameter replaced since (e.g. load_state_dict(assign=True))
        return lstm(input, self._flat_weights, hx, num_layers=self.num_layers, bias=self.bias,
                    batch_first=self.batch_first, dropout=self.dropout, training=self.training,
                    bidirectional=self.bidirectional, proj_size=self.proj_size)


class LSTMCell(nn.LSTMCell):
    """``torch.nn.LSTMCell(input_size, hidden_size, bias=True, device=None, dtype=None)``, computed by
    ``pydlx.ops.lstm_cell``."""

    @classmethod
    def from_module(cls, module: nn.LSTMCell) -> "LSTMCell":
        """A pydlx LSTMCell sharing ``module``'s parameters (no copy)."""
        return _adopt(cls, module, nn.LSTMCell, "LSTMCell")

    def forward(self, input, hx=None):
        return lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
