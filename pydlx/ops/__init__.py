"""Functional pydlx ops. Each is a torch.library op with a fake impl and autograd (pydlx/ops/<family>.py)."""
from .conv_relu_pool import conv_act_pool2d, conv_bn_act_pool2d, conv_relu_pool2d
from .linear import linear, linear_batchnorm
from .lstm import lstm, lstm_cell
from .mlp import mlp

__all__ = ["conv_act_pool2d", "conv_bn_act_pool2d", "conv_relu_pool2d", "linear", "linear_batchnorm", "lstm", "lstm_cell",
           "mlp"]
