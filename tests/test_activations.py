"""Activations keep their relative accuracy at every magnitude, on every backend.

A logarithmic sweep of pre-activations, 1e-8 .. 1e2 with both signs (and 0), goes through each backend's
Linear (identity weight: the GEMM adds nothing) and fused MLP, forward and backward, and each output is compared with
float64 by relative error. The oracle (tests/oracle.py) is written in forms that are accurate in float64 (the normal
CDF as erfc, tanh-GELU as z sigmoid(2u), elu with expm1, mish's softplus as log1p(exp(z))): torch's own fp32 GELU is
100% off below z = -6, where 1 + erf(z) rounds to 0.

Tolerances: a few ulps of the dtype (fp32 2e-5: the GPU's exp is accurate to ~1e-6 of |x| at |x| = 100). Where
the reference backend *is* torch (its forward, on the CPU the fastest path), or a derivative is computed from the
rounded output y (tanh: (1 - y)(1 + y), sigmoid: y(1 - y), as torch does; elu: y + alpha, as torch's in-place elu
does: it is 0 where y rounds to -alpha, e.g. below z = -17 in fp32), an error up to 2x torch's own in the same dtype
is allowed. Near a root of a derivative its relative error is ill-conditioned: mish's n + z (1 - n^2) sigmoid(z)
(n = tanh(softplus(z))) vanishes at z = -1.19243, hardswish's z/3 + 1/2 at z = -1.5, where the fp32 roundings of
the terms are large against their sum. The sweep's points are away from both (condition at most 10); the roots get
their own test, whose bound is the dtype's tolerance plus fp32's scaled by the condition of the sum
(|n| + |z (1 - n^2) sigmoid(z)|) / |n + z (1 - n^2) sigmoid(z)|: the final rounding to the dtype is relative to
the result, the fp32 roundings inside are relative to the terms.
The LSTM's tanh and sigmoid: an LSTM with weights scaled to 0.01, by relative error.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pydlx
from oracle import ORACLE
from tolerance import rel_err

MAGS = torch.logspace(-8, 2, 31, dtype=torch.float64)
SWEEP = torch.cat([-MAGS.flip(0), torch.zeros(1, dtype=torch.float64), MAGS])
TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1.5e-3}
DTYPES = [pytest.param(d, id=str(d).split(".")[1]) for d in TOL]

TORCH = {"relu": torch.relu, "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "silu": F.silu,
         "tanh": torch.tanh, "sigmoid": torch.sigmoid,
         # torch's in-place forms take the derivative from the result, as pydlx does for these
         "leaky_relu": lambda z: F.leaky_relu(z.clone(), inplace=True),
         "leaky_relu(0.2)": lambda z: F.leaky_relu(z.clone(), 0.2, inplace=True),
         "elu": lambda z: F.elu(z.clone(), inplace=True), "elu(0.5)": lambda z: F.elu(z.clone(), 0.5, inplace=True),
         "relu6": lambda z: F.relu6(z.clone(), inplace=True), "selu": lambda z: F.selu(z.clone(), inplace=True),
         "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid, "mish": F.mish}
# derivatives computed from the rounded output, as torch computes them
FROM_Y = ("tanh", "sigmoid", "elu", "elu(0.5)", "selu")
ACTS = [pytest.param(a, id=a) for a in ORACLE]


def _rel(got: torch.Tensor, want: torch.Tensor, dtype) -> torch.Tensor:
    """Per-element relative error, where the float64 value is a normal number of ``dtype``; elsewhere the absolute
    error in units of the smallest normal (so a subnormal truth must come out subnormal or 0)."""
    tiny = torch.finfo(dtype).tiny
    got, want = got.double(), want.double()
    err = (got - want).abs()
    return torch.where(want.abs() >= tiny, err / want.abs().clamp_min(tiny), err / tiny * TOL[dtype] / 2)


def _torch_errors(act, z):
    """Relative errors of torch's own activation and its autograd derivative, in z's dtype."""
    zz = z.clone().requires_grad_()
    y = TORCH[act](zz)
    (dz,) = torch.autograd.grad(y.sum(), zz)
    z64 = z.double().requires_grad_()
    y64 = ORACLE[act](z64)
    (dz64,) = torch.autograd.grad(y64.sum(), z64)
    return _rel(y.detach(), y64.detach(), z.dtype), _rel(dz, dz64, z.dtype)


def _check(act, dtype, run, device, torch_fwd_is_ok=False):
    """``run(z2d)`` returns (y, dz) of act at z2d = z[:, None] through a backend."""
    z = SWEEP.to(device, dtype)
    y, dz = run(z[:, None].clone())
    z64 = z.double().requires_grad_()
    y64 = ORACLE[act](z64)
    (dz64,) = torch.autograd.grad(y64.sum(), z64)
    torch_fwd, torch_bwd = _torch_errors(act, z)
    tol = TOL[dtype]
    checks = (("forward", y.view(-1), y64.detach(), torch_fwd if torch_fwd_is_ok else None),
              ("derivative", dz.view(-1), dz64, torch_bwd if act in FROM_Y else None))
    for what, got, want, allowed in checks:
        assert torch.isnan(got).sum() == 0, f"{act} {what}: NaN"
        err = _rel(got, want, dtype).cpu()
        bound = torch.full_like(err, tol) if allowed is None else torch.maximum(
            torch.full_like(err, tol), 2 * allowed.cpu() + tol)
        bad = err > bound
        if bad.any():
            i = int((err / bound).argmax())
            raise AssertionError(f"{act} {what} ({dtype}): relative error {err[i]:.3g} > {bound[i]:.3g} at "
                                 f"z = {float(z[i]):.4g} (got {float(got[i]):.6g}, float64 {float(want[i]):.6g}); "
                                 f"{int(bad.sum())} of {err.numel()} points")


def _linear_runner(act, backend):
    def run(z2d):
        z2d.requires_grad_()
        w = torch.ones(1, 1, dtype=z2d.dtype, device=z2d.device)
        with pydlx.use_backend(backend):
            y = pydlx.ops.linear(z2d, w, None, activation=act)
            (dz,) = torch.autograd.grad(y, z2d, torch.ones_like(y))
        return y.detach(), dz
    return run


def _mlp_runner(act, backend):
    def run(z2d):
        z2d.requires_grad_()
        w = torch.ones(1, 1, dtype=z2d.dtype, device=z2d.device)
        with pydlx.use_backend(backend):
            y = pydlx.ops.mlp(z2d, [w], [None], activation=None, last_activation=act)
            (dz,) = torch.autograd.grad(y, z2d, torch.ones_like(y))
        return y.detach(), dz
    return run


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_reference_backend(act, dtype):
    _check(act, dtype, _linear_runner(act, "reference"), "cpu", torch_fwd_is_ok=True)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_triton_linear_and_fused_mlp_interpreter(act, dtype):
    _check(act, dtype, _linear_runner(act, "triton"), "cpu")
    _check(act, dtype, _mlp_runner(act, "triton"), "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_gpu_backends(act, dtype, backend):
    _check(act, dtype, _linear_runner(act, backend), "cuda")
    if backend == "triton":
        _check(act, dtype, _mlp_runner(act, backend), "cuda")


# roots of derivatives (see the module docstring): z0, the derivative's terms (float64) whose sum it is
MISH_ROOT, HARDSWISH_ROOT = -1.1924312145154952, -1.5


def _mish_terms(z):
    n = torch.tanh(torch.log1p(torch.exp(z)))
    return n, z * (1 - n) * (1 + n) * torch.sigmoid(z)


ROOTS = {"mish": (MISH_ROOT, _mish_terms), "hardswish": (HARDSWISH_ROOT, lambda z: (z / 3, torch.full_like(z, 0.5)))}


def _check_near_root(act, dtype, run, device):
    """The derivative at points approaching the root, each by relative error within the dtype's tolerance plus
    fp32's times the condition of the sum of the derivative's terms."""
    z0, terms = ROOTS[act]
    offsets = torch.tensor([10.0 ** -k for k in range(1, 8)], dtype=torch.float64)
    z = torch.cat([z0 - offsets, torch.tensor([z0], dtype=torch.float64), z0 + offsets]).to(dtype).unique()
    _, dz = run(z.to(device)[:, None].clone())
    z64 = z.double().requires_grad_()
    (dz64,) = torch.autograd.grad(ORACLE[act](z64).sum(), z64)
    a, b = terms(z.double())
    # at an exact root (hardswish's -1.5) the derivative must come out 0: no allowance there
    cond = torch.where(dz64 == 0, torch.zeros_like(dz64), (a.abs() + b.abs()) / dz64.abs())
    err = _rel(dz.view(-1), dz64, dtype).cpu()
    bound = TOL[dtype] + TOL[torch.float32] * cond
    assert cond.max() > 100, "the points must come close to the root"  # (the sweep's points: at most 10)
    bad = err > bound
    assert not bad.any(), (f"{act} derivative ({dtype}) near its root {z0}: relative error {err[bad].tolist()} > "
                           f"{bound[bad].tolist()} at z = {z[bad].tolist()}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["mish", "hardswish"])
def test_derivative_near_its_root_reference(act, dtype):
    _check_near_root(act, dtype, _linear_runner(act, "reference"), "cpu")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["mish", "hardswish"])
def test_derivative_near_its_root_triton_interpreter(act, dtype):
    _check_near_root(act, dtype, _linear_runner(act, "triton"), "cpu")
    _check_near_root(act, dtype, _mlp_runner(act, "triton"), "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["mish", "hardswish"])
def test_derivative_near_its_root_gpu(act, dtype, backend):
    _check_near_root(act, dtype, _linear_runner(act, backend), "cuda")
    if backend == "triton":
        _check_near_root(act, dtype, _mlp_runner(act, backend), "cuda")


def _small_lstm(proj):
    torch.manual_seed(0)
    m = nn.LSTM(6, 8, num_layers=2, proj_size=proj, bidirectional=True).double()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(0.01)  # gate pre-activations ~1e-3: tanh and sigmoid near 0, where 2 sigmoid(2x) - 1 cancels
    return m


def _lstm_relative_errors(backend, device, proj):
    m64 = _small_lstm(proj).to(device)
    x64 = (0.01 * torch.randn(5, 3, 6, dtype=torch.float64)).to(device)
    x64.requires_grad_()
    y64 = m64(x64)[0]
    (dx64,) = torch.autograd.grad(y64.sum(), x64)
    m = pydlx.nn.LSTM.from_module(_small_lstm(proj).to(device).float())
    x = x64.detach().float().requires_grad_()
    with pydlx.use_backend(backend):
        y = m(x)[0]
        (dx,) = torch.autograd.grad(y.sum(), x)
    return rel_err(y, y64), rel_err(dx, dx64)


@pytest.mark.parametrize("proj", [0, 3], ids=["plain", "proj3"])
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_lstm_gates_near_zero(backend, proj):
    """Regression: with weights scaled by 0.01 the Triton LSTM was 1.3% off (2 sigmoid(2x) - 1 for tanh)."""
    fwd, bwd = _lstm_relative_errors(backend, "cpu", proj)
    assert fwd < 1e-5 and bwd < 1e-5, (fwd, bwd)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_lstm_gates_near_zero_gpu(backend):
    with _no_tf32():
        fwd, bwd = _lstm_relative_errors(backend, "cuda", 0)
    assert fwd < 1e-5 and bwd < 1e-5, (fwd, bwd)


class _no_tf32:
    """fp32 GEMMs in full precision for the duration (tf32 would dominate the error being measured)."""

    def __enter__(self):
        self.prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.prev


# ----------------------------------------------------------------------------------------------- one table
def test_the_cpp_codes_are_the_tables():
    """csrc/dispatch.h's enum Act, its name -> code function and both switch statements (dispatch.h's
    PYDLX_DISPATCH_ACT, activations.cuh's act_fwd_rt) hold exactly pydlx/activations.py's rows, code for code."""
    import os
    import re

    from pydlx.activations import NONE_CODE, TABLE

    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    header = open(os.path.join(csrc, "dispatch.h")).read()
    cuh = open(os.path.join(csrc, "activations.cuh")).read()
    enum = dict((name, int(code)) for name, code in re.findall(r"\b(k[A-Za-z0-9]+) = (\d+)",
                                                                  re.search(r"enum Act[^{]*\{([^}]*)\}", header)[1]))
    returned = dict(re.findall(r'if \(name == "([a-z_0-9]+)"\) return (k[A-Za-z0-9]+);', header))
    by_code = {code: name for name, code in enum.items()}
    want = {a.name: a.code for a in TABLE}
    assert {n: enum[k] for n, k in returned.items()} == dict(want, none=NONE_CODE)
    assert set(enum.values()) == set(want.values()) | {NONE_CODE}
    dispatched = {enum[k] for k in re.findall(r"PYDLX_ACT_CASE\(pydlx::(k[A-Za-z0-9]+)", header)}
    assert dispatched == set(want.values()) | {NONE_CODE}
    runtime = {enum[k] for k in re.findall(r"case (k[A-Za-z0-9]+): return act_fwd<", cuh)}
    assert runtime == set(want.values()), sorted(by_code[c] for c in set(want.values()) - runtime)
    from pydlx.activations import SELU_ALPHA, SELU_SCALE

    constants = {k: float(v) for k, v in re.findall(r"constexpr float (kSelu[A-Za-z]+) = ([0-9.e+-]+)f;", cuh)}
    assert constants == pytest.approx({"kSeluScale": SELU_SCALE, "kSeluScaleAlpha": SELU_SCALE * SELU_ALPHA},
                                      rel=1e-7)


def test_every_row_has_an_oracle_and_torchs_form():
    """A new row of pydlx/activations.py is swept on every backend only once this file and tests/oracle.py know it:
    adding the row without them fails here."""
    from pydlx.activations import TABLE

    assert {a.name for a in TABLE} <= set(ORACLE) and {a.name for a in TABLE} <= set(TORCH)


def test_the_table_is_torchs():
    """Each row's module, functions and methods compute its forward (torch's), at its default parameter and another;
    the module the table builds is the one it recognises."""
    from pydlx import activations as A

    z = torch.randn(257, dtype=torch.float64) * 4
    for a in A.TABLE:
        for value in ([a.default, 0.3] if a.param else [0.0]):
            spec = A.activation_spec(a.name, value)
            want = a.forward(z, value)
            m = A.module_of(spec)
            assert A.module_spec(m) == spec
            torch.testing.assert_close(m(z.clone()), want, rtol=0, atol=0)
            for s in a.functions:
                args = {k: value for k in s.args if a.param and k == a.param[0]}
                args.update({k: v for k, v in s.fixed.items()})
                assert A.function_spec(s.fn, (), args) == spec, (s, args)
                torch.testing.assert_close(s.fn(z.clone(), **args), want, rtol=0, atol=0)
        for method in a.methods:
            assert A.method_spec(method, 0) == a.name
            torch.testing.assert_close(getattr(z.clone(), method)(), a.forward(z, 0.0), rtol=0, atol=0)
    assert A.function_spec(F.gelu, (), {"approximate": "tanh"}) == "gelu_tanh"
    assert A.function_spec(F.gelu, ("tanh",), {}) == "gelu_tanh" and A.function_spec(F.gelu, (), {}) == "gelu"
    assert A.function_spec(F.leaky_relu, (0.2, True), {}) == "leaky_relu(0.2)"
    assert A.function_spec(torch.relu, (True,), {}) is None  # torch.relu takes no second argument
    assert A.function_spec(F.softplus, (), {}) is None
