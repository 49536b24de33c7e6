"""Every shipped kernel, once: each family x backend x dtype, forward and backward, at one odd shape, against the
float64 reference. The GPU check's tier 0 (scripts/gpu_check.py) runs this module first on the GPU (where the
triton and cuda backends run compiled); on a CPU the triton backend runs under the interpreter (the dry run and CI).
On a GPU each Triton case runs twice: the second call's launches skip Triton's own run (pydlx.triton.common
``Tuned._direct``), and both are checked. The thorough per-family suites (tests/test_<family>.py) go further; this is
the few-minute answer to "does every kernel run and agree on this machine?"."""
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pydlx
from tolerance import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (family, backend, dtypes, training): what each backend ships
MATRIX = [
    ("linear", "triton", ("fp32", "fp16", "bf16"), True), ("linear", "cuda", ("fp32", "fp16", "bf16"), True),
    ("mlp", "triton", ("fp32", "fp16", "bf16"), True), ("mlp", "cuda", ("fp16", "bf16"), False),
    ("conv_relu_pool", "triton", ("fp32", "fp16", "bf16"), True),
    ("conv_relu_pool", "cuda", ("fp32", "fp16", "bf16"), True),
    ("conv_act_pool", "triton", ("fp32", "bf16"), True), ("conv_act_pool", "cuda", ("fp32", "bf16"), True),
    ("conv_bn_train", "triton", ("fp32", "bf16"), True), ("linear_bn_train", "triton", ("fp32", "bf16"), True),
    ("lstm", "triton", ("fp32", "fp16", "bf16"), True), ("lstm", "cuda", ("fp32", "fp16", "bf16"), True),
    ("lstm_cell", "triton", ("fp32", "fp16", "bf16"), True),
]


def _params():
    out = []
    for family, backend, dtypes, training in MATRIX:
        for d in dtypes:
            marks = []
            if DEVICE == "cpu":
                if backend == "cuda":
                    continue  # the C++/CUDA kernels need a GPU (tests/test_extension.py builds them on the CPU)
                marks.append(pytest.mark.interpreter)
            out.append(pytest.param(family, backend, d, training, id=f"{family}-{backend}-{d}", marks=marks))
    return out


class _ZooConvBlocks(nn.Module):
    """A ResNet-like stem (7x7 stride 2 pad 3, ReLU, 3/2 pool with padding 1 in ceil mode) and a conv + SiLU without
    a pool (the pre-activation saved), through pydlx.ops.conv_act_pool2d over ``seq``'s own parameters."""

    def __init__(self, seq):
        super().__init__()
        self.seq = seq

    def forward(self, x):
        c1, c2 = self.seq[0], self.seq[3]
        y = pydlx.ops.conv_act_pool2d(x, c1.weight, c1.bias, 2, 3, "relu", 3, 2, 1, True)
        return pydlx.ops.conv_act_pool2d(y, c2.weight, c2.bias, 1, 1, "silu")


class _TrainingConvBN(nn.Module):
    """ResNet's stem in training mode (Conv 7x7/2 -> BatchNorm2d with batch statistics -> ReLU -> MaxPool 3/2 pad 1)
    through pydlx.ops.conv_bn_act_pool2d(training=True) over ``seq``'s parameters and BatchNorm buffers."""

    def __init__(self, seq):
        super().__init__()
        self.seq = seq

    def forward(self, x):
        conv, bn = self.seq[0], self.seq[1]
        return pydlx.ops.conv_bn_act_pool2d(x, conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight,
                                            bn.bias, bn.eps, 2, 3, "relu", 3, 2, 1, training=True,
                                            momentum=bn.momentum, num_batches_tracked=bn.num_batches_tracked)


class _TrainingLinearBN(nn.Module):
    """Linear -> BatchNorm1d (batch statistics) -> ReLU through pydlx.ops.linear_batchnorm(training=True) over
    ``seq``'s parameters and BatchNorm buffers."""

    def __init__(self, seq):
        super().__init__()
        self.seq = seq

    def forward(self, x):
        fc, bn = self.seq[0], self.seq[1]
        return pydlx.ops.linear_batchnorm(x, fc.weight, fc.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                          bn.eps, "relu", training=True, momentum=bn.momentum,
                                          num_batches_tracked=bn.num_batches_tracked)


def _model(family):
    if family == "linear":
        lin = nn.Linear(70, 45)
        return nn.Sequential(lin, nn.GELU()), pydlx.nn.Linear.from_module(lin, activation="gelu"), (37, 70)
    if family == "mlp":
        seq = nn.Sequential(nn.Linear(33, 48), nn.ReLU(), nn.Linear(48, 17), nn.ReLU(), nn.Linear(17, 5))
        return seq, pydlx.nn.MLP.from_sequential(seq), (29, 33)
    if family == "conv_relu_pool":
        seq = nn.Sequential(nn.Conv2d(3, 10, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        return seq, pydlx.nn.ConvReLUPool2d.from_modules(seq[0], seq[2]), (3, 3, 13, 13)
    if family == "conv_act_pool":
        seq = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1, ceil_mode=True),
                            nn.Conv2d(8, 6, 3, padding=1), nn.SiLU())
        return seq, _ZooConvBlocks(seq), (2, 3, 19, 17)
    if family == "conv_bn_train":
        seq = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        return seq, _TrainingConvBN(seq), (2, 3, 19, 17)
    if family == "linear_bn_train":
        seq = nn.Sequential(nn.Linear(37, 23), nn.BatchNorm1d(23), nn.ReLU())
        return seq, _TrainingLinearBN(seq), (19, 37)
    if family == "lstm":
        m = nn.LSTM(6, 20)
        return m, pydlx.nn.LSTM.from_module(m), (7, 5, 6)
    m = nn.LSTMCell(6, 20)
    return m, pydlx.nn.LSTMCell.from_module(m), (5, 6)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _run(model, x, training, g=None):
    """[output] or, training, [output, d_input, d_parameters...] for the upstream gradient ``g`` (float64; by
    default linspace(-1, 1) over the output), cast to the run's dtype."""
    x = x.detach().requires_grad_(training)
    y = _first(model(x))
    if not training:
        return [y.detach()]
    if g is None:
        g = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape)
    grads = torch.autograd.grad((y * g.to(y.device, y.dtype)).sum(), [x, *model.parameters()])
    return [y.detach(), *grads]


