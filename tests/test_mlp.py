"""pydlx.ops.mlp / pydlx.nn.MLP against the float64 reference: the fused small-MLP kernels (interpreter on CPU,
compiled on GPU), the chain of fused linears for wide MLPs, the op's autograd, modules, errors, compile."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oracle
import pydlx
from pydlx import reference as ref
from tolerance import assert_close

TORCH_ACT = {None: None, "relu": nn.ReLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU("tanh"), "silu": nn.SiLU,
             "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU,
             "leaky_relu(0.2)": lambda: nn.LeakyReLU(0.2), "elu": nn.ELU, "elu(0.5)": lambda: nn.ELU(0.5),
             "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid, "mish": nn.Mish, "relu6": nn.ReLU6,
             "selu": nn.SELU}
# (sizes, which layers have a bias): odd widths, one layer, deep, wide first layer, narrow last layer
FUSED = [
    pytest.param(([70, 64, 64, 16], None), id="70-64-64-16"),
    pytest.param(([33, 128, 100, 3], (True, False, True)), id="33-128-100-3-mixedbias"),
    pytest.param(([19, 20], None), id="19-20-onelayer"),
    pytest.param(([200, 64, 64, 64, 64, 16], None), id="200-64x4-16"),
    pytest.param(([1, 17, 1], (False, False)), id="1-17-1-nobias"),
]
ACT_PAIRS = [pytest.param(("relu", None), id="relu"), pytest.param(("gelu", "sigmoid"), id="gelu-sigmoid"),
             pytest.param(("tanh", "silu"), id="tanh-silu"), pytest.param((None, "gelu_tanh"), id="none-gelutanh"),
             pytest.param(("sigmoid", "relu"), id="sigmoid-relu"), pytest.param(("silu", None), id="silu")]
# the activations added after the first seven, each once hidden and once last (z saved for hardswish / mish, y for
# the others)
NEW_PAIRS = [pytest.param(pair, id="-".join(pair).replace("(", "").replace(")", "")) for pair in (
    ("leaky_relu(0.2)", "hardswish"), ("elu(0.5)", "mish"), ("hardswish", "relu6"), ("mish", "hardsigmoid"),
    ("relu6", "elu"), ("hardsigmoid", "leaky_relu"))]


def make(sizes, bias, dtype, device="cpu", lead=(77,), requires_grad=True):
    x = torch.randn(*lead, sizes[0], dtype=dtype, device=device)
    ws = [torch.randn(sizes[i + 1], sizes[i], dtype=dtype, device=device) / sizes[i] ** 0.5
          for i in range(len(sizes) - 1)]
    has = bias if bias is not None else [True] * len(ws)
    bs = [torch.randn(sizes[i + 1], dtype=dtype, device=device) if has[i] else None for i in range(len(ws))]
    for t in [x, *ws, *bs]:
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, ws, bs


def leaves(x, ws, bs):
    return [x, *ws, *[b for b in bs if b is not None]]


def fwd_bwd(fn, x, ws, bs, g):
    y = fn(x, ws, bs)
    return [y, *torch.autograd.grad(y, leaves(x, ws, bs), g)]


def mlp_fp64_rounded(x, ws, bs, acts, dtype):
    """The float64 oracle for an MLP computed in ``dtype``: float64 math, with each hidden activation rounded to
    ``dtype`` as eager PyTorch and the kernels store it (straight-through gradient). Without the rounding the oracle
    sees a different z, and a ReLU at its kink flips for a kernel and eager alike: only by luck the same way. The
    activations are tests/oracle.py's (a derivative pydlx takes from y: from y rounded to ``dtype``)."""
    h = x
    for i, (w, b) in enumerate(zip(ws, bs)):
        h = oracle.activation(F.linear(h, w, b), acts[0] if i + 1 < len(ws) else acts[1], dtype)
        if i + 1 < len(ws) and dtype != torch.float64:
            h = h + (h.to(dtype).double() - h).detach()
    return h


def fp64_layers(x, ws, bs, acts, dtype):
    """The float64 oracle's forward (mlp_fp64_rounded's), layer by layer: ([(layer input, pre-activation z that
    requires grad, activation)], output); hidden outputs rounded to ``dtype`` (straight-through)."""
    h = x.detach().double().reshape(-1, x.shape[-1])
    layers = []
    for i, (w, b) in enumerate(zip(ws, bs)):
        z = (h @ w.detach().double().t() + (b.detach().double() if b is not None else 0)).requires_grad_()
        act = acts[0] if i + 1 < len(ws) else acts[1]
        layers.append((h, z, act))
        h = oracle.activation(z, act, dtype)
        if i + 1 < len(ws) and dtype != torch.float64:
            h = h + (h.to(dtype).double() - h).detach()
    return layers, h


