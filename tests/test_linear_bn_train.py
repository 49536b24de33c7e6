"""Training-mode Linear -> BatchNorm1d [-> activation]: ``pydlx.ops.linear_batchnorm(..., training=True)`` (what
pydlx.optimize emits for an MLP with BatchNorm1d in training mode). The op saves only x and recomputes the Linear's
output in backward. Checked against the chain written with torch's modules in float64 (output, all five gradients,
the running statistics and num_batches_tracked), through the Triton GEMM in the interpreter, for its saved bytes,
opcheck, torch.compile, autocast and torch's errors."""
import copy

import oracle
import pytest
import torch
from torch import nn

import pydlx
from pydlx.bench import seed_models as S
from pydlx.ops.linear import linear_batchnorm
from tolerance import assert_close

# (rows, in, out, activation, Linear bias, BatchNorm affine, momentum)
CASES = [
    pytest.param((9, 7, 5, "relu", True, True, 0.1), id="relu"),
    pytest.param((6, 11, 4, None, False, True, 0.1), id="no-act-no-bias"),
    pytest.param((5, 6, 9, "gelu", True, True, None), id="gelu-preact-cumulative"),
    pytest.param((7, 5, 6, "leaky_relu(0.2)", True, False, 0.3), id="leaky0.2-no-affine"),
    pytest.param((2, 4, 3, "mish", True, True, 0.1), id="two-rows-mish"),
]


def make(case, dtype, device="cpu"):
    M, K, N, act, has_bias, affine, momentum = case
    lin = nn.Linear(K, N, bias=has_bias, device=device, dtype=dtype)
    bn = nn.BatchNorm1d(N, affine=affine, momentum=momentum, device=device)
    bn = bn.to(dtype) if dtype == torch.float64 else bn  # (BatchNorm's parameters stay fp32 otherwise: autocast's)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.num_batches_tracked.fill_(2)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    return torch.randn(M, K, dtype=dtype, device=device, requires_grad=True), lin, bn, act


def run_op(x, lin, bn, act):
    return linear_batchnorm(x, lin.weight, lin.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps,
                            act, training=True, momentum=bn.momentum, num_batches_tracked=bn.num_batches_tracked)


def run_chain(x, lin, bn, act, fn=None):
    z = bn(lin(x))
    return fn(z) if fn is not None else pydlx.activations.forward(z, act)


def fwd_bwd(fn, x, lin, bn, g):
    y = fn(x, lin, bn)
    leaves = [t for t in (x, lin.weight, lin.bias, bn.weight, bn.bias) if t is not None and t.requires_grad]
    return [y, *torch.autograd.grad(y, leaves, g)]


def dz_abs_sum(x, l64, b64, g, act):
    """Per feature, the sum over rows of |dL/dz| at the Linear's output z (float64): the terms the Linear's bias
    gradient adds up. After a BatchNorm in training mode that gradient is exactly zero (the batch mean removes the
    bias), so its computed value is all cancellation of these terms."""
    z = copy.deepcopy(l64)(x.detach().double()).detach().requires_grad_()
    dz, = torch.autograd.grad(oracle.activation(copy.deepcopy(b64)(z), act, torch.float64), z, g.double())
    return dz.abs().sum(0)


def check(case, dtype, backend, device="cpu"):
    x, lin, bn, act = make(case, dtype, device)
    l64, b64 = copy.deepcopy(lin).double(), copy.deepcopy(bn).double()
    le, be = copy.deepcopy(lin), copy.deepcopy(bn)
    g = torch.randn(x.shape[0], lin.out_features, dtype=dtype, device=device)
    with pydlx.use_backend(backend):
        got = fwd_bwd(lambda *a: run_op(*a, act), x, lin, bn, g)
    want = fwd_bwd(lambda *a: run_chain(*a, act, lambda z: oracle.activation(z, act, dtype)),
                   x.detach().double().requires_grad_(), l64, b64, g.double())
    eager = fwd_bwd(lambda *a: run_chain(*a, act), x, le, be, g)
    key = "tf32" if dtype == torch.float32 and device == "cuda" and torch.backends.cuda.matmul.allow_tf32 else dtype
    sums = {"db": dz_abs_sum(x, l64, b64, g, act)}
    for a_, e_, base, name in zip(got, want, eager, ["y", "dx", "dw", "db", "dgamma", "dbeta"]):
        assert_close(a_, e_, dtype=key, name=name, baseline=base, abs_sum=sums.get(name))
    assert bn.num_batches_tracked.item() == b64.num_batches_tracked.item() == 3
    for name in ("running_mean", "running_var"):
        assert_close(getattr(bn, name), getattr(b64, name), dtype=key if dtype != torch.float64 else torch.float32,
                     name=name, baseline=getattr(be, name))


