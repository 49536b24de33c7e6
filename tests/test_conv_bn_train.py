"""Training-mode Conv2d -> BatchNorm2d [-> activation] [-> MaxPool2d]: ``pydlx.ops.conv_bn_act_pool2d(...,
training=True)`` (the op pydlx.optimize puts in place of ResNet's, VGG-BN's and GoogLeNet's blocks in training mode).
Batch statistics need the whole conv output, so the op saves only x (and two per-channel vectors) and recomputes the
conv, the normalisation and the activation in backward. Checked against the chain written with torch's own
functions in float64 (outputs, all five gradients, the running statistics and num_batches_tracked), through the
Triton kernel in the interpreter, for its saved bytes, opcheck, torch.compile, autocast and torch's errors."""
import copy

import oracle
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pydlx
from pydlx.bench import seed_models as S
from pydlx.ops.conv_relu_pool import conv_bn_act_pool2d
from tolerance import assert_close

# (N, C, H, W, K, kernel, stride, padding, activation, pool, pool_stride, pool_padding, ceil_mode, conv bias,
#  BatchNorm affine, momentum)
CASES = [
    pytest.param((2, 3, 15, 17, 8, 7, 2, 3, "relu", 3, 2, 1, False, False, True, 0.1), id="resnet-stem"),
    pytest.param((3, 5, 7, 9, 6, 3, 1, 1, "relu", 1, 1, 0, False, False, True, 0.1), id="resnet-3x3-relu"),
    pytest.param((2, 4, 6, 5, 7, 1, 2, 0, None, 1, 1, 0, False, False, True, 0.1), id="downsample-1x1s2-no-act"),
    pytest.param((2, 4, 9, 8, 5, 3, 1, 1, "relu", 3, 2, 0, True, True, True, None), id="googlenet-ceil-cumulative"),
    pytest.param((2, 3, 12, 10, 6, 4, 2, 1, "leaky_relu(0.2)", 1, 1, 0, False, False, True, 0.1), id="dcgan-d"),
    pytest.param((2, 6, 7, 7, 9, 1, 1, 0, "hardswish", 1, 1, 0, False, False, True, 0.01), id="mobilenet-hswish"),
    pytest.param((1, 3, 8, 9, 4, 3, 1, 1, "mish", 1, 1, 0, False, True, False, 0.3), id="mish-no-affine"),
    pytest.param((2, 3, 11, 9, 4, 3, 2, 1, "relu6", 2, 2, 0, False, True, True, 0.1), id="relu6-pool2"),
]


def make(case, dtype, device="cpu"):
    N, C, H, W, K, R, s, p, act, P, Q, PP, ceil, has_bias, affine, momentum = case
    conv = nn.Conv2d(C, K, R, s, p, bias=has_bias, device=device, dtype=dtype)
    bn = nn.BatchNorm2d(K, affine=affine, momentum=momentum, device=device)  # parameters fp32 (autocast's rule)
    bn = bn.to(dtype) if dtype == torch.float64 else bn
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.num_batches_tracked.fill_(3)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    x = torch.randn(N, C, H, W, dtype=dtype, device=device, requires_grad=True)
    return x, conv, bn, dict(stride=s, padding=p, activation=act, pool_size=P, pool_stride=Q, pool_padding=PP,
                             ceil_mode=ceil)


def run_op(x, conv, bn, kw):
    return conv_bn_act_pool2d(x, conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps,
                              **kw, training=True, momentum=bn.momentum, num_batches_tracked=bn.num_batches_tracked)


def run_chain(x, conv, bn, kw, act=None):
    """The chain written with torch's modules (BatchNorm2d.forward does its own bookkeeping); ``act``: the
    activation function (default: pydlx's reference, i.e. torch's functions)."""
    z = bn(conv(x))
    z = act(z) if act is not None else pydlx.activations.forward(z, kw["activation"])
    return z if kw["pool_size"] == 1 else F.max_pool2d(z, kw["pool_size"], kw["pool_stride"], kw["pool_padding"],
                                                       ceil_mode=kw["ceil_mode"])


def leaves(x, conv, bn):
    return [t for t in (x, conv.weight, conv.bias, bn.weight, bn.bias) if t is not None and t.requires_grad]