def grad_abs_sums(x, ws, bs, g, acts, dtype):
    """(float64) |dZ_l|^T |H_{l-1}| per layer, then the column sums of |dZ_l| per layer with a bias: the sum of the
    absolute terms of each weight- and bias-gradient element (both reductions over the rows), the scale at which
    rounding the terms to ``dtype`` shows when they cancel."""
    layers, h = fp64_layers(x, ws, bs, acts, dtype)
    dzs = torch.autograd.grad(h, [z for _, z, _ in layers], g.detach().double().reshape(h.shape))
    return ([dz.abs().t() @ hin.abs() for dz, (hin, _, _) in zip(dzs, layers)]
            + [dz.abs().sum(0) for dz, b in zip(dzs, bs) if b is not None])


def rows_clear_of_kinks(x, ws, bs, acts, dtype):
    """(rows, 1) float64: 0 for each row where some layer's float64 pre-activation lies within the rounding of its
    sum in float32 (16 ulp of the sum of the absolute terms; the kernels accumulate in float32) of a point where
    its activation's derivative jumps (oracle.kinks), else 1. There the kernel's z and the float64 z can fall on
    different sides of the jump by their sums' rounding alone (seed 48173: z = 8.5e-9 at elu(0.5)'s 0, derivative
    1 in float64 and 0.5 in the kernel), which moves a whole upstream gradient element; the tests give such rows no
    upstream gradient."""
    layers, _ = fp64_layers(x, ws, bs, acts, dtype)
    clear = torch.ones(layers[0][0].shape[0], 1, dtype=torch.float64)
    for (h, z, act), w, b in zip(layers, ws, bs):
        terms = h.abs() @ w.detach().double().abs().t() + (b.detach().double().abs() if b is not None else 0)
        band = 16 * torch.finfo(torch.float32).eps * terms
        for k in oracle.kinks(act):  # (a z of no nonzero term is exact in any sum: not a coin flip)
            clear = clear * ~(((z.detach() - k).abs() <= band) & (band > 0)).any(1, keepdim=True)
    assert clear.sum() >= 0.9 * clear.numel(), "most rows must keep their gradient: the check would test nothing"
    return clear


def check_against_fp64(fn, x, ws, bs, g, acts, dtype):
    g = (g.double().reshape(-1, g.shape[-1]) * rows_clear_of_kinks(x, ws, bs, acts, dtype)).reshape(g.shape)
    g = g.to(x.dtype)
    got = fwd_bwd(fn, x, ws, bs, g)
    up = lambda t: t.detach().double().requires_grad_() if t is not None else None  # noqa: E731
    x64, ws64, bs64 = up(x), [up(w) for w in ws], [up(b) for b in bs]
    want = fwd_bwd(lambda a, b_, c: mlp_fp64_rounded(a, b_, c, acts, dtype), x64, ws64, bs64, g.double())
    eager = fwd_bwd(lambda a, b_, c: ref.mlp.mlp(a, b_, c, *acts), x, ws, bs, g)
    names = ["y", "dx"] + [f"dW{i}" for i in range(len(ws))] + [f"db{i}" for i, b in enumerate(bs) if b is not None]
    sums = [None, None] + grad_abs_sums(x, ws, bs, g, acts, dtype)
    for a, e, base, name, abs_sum in zip(got, want, eager, names, sums):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
        assert_close(a, e, dtype=dtype, name=name, baseline=base, abs_sum=abs_sum)


def pydlx_mlp(acts):
    return lambda x, ws, bs: pydlx.ops.mlp(x, ws, bs, *acts)


# ---- reference and the op's own autograd ----------------------------------------------------------------------