def _bn_train_upstream(family, torch_model, x, dtype):
    """(g, {parameter name: abs_sum}) for the BatchNorm-in-training families, from float64: the upstream gradient
    linspace(-1, 1), zero where the output's gradient path is a coin flip in ``dtype``, and the cancellation
    allowance of the layer's bias gradient.

    The layer's output z is rounded to ``dtype`` (by eager and the fused ops alike: 2^-8 |z| in bf16), which moves
    the normalised value gamma (z - mean) / std by up to that times |gamma| / std. Where the normalised value is
    within twice that of zero, ReLU's gate -- and after a max pool, also which of two values within it of each other
    is the window's maximum -- falls either way in any computation in ``dtype`` (eager's included, by its own luck),
    sending a whole gradient element to a different place. The Linear's bias gradient is exactly zero (the batch
    mean removes the bias): its computed value is all cancellation, allowed a few ulp of the sum of |dz|."""
    m = copy.deepcopy(torch_model).double().train()
    x = x.double()
    z = m[0](x).detach().requires_grad_(True)
    bn = m[1]
    dims = (0,) if z.dim() == 2 else (0, 2, 3)
    view = (1, -1) + (1,) * (z.dim() - 2)
    var, mean = torch.var_mean(z.detach(), dims, correction=0)
    scale = ((var + bn.eps).rsqrt() * bn.weight.detach()).view(view)
    pre = (z.detach() - mean.view(view)) * scale + bn.bias.detach().view(view)
    band = 2 * torch.finfo(dtype).eps * z.detach().abs() * scale.abs()
    y = m[2:](m[1](z))
    g = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape)
    if family == "linear_bn_train":
        g = g * (pre.abs() > band)
    else:  # relu then a 3/2 max pool with padding 1: the window's largest pre-activation and the runner-up
        pool = m[3]
        win = F.unfold(F.pad(pre, (pool.padding,) * 4, value=-math.inf), pool.kernel_size, stride=pool.stride)
        wband = F.unfold(F.pad(band, (pool.padding,) * 4), pool.kernel_size, stride=pool.stride)
        N, C = pre.shape[:2]
        win, wband = win.view(N, C, -1, win.shape[-1]), wband.view(N, C, -1, wband.shape[-1]).amax(2)
        top = win.topk(2, dim=2).values
        p1, p2 = top[:, :, 0], top[:, :, 1]
        clear = (p1 < -wband) | ((p1 > wband) & (p1 - p2 > wband))
        g = g * clear.view(g.shape)
    (dz,) = torch.autograd.grad((y * g).sum(), [z])
    sums = {"0.bias": dz.abs().sum(0)} if family == "linear_bn_train" else {}
    return g, sums


@pytest.mark.parametrize("family, backend, dname, training", _params())
def test_every_kernel_once_against_float64(family, backend, dname, training):
    dtype = DTYPES[dname]
    torch_model, fused, shape = _model(family)
    torch_model.to(dtype)  # (fused shares its parameters): the oracle starts from the same rounded values
    x = torch.randn(shape).to(dtype)
    key = "tf32" if dtype == torch.float32 and DEVICE == "cuda" and torch.backends.cuda.matmul.allow_tf32 else dtype
    g, sums = None, {}
    if family in ("linear_bn_train", "conv_bn_train"):
        g, sums = _bn_train_upstream(family, torch_model, x, torch.float16 if key == "tf32" else dtype)
    want = _run(copy.deepcopy(torch_model).double(), x.double(), training, g)  # float64, eager, on the CPU
    model = copy.deepcopy(fused).to(DEVICE)
    runs = []
    with pydlx.use_backend(backend):
        with torch.no_grad() if not training else torch.enable_grad():
            runs.append(_run(model, x.to(DEVICE), training, g))
            if DEVICE == "cuda" and backend == "triton":  # a repeated call: its launches skip Triton's run
                # (pydlx.triton.common Tuned._direct)
                runs.append(_run(model, x.to(DEVICE), training, g))
    # eager PyTorch in the same dtype on the same device: the error the fused op is allowed twice of
    base = _run(copy.deepcopy(torch_model).to(DEVICE), x.to(DEVICE), training, g)
    params = [n for n, _ in torch_model.named_parameters()]
    names = ["output", "d_input"] + [f"d_{n}" for n in params]
    for i, got in enumerate(runs):
        which = " (repeated call)" if i else ""
        for a, e, b, n, p in zip(got, want, base, names, [None, None] + params):
            assert a.dtype == dtype, n
            assert_close(a, e, dtype=key, name=f"{family}/{backend}/{dname} {n}{which}",
                         baseline=b if dtype != torch.float32 else None, abs_sum=sums.get(p))
    if len(runs) > 1:  # the same kernels on the same input (Triton's: no atomics): the same output, bit for bit
        assert torch.equal(runs[1][0], runs[0][0]), f"{family}/{backend}/{dname}: a repeated call's output differs"