def fwd_bwd(fn, x, conv, bn, g):
    y = fn(x, conv, bn)
    return [y, *torch.autograd.grad(y, leaves(x, conv, bn), g)]


def check(case, dtype, backend, device="cpu"):
    x, conv, bn, kw = make(case, dtype, device)
    conv.train(), bn.train()
    c64, b64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    ce, be = copy.deepcopy(conv), copy.deepcopy(bn)
    with torch.no_grad():
        shape = run_chain(x, copy.deepcopy(conv), copy.deepcopy(bn), kw).shape
    g = torch.randn(shape, dtype=dtype, device=device)
    # fp32 convolutions on a GPU run in TF32 by torch's default (cuDNN), eager's and pydlx's alike
    key = "tf32" if dtype == torch.float32 and device == "cuda" and torch.backends.cudnn.allow_tf32 else dtype
    x64 = x.detach().double().requires_grad_()
    with pydlx.use_backend(backend):
        got = fwd_bwd(lambda *a: run_op(*a, kw), x, conv, bn, g)
    want = fwd_bwd(lambda x_, c_, b_: run_chain(x_, c_, b_, kw, lambda z: oracle.activation(z, kw["activation"],
                                                                                           dtype)),
                   x64, c64, b64, g.double())
    eager = fwd_bwd(lambda *a: run_chain(*a, kw), x, ce, be, g)
    names = ["y", "dx", "dw", "db", "dgamma", "dbeta"][:len(got)]
    for a_, e_, base, name in zip(got, want, eager, names):
        assert_close(a_, e_, dtype=key, name=name, baseline=base)
    # the running statistics moved as torch's BatchNorm2d moved them
    assert bn.num_batches_tracked.item() == b64.num_batches_tracked.item() == 4
    for name in ("running_mean", "running_var"):  # (from the conv output rounded to ``dtype``, as eager's are)
        assert_close(getattr(bn, name), getattr(b64, name), dtype=key if dtype != torch.float64 else torch.float32,
                     name=name, baseline=getattr(be, name))


@pytest.mark.parametrize("case", CASES)
def test_reference_backend_float64(case):
    check(case, torch.float64, "reference")


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")])
def test_reference_16bit_without_affine(dtype):
    """A 16-bit map under a BatchNorm without gamma and beta: checked against float64, and its statistics stay
    fp32, so the running statistics equal eager BatchNorm2d's (which moves them from fp32 statistics of the same
    16-bit conv output) to fp32 precision, not to the map's (ATen's CPU batch norm returns 16-bit statistics unless
    given an fp32 gamma)."""
    case = CASES[6].values[0]
    check(case, dtype, "reference")
    x, conv, bn, kw = make(case, dtype)
    be = copy.deepcopy(bn)
    with pydlx.use_backend("reference"):
        run_op(x, conv, bn, kw).sum().backward()
    run_chain(x, conv, be, kw)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(bn, name), getattr(be, name), rtol=1e-5, atol=1e-6)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5]])
def test_triton_interpreter(case, dtype, poison):
    """Forced triton: the conv (forward and its recompute in backward) is the Triton kernel's."""
    check(case, dtype, "triton")


def test_forced_triton_conv_runs_the_kernel(monkeypatch):
    from pydlx.triton import conv_relu_pool as tri

    calls = []
    monkeypatch.setattr(tri, "conv_relu_pool_fwd", lambda *a, **k: calls.append(a) or
                        pydlx.reference.conv_relu_pool.conv_relu_pool_fwd(*a, **k))
    x, conv, bn, kw = make(CASES[1].values[0], torch.float32)
    with pydlx.use_backend("triton"):
        run_op(x, conv, bn, kw).sum().backward()
    assert len(calls) == 2  # the forward and backward's recompute


def test_saves_only_the_input():
    """Eager keeps x, the conv output (BatchNorm's input), the activation output and int64 pool indices; the op
    keeps x and two per-channel vectors."""
    for case in (CASES[0].values[0], CASES[1].values[0]):
        x, conv, bn, kw = make(case, torch.float32)
        params = [conv.weight, bn.weight, bn.bias]
        eager = S.saved_bytes(lambda: run_chain(x, conv, bn, kw), params)
        with pydlx.use_backend("reference"):
            ours = S.saved_bytes(lambda: run_op(x, conv, bn, kw), params)
        stats = 2 * 4 * conv.out_channels
        assert ours == x.numel() * 4 + stats, (ours, x.numel() * 4)
        assert ours <= eager / 2, (ours, eager)


