"""Drop-in nn.Module replacements; each holds torch.nn's parameters and calls one pydlx op."""
from .conv_relu_pool import ConvReLUPool2d
from .linear import Linear
from .lstm import LSTM, LSTMCell
from .mlp import MLP

__all__ = ["ConvReLUPool2d", "Linear", "LSTM", "LSTMCell", "MLP"]