@pytest.mark.parametrize("acts", ACT_PAIRS + NEW_PAIRS)
def test_reference_matches_torch_nn_float64(acts):
    sizes = [13, 21, 8, 5]
    x, ws, bs = make(sizes, None, torch.float64)
    layers = []
    for i, (w, b) in enumerate(zip(ws, bs)):
        lin = nn.Linear(sizes[i], sizes[i + 1], dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        layers.append(lin)
        a = acts[0] if i + 1 < len(ws) else acts[1]
        if a is not None:
            layers.append(TORCH_ACT[a]())
    seq = nn.Sequential(*layers)
    g = torch.randn(77, 5, dtype=torch.float64)
    got = fwd_bwd(lambda *a: ref.mlp.mlp(*a, *acts), x, ws, bs, g)
    y = seq(x)
    want = [y, *torch.autograd.grad(y, [x, *[p for m in seq if isinstance(m, nn.Linear) for p in
                                             (m.weight,)], *[m.bias for m in seq if isinstance(m, nn.Linear)]], g)]
    for a, e in zip(got, want):
        assert_close(a, e)


@pytest.mark.parametrize("acts", ACT_PAIRS + NEW_PAIRS)
@pytest.mark.parametrize("case", FUSED)
def test_op_reference_backend_float64(case, acts):
    """pydlx::mlp_fused and its backward op, computed eagerly: the H/Z layout and the weight-gradient GEMMs."""
    sizes, bias = case
    x, ws, bs = make(sizes, bias, torch.float64, lead=(3, 7))
    g = torch.randn(3, 7, sizes[-1], dtype=torch.float64)
    with pydlx.use_backend("reference"):
        got = fwd_bwd(pydlx_mlp(acts), x, ws, bs, g)
    want = fwd_bwd(lambda *a: mlp_fp64_rounded(*a, acts, torch.float64), x, ws, bs, g)
    for a, e in zip(got, want):
        assert_close(a, e)


# ---- the fused Triton kernels under the interpreter ---------------------------------------------------------------

@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
                                   pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("acts", ACT_PAIRS)
@pytest.mark.parametrize("case", FUSED)
def test_fused_triton_interpreter(case, acts, dtype, poison):
    sizes, bias = case
    x, ws, bs = make(sizes, bias, dtype)
    g = torch.randn(77, sizes[-1], dtype=dtype)
    with pydlx.use_backend("triton"):
        check_against_fp64(pydlx_mlp(acts), x, ws, bs, g, acts, dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
                                   pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("acts", NEW_PAIRS)
@pytest.mark.parametrize("case", [p for p in FUSED if p.id in ("70-64-64-16", "33-128-100-3-mixedbias")])
def test_fused_triton_interpreter_new_activations(case, acts, dtype, poison):
    sizes, bias = case
    x, ws, bs = make(sizes, bias, dtype)
    g = torch.randn(77, sizes[-1], dtype=dtype)
    with pydlx.use_backend("triton"):
        check_against_fp64(pydlx_mlp(acts), x, ws, bs, g, acts, dtype)


@pytest.mark.interpreter
def test_fused_triton_3d_and_noncontiguous_input(poison):
    sizes = [21, 48, 48, 5]
    _, ws, bs = make(sizes, None, torch.float32)
    x = torch.randn(3, 11, 2 * 21)[..., ::2].requires_grad_()  # (3, 11, 21), non-contiguous
    g = torch.randn(3, 11, 5)
    with pydlx.use_backend("triton"):
        check_against_fp64(pydlx_mlp(("gelu", "tanh")), x, ws, bs, g, ("gelu", "tanh"), torch.float32)


@pytest.mark.interpreter
def test_fused_triton_runs_one_kernel_each_way(monkeypatch):
    """Forced triton on a small MLP runs the fused kernels (one launch forward, one backward), not the reference
    and not a chain of linears."""
    tri_lin = importlib.import_module("pydlx.triton.linear")
    launches = []
    common = importlib.import_module("pydlx.triton.common")
    real = common.Tuned.__call__
    monkeypatch.setattr(common.Tuned, "__call__", lambda self, *a: launches.append(self.__name__) or real(self, *a))
    monkeypatch.setattr(tri_lin, "linear_fwd", lambda *a, **k: pytest.fail("a chain of linears ran"))
    ref_mlp = importlib.import_module("pydlx.reference.mlp")
    monkeypatch.setattr(ref_mlp, "mlp_fwd", lambda *a, **k: pytest.fail("the reference ran"))
    monkeypatch.setattr(ref_mlp, "mlp_bwd", lambda *a, **k: pytest.fail("the reference ran"))
    x, ws, bs = make([20, 32, 32, 4], None, torch.float32)
    with pydlx.use_backend("triton"):
        pydlx.ops.mlp(x, ws, bs, "relu").sum().backward()
    assert launches == ["_mlp_fwd_kernel", "_mlp_bwd_kernel"]
    assert all(t.grad is not None for t in leaves(x, ws, bs))


@pytest.mark.interpreter
def test_wide_mlp_runs_a_chain_of_fused_linears(monkeypatch, poison):
    """Layers wider than 128 (the seed autoencoder's 400/200): a chain of pydlx linear kernels, checked."""
    tri_lin = importlib.import_module("pydlx.triton.linear")
    calls = []
    real = tri_lin.linear_fwd
    monkeypatch.setattr(tri_lin, "linear_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    sizes = [50, 150, 20, 150, 50]
    x, ws, bs = make(sizes, None, torch.float32, lead=(9,))
    g = torch.randn(9, 50)
    with pydlx.use_backend("triton"):
        check_against_fp64(pydlx_mlp(("relu", None)), x, ws, bs, g, ("relu", None), torch.float32)
    assert len(calls) == 4


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_empty_batch_and_no_input_grad(backend):
    x, ws, bs = make([6, 16, 3], None, torch.float32, lead=(0,))
    with pydlx.use_backend(backend):
        y = pydlx.ops.mlp(x, ws, bs, "gelu")
        assert y.shape == (0, 3)
        y.sum().backward()
    assert torch.equal(ws[0].grad, torch.zeros_like(ws[0])) and torch.equal(bs[1].grad, torch.zeros_like(bs[1]))
    x, ws, bs = make([6, 16, 3], None, torch.float32, lead=(5,))
    x.requires_grad_(False)
    with pydlx.use_backend(backend):
        pydlx.ops.mlp(x, ws, bs, "relu").sum().backward()
    assert x.grad is None and ws[0].grad is not None


def test_forced_cuda_backend_raises_where_it_cannot_run():
    x, ws, bs = make([6, 16, 3], None, torch.float32)
    with pydlx.use_backend("cuda"), pytest.raises(pydlx.BackendUnavailableError, match="backend .cuda. cannot run"):
        pydlx.ops.mlp(x, ws, bs)
    cuda_mlp = importlib.import_module("pydlx.cuda.mlp")
    assert "forward-only" in cuda_mlp.why_cannot([6, 16, 3], torch.float16, training=True)
    assert "float16 or bfloat16" in cuda_mlp.why_cannot([6, 16, 3], torch.float32, training=False)
    assert "at most 16 layers" in cuda_mlp.why_cannot([6, 200, 3], torch.float16, training=False)
    assert cuda_mlp.why_cannot([6, 16, 3], torch.float16, training=False) is None


# ---- bad input --------------------------------------------------------------------------------------------------------

BAD = [
    pytest.param(lambda x, ws, bs: (x[:, :-1], ws, bs, "relu", None), ValueError, r"weights\[0\].shape\[1\]",
                 id="input-features"),
    pytest.param(lambda x, ws, bs: (x, [ws[0], ws[1][:, :-1]], bs, "relu", None), ValueError,
                 r"weights\[1\].shape\[1\] \(15\) must equal weights\[0\].shape\[0\]", id="chain"),
    pytest.param(lambda x, ws, bs: (x, ws, bs[:1], "relu", None), ValueError, "one tensor or None per weight",
                 id="bias-count"),
    pytest.param(lambda x, ws, bs: (x, ws, [bs[0][:-1], bs[1]], "relu", None), ValueError, r"biases\[0\]",
                 id="bias-shape"),
    pytest.param(lambda x, ws, bs: (x, ws, bs, "swish", None), ValueError, "activation must be one of",
                 id="activation"),
    pytest.param(lambda x, ws, bs: (x, ws, bs, "relu", "softmax"), ValueError, "last_activation must be one of",
                 id="last-activation"),
    pytest.param(lambda x, ws, bs: (x, ws, bs, "softplus(2.0)", None), ValueError, "activation must be one of",
                 id="unknown-spec"),
    pytest.param(lambda x, ws, bs: (x, ws, bs, "leaky_relu(-0.2)", None), ValueError, "negative slope",
                 id="negative-slope"),
    pytest.param(lambda x, ws, bs: (x, ws, bs, "relu", "elu(0.0)"), ValueError,
                 r"last_activation 'elu\(0.0\)'.*alpha <= 0", id="last-elu-alpha"),
    pytest.param(lambda x, ws, bs: (x.int(), ws, bs, "relu", None), TypeError, "floating-point", id="int-input"),
    pytest.param(lambda x, ws, bs: (x, [ws[0].half(), ws[1]], bs, "relu", None), TypeError, r"weights\[0\] has dtype",
                 id="mixed-dtype"),
    pytest.param(lambda x, ws, bs: (x, [ws[0], ws[1].to("meta")], bs, "relu", None), ValueError,
                 r"weights\[1\] is on meta", id="devices"),
    pytest.param(lambda x, ws, bs: (x, [], [], "relu", None), ValueError, "non-empty list", id="no-layers"),
    pytest.param(lambda x, ws, bs: (x, [ws[0][0], ws[1]], bs, "relu", None), ValueError, "must be a 2-D tensor",
                 id="weight-rank"),
]


@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
@pytest.mark.parametrize("mutate,exc,msg", BAD)
def test_bad_input_raises_clear_error_before_any_kernel(mutate, exc, msg, backend, monkeypatch):
    ops_mlp = importlib.import_module("pydlx.ops.mlp")
    monkeypatch.setattr(ops_mlp, "mlp_fused", lambda *a, **k: pytest.fail("a kernel ran on bad input"))
    x, ws, bs = make([8, 16, 3], None, torch.float32, requires_grad=False)
    with pydlx.use_backend(backend), pytest.raises(exc, match=msg):
        pydlx.ops.mlp(*mutate(x, ws, bs))


# ---- modules ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("acts,mods", [
    (("silu", "tanh"), (nn.SiLU, nn.Tanh)), (("mish", "relu6"), (nn.Mish, nn.ReLU6)),
    (("leaky_relu(0.2)", "elu(0.5)"), (lambda: nn.LeakyReLU(0.2), lambda: nn.ELU(0.5)))])
def test_module_state_dict_is_the_sequentials(acts, mods):
    m = pydlx.nn.MLP([12, 32, 32, 4], activation=acts[0], last_activation=acts[1], dtype=torch.float64)
    seq = nn.Sequential(nn.Linear(12, 32), mods[0](), nn.Linear(32, 32), mods[0](), nn.Linear(32, 4), mods[1]())
    seq = seq.double()
    assert list(m.state_dict()) == list(seq.state_dict())
    assert repr(m[1]) == repr(seq[1]) and repr(m[5]) == repr(seq[5])  # the same torch.nn modules, parameters too
    seq.load_state_dict(m.state_dict())
    m.load_state_dict(seq.state_dict())
    x = torch.randn(6, 12, dtype=torch.float64)
    assert_close(m(x), seq(x), name="MLP vs Sequential")


def test_from_sequential_shares_modules_and_keeps_names():
    seq = nn.Sequential(nn.Linear(10, 20), nn.ReLU(True), nn.Linear(20, 30), nn.ReLU(True), nn.Linear(30, 5))
    m = pydlx.nn.MLP.from_sequential(seq)
    assert m[0] is seq[0] and m.activation == "relu" and m.last_activation is None
    assert list(m.state_dict()) == list(seq.state_dict())
    x = torch.randn(4, 10)
    assert_close(m(x), seq(x), dtype=torch.float32, name="from_sequential")
    m2 = pydlx.nn.MLP.from_sequential(nn.Sequential(nn.Linear(3, 4), nn.GELU("tanh"), nn.Linear(4, 2), nn.Sigmoid()))
    assert (m2.activation, m2.last_activation) == ("gelu_tanh", "sigmoid")
    m3 = pydlx.nn.MLP.from_sequential(nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.25), nn.Linear(4, 2), nn.ELU()))
    assert (m3.activation, m3.last_activation) == ("leaky_relu(0.25)", "elu")
    assert pydlx.nn.MLP([3, 4, 2], activation="elu(1.0)", last_activation="leaky_relu(0.01)").activation == "elu"