def test_ties_and_first_layer_without_input_gradient():
    """ReLU zeros tie in every pool window of a mostly negative map: backward's recomputed argmax is the forward's
    and torch's (the first maximum). The first layer's x needs no gradient: none is computed."""
    x, conv, bn, kw = make(CASES[0].values[0], torch.float64)
    with torch.no_grad():
        bn.bias.fill_(-3.0)
    x.requires_grad_(False)
    ce, be = copy.deepcopy(conv), copy.deepcopy(bn)
    with pydlx.use_backend("reference"):
        y = run_op(x, conv, bn, kw)
    want = run_chain(x, ce, be, kw)
    assert (want == 0).float().mean() > 0.5
    assert_close(y, want, name="y")
    g = torch.randn_like(y)
    for a_, e_ in zip(torch.autograd.grad(y, [conv.weight, bn.weight, bn.bias], g),
                      torch.autograd.grad(want, [ce.weight, be.weight, be.bias], g)):
        assert_close(a_, e_, name="grad")


def test_inplace_residual_after_conv_bn():
    """ResNet's ``out += identity`` after Conv -> BatchNorm (no activation): the op does not save its output, so the
    in-place add is as legal as in eager."""
    x, conv, bn, kw = make(CASES[1].values[0], torch.float64)
    kw = dict(kw, activation=None)
    conv = nn.Conv2d(5, 5, 3, padding=1, bias=False).double()
    bn = nn.BatchNorm2d(5).double()
    ce, be = copy.deepcopy(conv), copy.deepcopy(bn)
    with pydlx.use_backend("reference"):
        out = run_op(x, conv, bn, kw)
        out += x
        out.relu().sum().backward()
    gx = x.grad.clone()
    x.grad = None
    ref_out = be(ce(x))
    ref_out += x
    ref_out.relu().sum().backward()
    assert_close(gx, x.grad, name="dx")
    assert_close(conv.weight.grad, ce.weight.grad, name="dw")


def test_channels_last_and_no_grad():
    x, conv, bn, kw = make(CASES[1].values[0], torch.float32)
    xc = x.detach().contiguous(memory_format=torch.channels_last)
    be, ce = copy.deepcopy(bn), copy.deepcopy(conv)
    with torch.no_grad(), pydlx.use_backend("reference"):
        y = run_op(xc, conv, bn, kw)
        want = run_chain(xc, ce, be, kw)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.grad_fn is None
    assert_close(y, want, name="y")
    assert_close(bn.running_var, be.running_var, name="running_var")


def test_errors_are_torchs():
    """What BatchNorm2d refuses, the op refuses with torch's exception type: one value per channel in training
    (ValueError), a 3-D (unbatched) input (ValueError); a dtype mismatch is pydlx's DtypeError (a TypeError)."""
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    for backend in ("reference", "auto"):
        with pydlx.use_backend(backend):
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                run_op(torch.randn(1, 3, 3, 3), conv, bn, dict(activation="relu"))
            with pytest.raises(ValueError, match="expected 4D input"):
                run_op(torch.randn(3, 5, 5), conv, bn, dict(activation="relu"))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(conv(torch.randn(1, 3, 3, 3)))
    with pytest.raises(ValueError, match="expected 4D input"):
        bn(conv(torch.randn(3, 5, 5)))
    with pydlx.use_backend("reference"), pytest.raises(TypeError):
        run_op(torch.randn(2, 3, 5, 5, dtype=torch.float64), conv, bn, dict(activation="relu"))


