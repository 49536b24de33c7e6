"""The functional pydlx ops. Each entry point checks its arguments, asks the dispatcher which backend runs the call
(pydlx/_backend.py) and calls its torch.library op (schemas: pydlx/ops/schemas.py; implementation, fake and autograd:
pydlx/ops/<family>.py) -- except under ``auto`` on CPU tensors, where it runs the reference (plain eager PyTorch,
the fastest there) directly."""
from .conv_relu_pool import conv_act_pool2d, conv_bn_act_pool2d, conv_relu_pool2d
from .linear import linear, linear_batchnorm
from .lstm import lstm, lstm_cell
from .mlp import mlp

__all__ = ["conv_act_pool2d", "conv_bn_act_pool2d", "conv_relu_pool2d", "linear", "linear_batchnorm", "lstm",
           "lstm_cell", "mlp"]
