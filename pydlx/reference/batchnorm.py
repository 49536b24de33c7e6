"""Training-mode BatchNorm after a convolution or a Linear, in eager PyTorch: the batch statistics, the normalisation
and activation, and their backward, for the one training form of pydlx.ops.conv_bn_act_pool2d(training=True) and
pydlx.ops.linear_batchnorm(training=True) (pydlx/ops/batchnorm.py: it saves only the layer's input; backward
recomputes the layer's output and calls these again). Channels are dim 1 (N, C[, H, W]); statistics over every
other dim, in fp32 for 16-bit maps."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ..activations import forward as activation_forward, saves_preact
from .linear import activation_backward


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def batch_stats(z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per channel of z (channels: dim 1; over every other dim), in the math dtype, as
    training-mode BatchNorm normalises with them."""
    dims = (0,) + tuple(range(2, z.dim()))
    var, mean = torch.var_mean(cast_to(z, math_dtype(z.dtype)), dim=dims, correction=0)
    return mean, var


def momentum_factor(momentum: Optional[float], num_batches_tracked: Optional[torch.Tensor]) -> float:
    """BatchNorm.forward's bookkeeping in training mode: num_batches_tracked += 1, and the running statistics'
    exponential-average factor (``momentum``; None: the cumulative average 1 / num_batches_tracked)."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            return 1.0 / float(num_batches_tracked)
    return 0.0 if momentum is None else momentum


def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                         var: torch.Tensor, count: int, momentum: float) -> None:
    """Move the running statistics as training-mode BatchNorm does: an exponential average (factor ``momentum``)
    of the batch mean and the unbiased batch variance (``count`` values per channel), one ``lerp_`` each."""
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        running_mean.lerp_(cast_to(mean, running_mean.dtype), momentum)
        running_var.lerp_(cast_to(unbiased, running_var.dtype), momentum)


def cast_to(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``t`` in ``dtype``; no call at all where it already is (these run on every training call)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def bn_act(z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float, gamma: Optional[torch.Tensor],
           beta: Optional[torch.Tensor], activation: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(pre, a): gamma (z - mean) / sqrt(var + eps) + beta and its activation. The normalisation is ATen's own
    batch norm, one op, given the batch statistics where it would take the running ones (math dtype, rounded to
    z's dtype once). Forward and backward both call it, so the recomputed activation (its ReLU mask, the pool's
    argmax) is the forward's, bit for bit."""
    pre = torch.batch_norm(z, cast_to(gamma, mean.dtype), cast_to(beta, mean.dtype), mean, var, False, 0.0, eps,
                           torch.backends.cudnn.enabled)
    return pre, activation_forward(pre, activation)


def bn_act_backward(grad: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float,
                    gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor], activation: Optional[str],
                    after: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dz in z's dtype, dgamma, dbeta) of y = after(act(BatchNorm(z))) with batch statistics, from dy = ``grad``
    (``after(a, grad)``: the gradient at the activation's output, e.g. through a pool; None: y is a). The
    activation is recomputed by ``bn_act``; BatchNorm's backward is ATen's training-mode one from the batch mean
    and 1 / sqrt(var + eps): with xhat = (z - mean) invstd, sg = sum g and sgx = sum g xhat over the n values of a
    channel, dz = gamma invstd (g - sg / n - xhat sgx / n), dgamma = sgx, dbeta = sg (math dtype inside)."""
    pre, a = bn_act(z, mean, var, eps, gamma, beta, activation)
    if after is not None:
        grad = after(a, grad)
    g = activation_backward(grad, pre if saves_preact(activation) else a, activation)
    del pre, a
    invstd = torch.rsqrt(var + eps)
    dz, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
        cast_to(g, z.dtype), z, cast_to(gamma, mean.dtype), None, None, mean, invstd, True, eps,
        [True, gamma is not None, beta is not None])
    return dz, dgamma, dbeta


def bn_act_train(z: torch.Tensor, eps: float, gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor],
                 activation: Optional[str], after: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var): y = after(act(BatchNorm(z))) with the batch statistics (``after``: a pool, or None), and the
    statistics (the caller moves the running statistics: ``update_running_stats``). The training forms call it
    with their layer's output z, which lives only inside the call: backward recomputes z and calls
    ``bn_act_backward``."""
    mean, var = batch_stats(z)
    a = bn_act(z, mean, var, eps, gamma, beta, activation)[1]
    return (a if after is None else after(a)).contiguous(), mean, var


__all__ = ["math_dtype", "cast_to", "batch_stats", "momentum_factor", "update_running_stats", "bn_act",
           "bn_act_backward", "bn_act_train"]
