"""Drop-in nn.Module replacements; each holds torch.nn's parameters and calls one pydlx op."""
from .linear import Linear
from .mlp import MLP

__all__ = ["Linear", "MLP"]
