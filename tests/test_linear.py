"""pydlx.ops.linear / pydlx.nn.Linear against the float64 reference, on every backend this machine can run.

CPU (CI): reference vs torch.nn in float64; Triton kernels under the interpreter (fp32, fp16, bf16 upcast),
forward and backward, odd shapes, poisoned outputs; backend rules; bad inputs; opcheck; torch.compile.
GPU (marked gpu): every backend against the float64 reference, bf16 included, at odd and benchmark shapes.
"""
import importlib
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pydlx
from pydlx import reference as ref
from pydlx.activations import ACTIVATIONS, MONOTONE, activation_spec, parse_activation, saves_preact
from pydlx.reference.linear import activation_backward
import oracle
from tolerance import assert_close, rel_err

# The first seven run through the full cross product of shapes and dtypes on the interpreter; those added later
# (leaky_relu, elu, hardswish, hardsigmoid, mish, relu6, selu; leaky_relu / elu also with a parameter) through fewer
# shapes (test_triton_interpreter_new_activations). The torch modules are written out here (the test's own
# expectation), not read from pydlx's table.
ACTS = [pytest.param(a, id=str(a)) for a in (None, "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid")]
NEW_ACTS = [pytest.param(a, id=a) for a in oracle.NEW]
ALL_ACTS = ACTS + NEW_ACTS
TORCH_ACT = {None: nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU("tanh"),
             "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU,
             "leaky_relu(0.2)": lambda: nn.LeakyReLU(0.2), "elu": nn.ELU, "elu(0.5)": lambda: nn.ELU(0.5),
             "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid, "mish": nn.Mish, "relu6": nn.ReLU6,
             "selu": nn.SELU}
# (leading dims, in_features, out_features): odd, non-power-of-two and size-1 dims; 3-D and 1-D inputs.
SHAPES = [
    pytest.param(((37,), 70, 45), id="37x70->45"),
    pytest.param(((1,), 1, 1), id="1x1->1"),
    pytest.param(((2, 5), 33, 17), id="2x5x33->17"),
    pytest.param(((), 19, 7), id="1d-19->7"),
    pytest.param(((150,), 40, 66), id="150x40->66-splitk"),
]


def make(lead, k, n, dtype, device="cpu", bias=True, requires_grad=True):
    x = torch.randn(*lead, k, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device) / math.sqrt(k)
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, w, b


