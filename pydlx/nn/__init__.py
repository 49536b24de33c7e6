"""Drop-in nn.Module replacements; each holds torch.nn's parameters and calls one pydlx op."""
from .conv_relu_pool import ConvReLUPool2d
from .linear import Linear
from .mlp import MLP

__all__ = ["ConvReLUPool2d", "Linear", "MLP"]