@pytest.mark.parametrize("case", CASES)
def test_reference_backend_float64(case):
    check(case, torch.float64, "reference")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("case", [CASES[0], CASES[2]])
def test_triton_interpreter(case, dtype, poison):
    """Forced triton: the Linear (forward and its recompute in backward) is the Triton GEMM's."""
    check(case, dtype, "triton")


def test_forced_triton_runs_the_gemm(monkeypatch):
    """Forced triton: the forward's Linear and backward's recompute are pydlx's Triton GEMM (not F.linear)."""
    from pydlx.triton import linear as tri

    calls = []
    monkeypatch.setattr(tri, "linear_fwd", lambda *a, **k: calls.append(a) or
                        pydlx.reference.linear.linear_fwd(*a, **k))
    x, lin, bn, act = make(CASES[0].values[0], torch.float32)
    with pydlx.use_backend("triton"):
        run_op(x, lin, bn, act).sum().backward()
    assert len(calls) == 2


def test_saves_only_the_input_and_refuses_like_torch():
    x, lin, bn, act = make(CASES[0].values[0], torch.float32)
    params = [lin.weight, lin.bias, bn.weight, bn.bias]
    eager = S.saved_bytes(lambda: run_chain(x, lin, bn, act), params)
    with pydlx.use_backend("reference"):
        ours = S.saved_bytes(lambda: run_op(x, lin, bn, act), params)
    assert ours == x.numel() * 4 + 2 * 4 * lin.out_features and ours <= eager / 2, (ours, eager)
    for backend in ("reference", "auto"):
        with pydlx.use_backend(backend), pytest.raises(ValueError, match="more than 1 value per channel"):
            run_op(torch.randn(1, 7), lin, bn, act)
        with pydlx.use_backend(backend), pytest.raises(RuntimeError):  # (F.linear's; DtypeError is one too)
            run_op(torch.randn(4, 7, dtype=torch.float64), lin, bn, act)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        run_chain(torch.randn(1, 7), lin, bn, act)
    # a 3-D input: BatchNorm1d normalises dim 1 (here L == out_features), as torch does
    x3 = torch.randn(3, 5, 7)
    l2, b2 = copy.deepcopy(lin), copy.deepcopy(bn)
    with pydlx.use_backend("reference"):
        assert_close(run_op(x3, lin, bn, act), run_chain(x3, l2, b2, act), name="3-D")


def test_opcheck_compile_and_autocast():
    x, lin, bn, act = make(CASES[2].values[0], torch.float32)
    torch.library.opcheck(torch.ops.pydlx.layer_bn_train_fwd.default,
                          (x, lin.weight, lin.bias, bn.weight, bn.bias, 1e-5, "linear", [], "gelu", "reference"))
    torch.library.opcheck(torch.ops.pydlx.layer_bn_train_fwd.default,
                          (x, lin.weight, None, None, None, 1e-5, "linear", [], "none", "reference"))
    torch._dynamo.reset()
    le, be = copy.deepcopy(lin), copy.deepcopy(bn)
    bn.momentum = be.momentum = 0.1  # (momentum None reads num_batches_tracked on the host: a graph break, as torch's)
    with pydlx.use_backend("reference"):
        y = torch.compile(lambda x_: run_op(x_, lin, bn, act), fullgraph=True, backend="aot_eager")(x)
    want = run_chain(x, le, be, act)
    assert_close(y, want, name="compiled")
    assert_close(bn.running_var, be.running_var, name="running_var")
    with pydlx.use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):
        y = run_op(x, lin, bn, act)
        want = run_chain(x, le, be, act)
    assert y.dtype == want.dtype == torch.bfloat16
    assert_close(y, want, dtype=torch.bfloat16, name="autocast")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("case", CASES)
def test_gpu_against_reference(case, dtype, backend, poison):
    check(case, dtype, backend, "cuda")
