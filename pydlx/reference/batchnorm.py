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


def _dims(z: torch.Tensor) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(the dims statistics reduce over, the view of a per-channel vector against z)."""
    return (0,) + tuple(range(2, z.dim())), (1, -1) + (1,) * (z.dim() - 2)


def batch_stats(z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per channel of z, in the math dtype, as training-mode BatchNorm normalises with
    them."""
    var, mean = torch.var_mean(z.to(math_dtype(z.dtype)), dim=_dims(z)[0], correction=0)
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
    of the batch mean and the unbiased batch variance (``count`` values per channel)."""
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_((var * (count / (count - 1))).to(running_var.dtype), alpha=momentum)


def _per_channel(z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float,
                 gamma: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(invstd, gamma invstd, values per channel), per-channel vectors in the math dtype."""
    invstd = torch.rsqrt(var + eps)
    scale = invstd * gamma.to(mean.dtype) if gamma is not None else invstd
    return invstd, scale, z.numel() // z.shape[1]


def bn_act(z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float, gamma: Optional[torch.Tensor],
           beta: Optional[torch.Tensor], activation: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(pre, a): gamma (z - mean) / sqrt(var + eps) + beta as one multiply-add over z with per-channel scale and
    shift (math dtype, rounded to z's dtype once; ATen's CPU batch norm uses the same form), and its activation.
    Forward and backward both call it, so the recomputed activation (its ReLU mask, the pool's argmax) is the
    forward's, bit for bit."""
    view = _dims(z)[1]
    _, scale, _ = _per_channel(z, mean, var, eps, gamma)
    shift = -mean * scale + (beta.to(mean.dtype) if beta is not None else 0)
    pre = torch.addcmul(shift.view(view), z.to(mean.dtype), scale.view(view)).to(z.dtype)
    return pre, activation_forward(pre, activation)


def bn_act_backward(grad: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float,
                    gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor], activation: Optional[str],
                    after: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dz in z's dtype, dgamma, dbeta) of y = after(act(BatchNorm(z))) with batch statistics, from dy = ``grad``
    (``after(a, grad)``: the gradient at the activation's output, e.g. through a pool; None: y is a). The
    activation is recomputed by ``bn_act``; BatchNorm's backward is written in per-channel coefficients: with
    xhat = (z - mean) invstd, sg = sum g and sgx = sum g xhat over the n values of a channel,
    dz = gamma invstd (g - sg / n - xhat sgx / n)."""
    pre, a = bn_act(z, mean, var, eps, gamma, beta, activation)
    if after is not None:
        grad = after(a, grad)
    g = activation_backward(grad, pre if saves_preact(activation) else a, activation).to(mean.dtype)
    del pre, a
    dims, view = _dims(z)
    invstd, scale, n = _per_channel(z, mean, var, eps, gamma)
    xhat = (z.to(mean.dtype) - mean.view(view)).mul_(invstd.view(view))  # (subtracting first: no cancellation)
    sg, sgx = g.sum(dims), (g * xhat).sum(dims)
    dz = torch.addcmul(torch.addcmul((-scale * sg / n).view(view), xhat, (-scale * sgx / n).view(view)), g,
                       scale.view(view))
    return dz.to(z.dtype), (sgx if gamma is not None else None), (sg if beta is not None else None)


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


__all__ = ["math_dtype", "batch_stats", "momentum_factor", "update_running_stats", "bn_act", "bn_act_backward",
           "bn_act_train"]