@pytest.mark.parametrize("seq,msg", [
    (nn.Sequential(nn.ReLU(), nn.Linear(3, 4)), "start with an nn.Linear"),
    (nn.Sequential(nn.Linear(3, 4), nn.Softplus(), nn.Linear(4, 2)), "Softplus after '0' is not a fusable"),
    (nn.Sequential(nn.Linear(3, 4), nn.Dropout(), nn.Linear(4, 2)), "Dropout after '0' is not an activation"),
    (nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(-0.1), nn.Linear(4, 2)), "LeakyReLU.* negative slope"),
    (nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.1), nn.Linear(4, 2), nn.LeakyReLU(0.2), nn.Linear(2, 2)),
     "differ"),
    (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 2)), "differ"),
    (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(), nn.Linear(4, 2)), "more than one module"),
])
def test_from_sequential_rejects_other_patterns(seq, msg):
    with pytest.raises(ValueError, match=msg):
        pydlx.nn.MLP.from_sequential(seq)


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="activation must be one of"):
        pydlx.nn.MLP([3, 4], activation="swish")
    with pytest.raises(ValueError, match="last_activation 'elu.-1.0.'.*alpha <= 0"):
        pydlx.nn.MLP([3, 4], last_activation="elu(-1.0)")
    with pytest.raises(ValueError, match="at least two positive sizes"):
        pydlx.nn.MLP([3])