def test_opcheck_and_compile():
    x, conv, bn, kw = make(CASES[0].values[0], torch.float32)
    args = [kw["stride"], kw["padding"], kw["pool_size"], kw["pool_stride"], kw["pool_padding"], kw["ceil_mode"]]
    torch.library.opcheck(torch.ops.pydlx.layer_bn_train_fwd.default,
                          (x, conv.weight, conv.bias, bn.weight, bn.bias, 1e-5, "conv", args, "relu", "reference"))
    x2, conv2, bn2, kw2 = make(CASES[6].values[0], torch.float32)
    args2 = [kw2["stride"], kw2["padding"], kw2["pool_size"], kw2["pool_stride"], kw2["pool_padding"],
             kw2["ceil_mode"]]
    torch.library.opcheck(torch.ops.pydlx.layer_bn_train_fwd.default,
                          (x2, conv2.weight, conv2.bias, None, None, 1e-5, "conv", args2, "mish", "reference"))
    torch._dynamo.reset()
    be, ce = copy.deepcopy(bn), copy.deepcopy(conv)
    with pydlx.use_backend("reference"):
        fn = lambda x_: run_op(x_, conv, bn, kw)  # noqa: E731
        y = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    want = run_chain(x, ce, be, kw)
    assert_close(y, want, name="compiled")
    assert_close(bn.running_mean, be.running_mean, name="running_mean")
    g = torch.randn_like(y)
    for a_, e_ in zip(torch.autograd.grad(y, [x, conv.weight, bn.weight], g),
                      torch.autograd.grad(want, [x, ce.weight, be.weight], g)):
        assert_close(a_, e_, name="grad")


def test_under_autocast_like_conv2d_and_batch_norm():
    x, conv, bn, kw = make(CASES[1].values[0], torch.float32)
    be, ce = copy.deepcopy(bn), copy.deepcopy(conv)
    with pydlx.use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):
        y = run_op(x, conv, bn, kw)
        want = run_chain(x, ce, be, kw)
    assert y.dtype == want.dtype == torch.bfloat16
    assert_close(y, want, dtype=torch.bfloat16, name="autocast")
    g = torch.randn_like(y)
    for a_, e_ in zip(torch.autograd.grad(y, [x, conv.weight, bn.weight], g),
                      torch.autograd.grad(want, [x, ce.weight, be.weight], g)):
        assert_close(a_, e_, dtype=torch.bfloat16, name="grad", baseline=e_)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("case", CASES)
def test_gpu_against_reference(case, dtype, backend, poison):
    check(case, dtype, backend, "cuda")


def test_a_conv_output_far_from_zero_keeps_fp32_accuracy():
    """A conv output whose mean is ~3000 standard deviations from zero (a large bias): the normalisation subtracts
    nearly equal numbers; the op stays as accurate as eager's fp32 against float64 (gradients included).
    A conv output of ~3000 is rounded to 2.4e-4 in fp32, so after normalisation a ReLU input that near zero can fall
    on either side in any fp32 computation, eager's included: the upstream gradient is zero at such near-ties (the
    forward's value there is within the band either way), so the check is about the cancellation, not a coin flip."""
    x, conv, bn, kw = make(CASES[1].values[0], torch.float32)
    conv = nn.Conv2d(5, 6, 3, padding=1)
    with torch.no_grad():
        conv.bias.add_(3000.0)
    c64, b64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    ce, be = copy.deepcopy(conv), copy.deepcopy(bn)
    g = torch.randn(3, 6, 7, 9)
    with torch.no_grad():
        h64 = copy.deepcopy(c64)(x.double())
        z64 = copy.deepcopy(b64)(h64)
        std = h64.var((0, 2, 3), unbiased=False).add(bn.eps).sqrt()
        scale = (b64.weight.abs() / std).view(1, -1, 1, 1)
        band = 16 * torch.finfo(torch.float32).eps * h64.abs().amax((0, 2, 3), keepdim=True) * scale
        g = g.masked_fill(z64.abs() <= band, 0)
    with pydlx.use_backend("reference"):
        got = fwd_bwd(lambda *a: run_op(*a, kw), x, conv, bn, g)
    want = fwd_bwd(lambda *a: run_chain(*a, kw), x.detach().double().requires_grad_(), c64, b64, g.double())
    eager = fwd_bwd(lambda *a: run_chain(*a, kw), x, ce, be, g)
    for a_, e_, base, name in zip(got, want, eager, ["y", "dx", "dw", "db", "dgamma", "dbeta"]):
        err, base_err = (a_.double() - e_).abs().max().item(), (base.double() - e_).abs().max().item()
        slack = band.max().item() if name == "y" else 0.0
        assert err <= 4 * base_err + 1e-6 * e_.abs().max().item() + slack, (name, err, base_err)
