"""Drop-in nn.Module replacements; each holds torch.nn's parameters and calls one pydlx op."""
from .linear import Linear

__all__ = ["Linear"]