# ---- torch.library: opcheck, torch.compile, autocast -----------------------------------------------------------------

@pytest.mark.parametrize("acts", [("relu", "none"), ("gelu", "sigmoid"), ("none", "silu"), ("elu(0.5)", "mish")])
def test_opcheck(acts):
    x, ws, bs = make([9, 16, 12, 3], (True, False, True), torch.float32, lead=(2, 5))
    present, has = [b for b in bs if b is not None], [b is not None for b in bs]
    torch.library.opcheck(torch.ops.pydlx.mlp_fused.default, (x, ws, present, has, *acts, True, "reference"))
    # save=False is the inference form: its backward raises by design, so no autograd checks there
    torch.library.opcheck(torch.ops.pydlx.mlp_fused.default, (x, ws, present, has, *acts, False, "reference"),
                          test_utils=("test_schema", "test_faketensor"))
    y, H, Z = torch.ops.pydlx.mlp_fused(x, ws, present, has, *acts, True, "reference")
    g = torch.randn_like(y)
    args = (g, x.detach(), [w.detach() for w in ws], [True, False, True], y.detach(), H, Z, *acts)
    torch.library.opcheck(torch.ops.pydlx.mlp_fused_bwd.default, args + (True, "reference"))
    torch.library.opcheck(torch.ops.pydlx.mlp_fused_bwd.default, args + (False, "reference"))


