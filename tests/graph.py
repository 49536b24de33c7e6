"""Which pydlx ops an autograd graph holds: how a test tells that an optimized model ran pydlx's op, not eager."""
from __future__ import annotations

from typing import Set

import torch


def pydlx_nodes(out: torch.Tensor) -> Set[str]:
    """The class names of the pydlx op nodes (``pydlx_<op>Backward``) reachable from ``out``'s autograd node. Keep
    ``out`` alive while the graph is read: a custom Function's node lives only as long as the graph holding it."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(n for n, _ in node.next_functions)
    return {type(n).__name__ for n in seen if type(n).__name__.startswith("pydlx")}
