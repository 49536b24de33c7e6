"""Functional pydlx ops. Each is a torch.library op with a fake impl and autograd (pydlx/ops/<family>.py)."""
from .linear import linear
from .mlp import mlp

__all__ = ["linear", "mlp"]