def test_torch_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()
    m = pydlx.nn.MLP([12, 32, 7], activation="gelu")
    x = torch.randn(5, 12, requires_grad=True)
    with pydlx.use_backend("reference"):
        y = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
        y.sum().backward()
        gx = x.grad.clone()
        x.grad = None
        want = m(x)
        want.sum().backward()
    assert_close(y, want, name="y")
    assert_close(gx, x.grad, name="dx")
    assert torch._dynamo.explain(m)(x).graph_break_count == 0


def test_autocast_cpu_bf16():
    m = pydlx.nn.MLP([16, 32, 8])
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        want = nn.Sequential(*m)(x)
    assert y.dtype == want.dtype == torch.bfloat16
    assert_close(y, want.float(), dtype=torch.bfloat16, name="autocast")


# ---- GPU ------------------------------------------------------------------------------------------------------------

GPU_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
              pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("acts", [pytest.param(("relu", None), id="relu"),
                                  pytest.param(("gelu", "sigmoid"), id="gelu-sigmoid")] + NEW_PAIRS[:2])
@pytest.mark.parametrize("case", FUSED + [pytest.param(([784, 400, 200, 32, 200, 400, 784], None),
                                                       id="seed-autoencoder-chain")])
def test_gpu_against_reference(case, acts, dtype, backend, poison):
    sizes, bias = case
    x, ws, bs = make(sizes, bias, dtype, device="cuda", lead=(1000,))
    g = torch.randn(1000, sizes[-1], dtype=dtype, device="cuda")
    with pydlx.use_backend(backend):
        check_against_fp64(pydlx_mlp(acts), x, ws, bs, g, acts, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("acts", [pytest.param(("relu", None), id="relu"),
                                  pytest.param(("gelu", "sigmoid"), id="gelu-sigmoid")] + NEW_PAIRS)
@pytest.mark.parametrize("case", FUSED + [pytest.param(([300, 16, 16], None), id="300-16-16-multichunk")])
def test_gpu_cuda_fused_forward(case, acts, dtype, poison):
    """The C++/CUDA fused MLP forward (inference) against float64, eager in the same dtype as the baseline."""
    sizes, bias = case
    x, ws, bs = make(sizes, bias, dtype, device="cuda", lead=(1000,), requires_grad=False)
    with pydlx.use_backend("cuda"):
        y = pydlx.ops.mlp(x, ws, bs, *acts)
    up = lambda t: t.double() if t is not None else None  # noqa: E731
    want = mlp_fp64_rounded(x.double(), [w.double() for w in ws], [up(b) for b in bs], acts, dtype)
    assert_close(y, want, dtype=dtype, name="y", baseline=ref.mlp.mlp(x, ws, bs, *acts))