def torch_module(k, n, act, bias, x, w, b):
    lin = nn.Linear(k, n, bias=bias, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            lin.bias.copy_(b)
    return nn.Sequential(lin, TORCH_ACT[act]())


def grads(y, g, *ts):
    return torch.autograd.grad(y, [t for t in ts if t is not None], g)


def run_fwd_bwd(fn, x, w, b, g):
    y = fn(x, w, b)
    return (y,) + grads(y, g, x, w, b)


# ---- the reference itself ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("act", ALL_ACTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_reference_matches_torch_nn_float64(act, bias):
    x, w, b = make((29,), 31, 23, torch.float64, bias=bias)
    mod = torch_module(31, 23, act, bias, x.detach(), w.detach(), b.detach() if bias else None)
    g = torch.randn(29, 23, dtype=torch.float64)
    y = ref.linear.linear(x, w, b, act)
    y_nn = mod(x)
    assert_close(y, y_nn, name="y")
    for got, want, name in zip(grads(y, g, x, w, b), grads(y_nn, g, x, *mod[0].parameters()), "xwb"):
        assert_close(got, want, name=f"d{name}")


@pytest.mark.parametrize("act", [a for a in ALL_ACTS if a.values[0] is not None])
def test_reference_activation_backward_is_the_derivative(act):
    """The hand-written derivatives (the kernels' oracle) against autograd of the float64 oracle (tests/oracle.py;
    torch's own float64 hardsigmoid backward multiplies by 1/6 rounded to float32), over a wide range; at the kinks
    (0, relu6's 6, hardswish's and hardsigmoid's -3 and 3) and for NaN, torch's conventions."""
    kinks = [0.0, -0.0, 6.0, -3.0, 3.0, float("nan")]
    z = torch.cat([torch.randn(4001, dtype=torch.float64) * 4, torch.tensor(kinks, dtype=torch.float64)])
    z.requires_grad_()
    y = oracle.ORACLE[act](z)
    g = torch.randn_like(z)
    (want,) = torch.autograd.grad(y, z, g)
    assert_close(pydlx.activations.forward(z.detach(), act), y, name=act)
    saved = z.detach() if saves_preact(act) else y.detach()
    assert_close(activation_backward(g, saved, act), want, name=f"{act}'")


def test_activation_specs():
    """Specs: parsed, written back in canonical form (exactly: Python's float repr), refused with the reason."""
    assert parse_activation(None) == (None, 0.0) and parse_activation("gelu") == ("gelu", 0.0)
    assert parse_activation("leaky_relu") == ("leaky_relu", 0.01) and parse_activation("elu") == ("elu", 1.0)
    assert parse_activation("leaky_relu(0.2)") == ("leaky_relu", 0.2)
    assert parse_activation("elu( 5e-1 )") == ("elu", 0.5)
    for name, value in (("leaky_relu", 0.1 + 0.2), ("elu", 1 / 3), ("leaky_relu", 0.0), ("elu", 2.0)):
        spec = activation_spec(name, value)
        assert parse_activation(spec) == (name, value) and activation_spec(*parse_activation(spec)) == spec
    assert activation_spec("leaky_relu", 0.01) == "leaky_relu" and activation_spec("elu", 1) == "elu"
    assert activation_spec("leaky_relu", 0.2) == "leaky_relu(0.2)" and activation_spec("mish", 0.0) == "mish"
    for bad, msg in (("swish", "activation must be one of"), ("leaky_relu()", "finite number"),
                     ("elu(inf)", "finite number"), ("relu(0.5)", "takes no parameter"), (3, "must be one of"),
                     ("leaky_relu(0.2", "must be one of")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            parse_activation(bad)
    with pytest.raises(ValueError, match="negative slope"):
        pydlx.activations.check_activation("leaky_relu(-0.1)")
    with pytest.raises(ValueError, match="alpha <= 0"):
        pydlx.activations.check_activation("elu(0.0)")
    assert pydlx.activations.check_activation("leaky_relu(0.0)") == ("leaky_relu", 0.0)
    # specs are kept once parsed: a second look gives the same answers and the same refusals, a spec of another
    # type (unhashable too) still raises ValueError, and the kept table stays bounded
    for _ in range(2):
        assert parse_activation("leaky_relu(0.2)") == ("leaky_relu", 0.2)
        assert pydlx.activations.check_activation("relu") == ("relu", 0.0)
        with pytest.raises(ValueError, match="negative slope"):
            pydlx.activations.check_activation("leaky_relu(-0.1)")
        for bad in ("swish", ["relu"], {"relu": 1}):
            with pytest.raises(ValueError, match="must be one of"):
                pydlx.activations.check_activation(bad)
    for i in range(2 * pydlx.activations._PARSED_MAX):
        assert parse_activation(f"elu({i + 1})") == ("elu", float(i + 1))
    assert len(pydlx.activations._PARSED) <= pydlx.activations._PARSED_MAX
    assert {a for a in ACTIVATIONS if a and saves_preact(a)} == {"gelu", "gelu_tanh", "silu", "hardswish", "mish"}


@pytest.mark.parametrize("act", sorted(MONOTONE))
def test_monotone_activations_are_non_decreasing(act):
    """MONOTONE (max pooling commutes with these): non-decreasing, with the parameters the ops accept."""
    z = torch.linspace(-60, 60, 200001, dtype=torch.float64)
    for spec in ({"leaky_relu": ["leaky_relu", "leaky_relu(0.0)", "leaky_relu(3.0)"],
                  "elu": ["elu", "elu(0.01)", "elu(4.0)"]}.get(act, [act])):
        y = pydlx.activations.forward(z, spec)
        assert (y[1:] >= y[:-1]).all(), spec
    assert not set(MONOTONE) - set(ACTIVATIONS)
    for other in {"gelu", "gelu_tanh", "silu", "hardswish", "mish"}:  # and the others are not: dips below 0
        y = pydlx.activations.forward(z, other)
        assert not (y[1:] >= y[:-1]).all() and other not in MONOTONE


# ---- the op on the reference backend (autograd through the custom op) --------------------------------------------

@pytest.mark.parametrize("act", ALL_ACTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_op_reference_backend_float64(shape, act):
    lead, k, n = shape
    x, w, b = make(lead, k, n, torch.float64)
    g = torch.randn(*lead, n, dtype=torch.float64)
    with pydlx.use_backend("reference"):
        got = run_fwd_bwd(lambda *a: pydlx.ops.linear(*a, activation=act), x, w, b, g)
    want = run_fwd_bwd(lambda *a: oracle.activation(F.linear(*a), act, torch.float64), x, w, b, g)
    for a_, e_, name in zip(got, want, ["y", "dx", "dw", "db"]):
        assert_close(a_, e_, name=name)


# ---- Triton kernels under the interpreter ----------------------------------------------------------------------

DTYPES_INTERP = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
                 pytest.param(torch.bfloat16, id="bf16")]


def check_against_fp64(fn_dtype, x, w, b, g, act, dtype, baseline=True):
    """Run the pydlx op on ``x, w, b`` (in ``dtype``) and compare y, dx, dw, db to float64 (tests/oracle.py: for
    the activations whose derivative is taken from y, from y rounded to ``dtype`` as stored), with eager PyTorch in
    the same dtype as the baseline error for fp16/bf16."""
    got = run_fwd_bwd(fn_dtype, x, w, b, g)
    x64, w64, b64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    want = run_fwd_bwd(lambda *a: oracle.activation(F.linear(*a), act, dtype), x64, w64, b64, g.double())
    eager = run_fwd_bwd(lambda *a: ref.linear.linear(*a, activation=act), x, w, b, g) if baseline else [None] * 4
    for a_, e_, base, name in zip(got, want, eager, ["y", "dx", "dw", "db"]):
        assert a_.dtype == dtype, f"{name} dtype {a_.dtype} != {dtype}"
        assert_close(a_, e_, dtype=dtype, name=name, baseline=base)


def check_backend(backend, shape, act, dtype, device):
    """Fresh random inputs of ``shape`` on ``device``; pydlx.ops.linear on ``backend`` vs float64, fwd and bwd."""
    lead, k, n = shape
    x, w, b = make(lead, k, n, dtype, device=device)
    g = torch.randn(*lead, n, dtype=dtype, device=device)
    with pydlx.use_backend(backend):
        check_against_fp64(lambda *a: pydlx.ops.linear(*a, activation=act), x, w, b, g, act, dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES_INTERP)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_interpreter(shape, act, dtype, poison):
    check_backend("triton", shape, act, dtype, "cpu")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES_INTERP)
@pytest.mark.parametrize("act", NEW_ACTS)
@pytest.mark.parametrize("shape", [p for p in SHAPES if p.id in ("37x70->45", "150x40->66-splitk")])
def test_triton_interpreter_new_activations(shape, act, dtype, poison):
    check_backend("triton", shape, act, dtype, "cpu")


@pytest.mark.interpreter
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_triton_interpreter_no_bias_and_noncontiguous(act, poison):
    base = torch.randn(40, 2 * 53)
    x = base[:, ::2].requires_grad_()  # non-contiguous input
    w = (torch.randn(53, 31) / 8).t().requires_grad_()  # weight given as a transposed view
    g = torch.randn(40, 31)
    with pydlx.use_backend("triton"):
        check_against_fp64(lambda x_, w_, b_: pydlx.ops.linear(x_, w_, None, act), x, w, None, g, act,
                           torch.float32)


@pytest.mark.interpreter
def test_triton_interpreter_strided_bias(poison):
    x, w, _ = make((5,), 9, 7, torch.float32)
    b = torch.randn(14)[::2].requires_grad_()  # the kernel reads bias with unit stride: it must be made contiguous
    g = torch.randn(5, 7)
    with pydlx.use_backend("triton"):
        check_against_fp64(lambda *a: pydlx.ops.linear(*a, activation="tanh"), x, w, b, g, "tanh", torch.float32)


def test_triton_strides_beyond_32bit_tile_offsets_are_made_contiguous():
    from pydlx.triton import linear as tri

    wide = torch.empty_strided((2, 3), (tri.MAX_STRIDE + 1, 1))
    assert tri._small_strides(wide).stride() == (3, 1)
    ok = torch.empty(4, 5).t()
    assert tri._small_strides(ok) is ok


def test_triton_refuses_feature_counts_beyond_32bit_tile_offsets():
    from pydlx.triton import linear as tri

    call = lambda K, N: pydlx.registry.LinearCall(torch.float32, False, 2, N, K)  # noqa: E731
    assert tri.supports(call(tri.MAX_STRIDE, 3), None) is None
    assert "at most" in tri.supports(call(tri.MAX_STRIDE + 1, 3), None)
    with pydlx.use_backend("triton"), pytest.raises(pydlx.BackendUnavailableError, match="at most"):
        pydlx._backend.choose("linear", torch.device("cpu"), call(tri.MAX_STRIDE + 1, 3))


@pytest.mark.interpreter
def test_poison_fixture_poisons(poison):
    """The poison fixture is what makes 'every element written' checkable: prove it fills new tensors."""
    assert torch.isnan(torch.randn(3).new_empty(5, 7)).all()


@pytest.mark.interpreter
def test_triton_every_shipped_forward_config_under_interpreter(poison):
    """Each shipped autotune config (not only the interpreter's small tile) computes the right thing."""
    from pydlx.triton import linear as tri

    x, w, b = make((67,), 70, 130, torch.float16, requires_grad=False)
    want = ref.linear.linear(x.double(), w.double(), b.double(), "gelu")
    for cfg in tri.FWD_CONFIGS:
        y = x.new_empty(67, 130)
        z = torch.empty_like(y)
        grid = (math.ceil(67 / cfg.kwargs["BLOCK_M"]) * math.ceil(130 / cfg.kwargs["BLOCK_N"]),)
        tri._linear_fwd_kernel[grid](x, w, b, y, z, 67, 130, 70, x.stride(0), x.stride(1), w.stride(0),
                                     w.stride(1), y.stride(0), y.stride(1),
                                     ACT=2, ALPHA=0.0, HAS_BIAS=True, SAVE_PREACT=True, PRECISION="tf32",
                                     **cfg.kwargs)
        assert_close(y, want, dtype=torch.float16, name=f"y[{cfg}]")
        assert_close(z, x.double() @ w.double().t() + b.double(), dtype=torch.float16, name=f"z[{cfg}]")


@pytest.mark.interpreter
def test_triton_dw_split_reduction_is_exercised():
    from pydlx.triton import linear as tri

    rows = tri.split_rows(66, 40, 150, torch.device("cpu"))
    assert rows < 150, "the interpreter tests must run the split-reduction path of the dw GEMM"


@pytest.mark.interpreter
def test_triton_forced_backend_runs_triton(monkeypatch):
    """A test that forces triton must be testing Triton: the launcher is called, the reference is not."""
    from pydlx.triton import linear as tri

    calls = []
    real_fwd, real_bwd = tri.linear_fwd, tri.linear_bwd
    monkeypatch.setattr(tri, "linear_fwd", lambda *a, **k: calls.append("fwd") or real_fwd(*a, **k))
    monkeypatch.setattr(tri, "linear_bwd", lambda *a, **k: calls.append("bwd") or real_bwd(*a, **k))

    def boom(*a, **k):
        raise AssertionError("reference ran under a forced triton backend")

    ref_linear = importlib.import_module("pydlx.reference.linear")
    monkeypatch.setattr(ref_linear, "linear_fwd", boom)
    monkeypatch.setattr(ref_linear, "linear_bwd", boom)
    x, w, b = make((9,), 11, 13, torch.float32)
    with pydlx.use_backend("triton"):
        pydlx.ops.linear(x, w, b, "silu").sum().backward()
    assert calls == ["fwd", "bwd"]


# ---- empty batches, NaN ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_empty_batch(backend):
    x, w, b = make((0,), 12, 5, torch.float32)
    with pydlx.use_backend(backend):
        y = pydlx.ops.linear(x, w, b, "relu")
        assert y.shape == (0, 5)
        y.sum().backward()
    assert x.grad.shape == (0, 12)
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("act", ALL_ACTS)
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_nan_propagates_like_torch(backend, act):
    x, w, b = make((6,), 10, 8, torch.float32, requires_grad=False)
    x[2, 3] = float("nan")
    with pydlx.use_backend(backend):
        y = pydlx.ops.linear(x, w, b, act)
    want = torch_module(10, 8, act, True, x, w, b)(x)
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    assert torch.isnan(y[2]).all() and not torch.isnan(y[[0, 1, 3, 4, 5]]).any()


# torch's CPU backward of these at a NaN input depends on the tensor's length (its vectorized loop differs from the
# scalar one: 3 NaNs pass the gradient, 64 give NaN for elu / hardswish / selu and 0 for relu6), so there is no
# torch behaviour to match on a CPU; pydlx follows the scalar convention (torch's CUDA kernels), checked per element
# against autograd in test_reference_activation_backward_is_the_derivative.
NAN_VARIES_WITH_LENGTH = ("elu", "elu(0.5)", "hardswish", "relu6", "selu")


@pytest.mark.parametrize("act", [a for a in ALL_ACTS if a.values[0] not in NAN_VARIES_WITH_LENGTH])
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_nan_gradient_like_torch(backend, act):
    """A NaN in one input row: the input's gradient is torch's, the NaN row's included (torch's relu backward
    passes the gradient where y is NaN, hardsigmoid's gives 0, tanh's NaN, ...)."""
    x, w, b = make((6,), 10, 8, torch.float32)
    with torch.no_grad():
        x[2, 3] = float("nan")
    g = torch.randn(6, 8)
    with pydlx.use_backend(backend):
        (got,) = torch.autograd.grad(pydlx.ops.linear(x, w, b, act), x, g)
    ref = torch_module(10, 8, act, True, x, w, b)
    (want,) = torch.autograd.grad(ref(x), x, g)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (torch.isnan(got)[2], torch.isnan(want)[2])
    assert_close(got.nan_to_num(0), want.nan_to_num(0), name="dx")


# ---- backend rules -------------------------------------------------------------------------------------------------

def test_auto_uses_reference_for_cpu_tensors(monkeypatch):
    from pydlx.triton import linear as tri

    monkeypatch.setattr(tri, "linear_fwd", lambda *a, **k: pytest.fail("auto ran triton on a CPU tensor"))
    x, w, b = make((4,), 3, 2, torch.float32)
    with pydlx.use_backend("auto"):
        pydlx.ops.linear(x, w, b, "relu")


def test_forced_backend_that_cannot_run_raises():
    x, w, b = make((4,), 3, 2, torch.float32)
    with pydlx.use_backend("cuda"), pytest.raises(pydlx.BackendUnavailableError, match="cuda.*CUDA tensors"):
        pydlx.ops.linear(x, w, b)
    x64, w64, b64 = make((4,), 3, 2, torch.float64)
    with pydlx.use_backend("triton"), pytest.raises(pydlx.BackendUnavailableError, match="float64"):
        pydlx.ops.linear(x64, w64, b64)


def test_backend_names_and_env(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        with pydlx.use_backend("tensorrt"):
            pass
    monkeypatch.setenv("PYDLX_BACKEND", "reference")
    assert pydlx.current_backend() == "reference"
    with pydlx.use_backend("triton"):
        assert pydlx.current_backend() == "triton"
    assert pydlx.current_backend() == "reference"
    info = pydlx.backends()
    assert set(info) == {"reference", "triton", "cuda", "policy"} and info["reference"] == "available"
    # loaded (tests/test_extension.py builds it) or, when missing, says why
    assert info["cuda"].startswith("available") or (info["cuda"].startswith("not built") and ":" in info["cuda"])


def test_backends_tell_the_truth_about_the_interpreter_without_numpy():
    """Triton's interpreter computes with numpy: without it, backends() must not advertise TRITON_INTERPRET=1, and
    a forced triton backend on CPU tensors refuses with the reason (not a ModuleNotFoundError from inside Triton)."""
    code = """
import sys
sys.modules["numpy"] = None  # as if numpy were not installed
import torch, pydlx
print("STATUS", pydlx.backends()["triton"])
try:
    with pydlx.use_backend("triton"):
        pydlx.ops.linear(torch.randn(2, 3), torch.randn(4, 3))
except pydlx.BackendUnavailableError as e:
    print("REFUSED", e)
"""
    for interpret in ("0", "1"):
        env = dict(os.environ, TRITON_INTERPRET=interpret)
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        status = r.stdout.split("STATUS ", 1)[1].splitlines()[0]
        # a triton that imports numpy itself (3.8) cannot be imported; 3.9 imports, its interpreter needs numpy
        assert ("cannot be imported" in status and "numpy" in status) or \
            ("needs numpy" in status and "set TRITON_INTERPRET=1 to run" not in status), status
        refusal = r.stdout.split("REFUSED", 1)[1] if "REFUSED" in r.stdout else ""
        assert ("numpy" if interpret == "1" else "TRITON_INTERPRET=1") in refusal, r.stdout


@pytest.mark.interpreter
def test_backends_tell_when_the_interpreter_breaks_on_numpy_2_4(monkeypatch):
    """Triton 3.6's interpreter (the GPU machines' Triton) fails every kernel with numpy >= 2.4
    (triton-lang/triton#9171): backends() says so and a forced triton backend refuses, instead of an
    InterpreterError from inside Triton. Here (a fixed Triton) the probe kernel runs; a broken one is simulated."""
    import pydlx.triton as triton_backend

    assert triton_backend._interpreter_loops_work()  # this Triton's interpreter runs a loop over a run-time bound
    monkeypatch.setattr(triton_backend, "_numpy_strict_scalars", lambda: True)
    monkeypatch.setattr(triton_backend, "_interpreter_loops_work", lambda: False)
    triton_backend._interpreter_error.cache_clear()
    try:
        assert "triton-lang/triton#9171" in pydlx.backends()["triton"]
        with pydlx.use_backend("triton"), pytest.raises(pydlx.BackendUnavailableError, match="numpy<2.4"):
            pydlx.ops.linear(torch.randn(2, 3), torch.randn(4, 3))
    finally:
        monkeypatch.undo()
        triton_backend._interpreter_error.cache_clear()


# ---- bad input -------------------------------------------------------------------------------------------------------

BAD = [
    pytest.param(lambda x, w, b: (x[:, :-1], w, b, None), ValueError, "last dimension.*in_features", id="features"),
    pytest.param(lambda x, w, b: (x.long(), w, b, None), TypeError, "input must be a floating", id="int-input"),
    pytest.param(lambda x, w, b: (x, w.int(), b, None), TypeError, "weight must be a floating", id="int-weight"),
    pytest.param(lambda x, w, b: (x, w, b, "swish"), ValueError, "activation must be one of", id="activation"),
    pytest.param(lambda x, w, b: (x, w, b, "swish(0.2)"), ValueError, "activation must be one of", id="unknown-spec"),
    pytest.param(lambda x, w, b: (x, w, b, "leaky_relu(a)"), ValueError, "finite number", id="bad-parameter"),
    pytest.param(lambda x, w, b: (x, w, b, "leaky_relu(-0.1)"), ValueError, "negative slope", id="negative-slope"),
    pytest.param(lambda x, w, b: (x, w, b, "elu(-1.0)"), ValueError, "alpha <= 0", id="elu-alpha"),
    pytest.param(lambda x, w, b: (x, w.to("meta"), b, None), ValueError, "weight is on meta", id="devices"),
    pytest.param(lambda x, w, b: (x, w[0], b, None), ValueError, "weight must be a 2-D", id="weight-rank"),
    pytest.param(lambda x, w, b: (x, w, b[:-1], None), ValueError, "bias must be 1-D", id="bias-shape"),
    pytest.param(lambda x, w, b: (x, w.half(), b, None), TypeError, "weight has dtype", id="mixed-dtype"),
    pytest.param(lambda x, w, b: (x[0, 0], w, b, None), ValueError, "at least 1 dimension", id="0d"),
]


@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
@pytest.mark.parametrize("mutate,exc,msg", BAD)
def test_bad_input_raises_clear_error_before_any_kernel(mutate, exc, msg, backend, monkeypatch):
    ops_linear = importlib.import_module("pydlx.ops.linear")  # the module, not the function it exports

    monkeypatch.setattr(ops_linear, "linear_fwd", lambda *a, **k: pytest.fail("a kernel ran on bad input"))
    x, w, b = make((5,), 6, 4, torch.float32, requires_grad=False)
    with pydlx.use_backend(backend), pytest.raises(exc, match=msg):
        pydlx.ops.linear(*mutate(x, w, b))


def test_module_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        pydlx.nn.Linear(3, 4, activation="swish")
    with pytest.raises(ValueError, match="negative slope"):
        pydlx.nn.Linear(3, 4, activation="leaky_relu(-0.5)")


# ---- modules -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_module_is_a_drop_in_for_nn_linear(bias):
    lin = nn.Linear(13, 9, bias=bias, dtype=torch.float64)
    fused = pydlx.nn.Linear.from_module(lin, activation="gelu")
    assert fused.weight is lin.weight and fused.bias is lin.bias  # shared, not copied
    assert list(fused.state_dict()) == list(lin.state_dict())
    fresh = pydlx.nn.Linear(13, 9, bias=bias, activation="gelu", dtype=torch.float64)
    fresh.load_state_dict(lin.state_dict())  # checkpoints load both ways
    lin.load_state_dict(fresh.state_dict())
    x = torch.randn(3, 4, 13, dtype=torch.float64)
    assert_close(fresh(x), F.gelu(lin(x)), name="module")
    assert "activation='gelu'" in repr(fused)


def test_from_module_rejects_other_modules():
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        pydlx.nn.Linear.from_module(nn.Conv1d(2, 3, 1))


# ---- torch.library: opcheck, torch.compile, autocast ----------------------------------------------------------------

@pytest.mark.parametrize("act", ["relu", "gelu", "none", "leaky_relu(0.2)", "mish"])
def test_opcheck(act):
    x, w, b = make((2, 7), 11, 5, torch.float32)
    save = act in ("gelu", "mish")
    torch.library.opcheck(torch.ops.pydlx.linear_fwd.default, (x, w, b, act, save, "reference"))
    torch.library.opcheck(torch.ops.pydlx.linear_fwd.default, (x, w, None, act, save, "reference"))
    g = torch.randn(2, 7, 5)
    saved = torch.randn(2, 7, 5) if act != "none" else x.new_empty(0)
    torch.library.opcheck(torch.ops.pydlx.linear_bwd.default, (g, x.detach(), w.detach(), saved, act, True,
                                                               True, True, "reference"))
    torch.library.opcheck(torch.ops.pydlx.linear_bwd.default, (g, x.detach(), w.detach(), saved, act, False,
                                                               False, True, "reference"))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_no_graph_break(compile_backend):
    torch._dynamo.reset()
    model = nn.Sequential(pydlx.nn.Linear(12, 20, activation="relu"), pydlx.nn.Linear(20, 6, activation="gelu"))
    x = torch.randn(5, 12, requires_grad=True)
    with pydlx.use_backend("reference"):
        compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
        y = compiled(x)
        y.sum().backward()
        gx, gw = x.grad.clone(), model[0].weight.grad.clone()
        x.grad = None
        model.zero_grad()
        want = model(x)
        want.sum().backward()
    assert_close(y, want, name="y")
    assert_close(gx, x.grad, name="dx")
    assert_close(gw, model[0].weight.grad, name="dw")
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0


def test_autocast_cpu_bf16():
    lin = pydlx.nn.Linear(16, 8, activation="relu")
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
        want = torch.relu(F.linear(x, lin.weight, lin.bias))
    assert y.dtype == want.dtype == torch.bfloat16
    assert_close(y, want.float(), dtype=torch.bfloat16, name="autocast")
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32


# ---- GPU: every backend against the float64 reference -------------------------------------------------------------

GPU_SHAPES = [p for p in SHAPES if p.id != "1d-19->7"] + [
    pytest.param(((4096,), 1024, 256), id="4096x1024->256"), pytest.param(((65536,), 256, 256), id="65536x256->256")]
GPU_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
              pytest.param(torch.bfloat16, id="bf16")]
# The GPU suite runs with PYDLX_TRITON_AUTOTUNE=0 (scripts/gpu_check.sh): one config a launch, so it spends its
# minutes on checks, not on compiling every config for every shape; test_gpu_every_config covers the rest.


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "reference"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_backend_against_reference(shape, act, dtype, backend, poison):
    check_backend(backend, shape, act, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("act", ALL_ACTS)
@pytest.mark.parametrize("shape", [pytest.param(((37,), 70, 45), id="37x70->45"),
                                   pytest.param(((256,), 512, 384), id="256x512->384")])
def test_gpu_every_activation(shape, act, dtype, backend, poison):
    check_backend(backend, shape, act, dtype, "cuda")


def _shipped_config_cases():
    """(config, dtype) for every shipped config and the dtypes it ships for on this machine's GPU (sm_90 rules
    when there is none: those tests are skipped anyway)."""
    from pydlx.triton import linear as tri

    arch = 90
    if torch.cuda.is_available():
        arch = 90 if torch.cuda.get_device_capability()[0] >= 9 else 80
    seen, cases = [], []
    for c in tri.FWD_CONFIGS + tri.FWD_CONFIGS_WIDE + tri.BWD_CONFIGS:
        if any(c is o for o in seen):
            continue
        seen.append(c)
        for p in GPU_DTYPES:
            if tri.configs_for([c], p.values[0].itemsize, arch):
                k = c.kwargs
                cases.append(pytest.param(c, p.values[0], id=f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}"
                                          f"w{c.num_warps}s{c.num_stages}-{p.id}"))
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("cfg,dtype", _shipped_config_cases())
def test_gpu_every_config(cfg, dtype, act, poison):
    """Every shipped config, in the forward and both backward GEMMs, at an odd shape that is not a tile multiple."""
    from pydlx.triton.common import forced_config

    x, w, b = make((300,), 200, 130, dtype, device="cuda")
    g = torch.randn(300, 130, dtype=dtype, device="cuda")
    with pydlx.use_backend("triton"), forced_config(cfg):
        check_against_fp64(lambda *a: pydlx.ops.linear(*a, activation=act), x, w, b, g, act, dtype)


@pytest.mark.gpu
def test_gpu_autotuned_launch(monkeypatch):
    monkeypatch.setenv("PYDLX_TRITON_AUTOTUNE", "1")
    x, w, b = make((512,), 256, 128, torch.bfloat16, device="cuda")
    g = torch.randn(512, 128, dtype=torch.bfloat16, device="cuda")
    with pydlx.use_backend("triton"):
        check_against_fp64(lambda *a: pydlx.ops.linear(*a, activation="relu"), x, w, b, g, "relu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_gpu_fp32_follows_allow_tf32(tf32):
    x, w, b = make((300,), 512, 200, torch.float32, device="cuda", requires_grad=False)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with pydlx.use_backend("triton"):
            y = pydlx.ops.linear(x, w, b, "relu")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    err = rel_err(y, ref.linear.linear(x.double(), w.double(), b.double(), "relu"))
    assert (err < 1e-5) if not tf32 else (1e-6 < err < 5e-3), f"relative error {err:.2e} with allow_tf32={tf32}"


@pytest.mark.gpu
def test_gpu_auto_picks_triton_and_cuda_graph_capture():
    x, w, b = make((256,), 128, 64, torch.bfloat16, device="cuda")
    call = pydlx.registry.LinearCall(x.dtype, False, 256, 64, 128)
    assert pydlx._backend.choose("linear", x.device, call) == "triton"
    lin = pydlx.nn.Linear(128, 64, activation="gelu", device="cuda", dtype=torch.bfloat16)
    static_x = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for _ in range(2):  # warm up (autotune) outside the graph
        lin(static_x).sum().backward()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lin(static_x)
        out.float().sum().backward()
    static_x.data.copy_(torch.randn_like(static_x))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, ref.linear.linear(static_x.double(), lin.weight.double(), lin.bias.double(), "gelu"),
                 dtype=torch.bfloat16, name="graph replay")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_an_nd_output_may_be_modified_in_place(backend):
    """A Linear (and an MLP) on (*, in) input followed by an in-place op (``y += 1``, ``nn.Hardswish(inplace=True)``):
    the op's N-D output is not an autograd view, so autograd allows it, and the values and gradients are eager's."""
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    w2 = torch.randn(3, 4, dtype=torch.float64)
    F = torch.nn.functional
    dtype = torch.float64 if backend == "reference" else torch.float32

    def run(fused):
        xs, ws, bs, w2s = (t.detach().to(dtype).requires_grad_() for t in (x, w, b, w2))
        if fused:
            with pydlx.use_backend(backend):
                y = pydlx.ops.linear(xs, ws, bs)  # (relu's output is saved for backward: in eager too)
                m = pydlx.ops.mlp(xs, [ws, w2s], [bs, None], "relu")
        else:
            y = F.linear(xs, ws, bs)
            m = F.linear(torch.relu(F.linear(xs, ws, bs)), w2s)
        y.add_(1.0)
        F.hardswish(m, inplace=True)
        (y * 0.5 + 0).sum().backward(retain_graph=True)
        (m * m).sum().backward()
        return [y, m] + [t.grad for t in (xs, ws, bs, w2s)]

    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, **tol)
