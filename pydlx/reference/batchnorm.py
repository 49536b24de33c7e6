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


def momentum_factor(momentum: Optional[float], num_batches_tracked: Optional[torch.Tensor]) -> float:
    """BatchNorm.forward's bookkeeping in training mode: num_batches_tracked += 1, and the running statistics'
    exponential-average factor (``momentum``; None: the cumulative average 1 / num_batches_tracked)."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            return 1.0 / float(num_batches_tracked)
    return 0.0 if momentum is None else momentum


def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                         invstd: torch.Tensor, eps: float, count: int, momentum: float) -> None:
    """Move the running statistics as training-mode BatchNorm does: an exponential average (factor ``momentum``)
    of the batch mean and the unbiased batch variance (``count`` values per channel), one ``lerp_`` each. The
    biased variance comes back from ``invstd`` = 1 / sqrt(var + eps) as invstd^-2 - eps: in fp32 within a few ulps
    of var + eps, i.e. ~1e-7 eps absolute (clamped at 0 for a constant channel)."""
    with torch.no_grad():
        unbiased = invstd.pow(-2).sub_(eps).clamp_min_(0).mul_(count / (count - 1))
        running_mean.lerp_(cast_to(mean, running_mean.dtype), momentum)
        running_var.lerp_(cast_to(unbiased, running_var.dtype), momentum)


def cast_to(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``t`` in ``dtype``; no call at all where it already is (these run on every training call)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _affine(z: torch.Tensor, gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor]):
    """(gamma, beta) as ATen's batch norm takes them beside z: in the math dtype, and for a 16-bit z without gamma
    a gamma of ones (without one ATen's CPU kernel returns 16-bit statistics)."""
    dtype = math_dtype(z.dtype)
    if gamma is None and dtype != z.dtype:
        gamma = torch.ones(z.shape[1], dtype=dtype, device=z.device)
    return cast_to(gamma, dtype), cast_to(beta, dtype)


def bn_act(z: torch.Tensor, eps: float, gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor],
           activation: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pre, a, mean, invstd): pre = gamma (z - mean) invstd + beta with z's batch statistics (biased variance,
    invstd = 1 / sqrt(var + eps); math dtype, pre rounded to z's dtype once), a its activation. One op, ATen's own
    training-mode batch norm (statistics and normalisation; the running statistics are the caller's). Forward and
    backward both call it on the same z, so the recomputed activation (its ReLU mask, the pool's argmax) is the
    forward's, bit for bit."""
    w, b = _affine(z, gamma, beta)
    pre, mean, invstd = torch.ops.aten.native_batch_norm(z, w, b, None, None, True, 0.0, eps)
    return pre, activation_forward(pre, activation), mean, invstd


def bn_act_backward(grad: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, eps: float,
                    gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor], activation: Optional[str],
                    after: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dz in z's dtype, dgamma, dbeta) of y = after(act(BatchNorm(z))) with batch statistics, from dy = ``grad``
    (``after(a, grad)``: the gradient at the activation's output, e.g. through a pool; None: y is a) and the
    forward's ``mean`` and ``invstd``. The activation is recomputed by ``bn_act``; BatchNorm's backward is ATen's
    training-mode one: with xhat = (z - mean) invstd, sg = sum g and sgx = sum g xhat over the n values of a
    channel, dz = gamma invstd (g - sg / n - xhat sgx / n), dgamma = sgx, dbeta = sg (math dtype inside)."""
    pre, a, _, _ = bn_act(z, eps, gamma, beta, activation)
    if after is not None:
        grad = after(a, grad)
    g = activation_backward(grad, pre if saves_preact(activation) else a, activation)
    del pre, a
    dz, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
        cast_to(g, z.dtype), z, _affine(z, gamma, None)[0], None, None, mean, invstd, True, eps,
        [True, gamma is not None, beta is not None])
    return dz, dgamma, dbeta


def bn_act_train(z: torch.Tensor, eps: float, gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor],
                 activation: Optional[str], after: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, invstd): y = after(act(BatchNorm(z))) with the batch statistics (``after``: a pool, or None), and
    the statistics as ``bn_act`` gives them (the caller moves the running statistics: ``update_running_stats``).
    The training forms call it with their layer's output z, which lives only inside the call: backward recomputes
    z and calls ``bn_act_backward``."""
    _, a, mean, invstd = bn_act(z, eps, gamma, beta, activation)
    return (a if after is None else after(a)).contiguous(), mean, invstd


__all__ = ["math_dtype", "cast_to", "momentum_factor", "update_running_stats", "bn_act", "bn_act_backward",
           "bn_act_train"]
