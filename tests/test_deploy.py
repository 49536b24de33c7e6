"""An optimized model exported as the original is: the same forward signature, torch.export with a dynamic batch
dimension giving the original's results at other batch sizes, and the exported program saved and loaded."""
from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch
from torch import nn
from torch.export import Dim, export

import pydlx
from pydlx.bench.seed_models import CNN, RNN, Autoencoder

MODELS = {
    "cnn": (CNN, (4, 3, 24, 24)),
    "rnn": (lambda: RNN(28, 16, 2, 10), (4, 28, 28)),
    "autoencoder": (lambda: Autoencoder(784, 32, 3), (4, 784)),
    "small_mlp": (lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), (4, 16)),  # one kernel
}


def _pair(name):
    make, shape = MODELS[name]
    model = make().eval()
    return model, pydlx.optimize(copy.deepcopy(model)), torch.randn(shape)


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_signature_is_the_originals(name):
    model, fast, _ = _pair(name)

    class WithDefaults(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, scale: float = 2.0, shift=None):
            """Doc of the forward."""
            y = torch.relu(self.lin(x)) * scale
            return y if shift is None else y + shift

    def params(m):  # names, kinds and defaults (annotations may differ where a module was swapped for pydlx's)
        return [(p.name, p.kind, p.default) for p in inspect.signature(m.forward).parameters.values()]

    with_defaults = WithDefaults()
    fused = pydlx.optimize(copy.deepcopy(with_defaults))
    assert type(fused) is not WithDefaults  # (its forward was traced and fused: F.relu after self.lin)
    for orig, opt in ((model, fast), (with_defaults, fused)):
        assert params(opt) == params(orig)
    assert fused.forward.__name__ == "forward" and fused.forward.__doc__ == with_defaults.forward.__doc__
    x = torch.randn(3, 4)
    torch.testing.assert_close(fused(x, 3.0, shift=x), with_defaults(x, 3.0, shift=x))
    torch.testing.assert_close(fused(x), with_defaults(x))


BACKENDS = ["auto", "reference", pytest.param("triton", marks=pytest.mark.interpreter)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_export_with_a_dynamic_batch(name, backend):
    """Exported with ``dynamic_shapes`` written for the original (its argument's name), run at other batch sizes
    after a save and load, the optimized model gives the original's results."""
    model, fast, x = _pair(name)
    x = x[:2] if backend == "triton" else x  # (the interpreter: a small batch)
    arg = next(iter(inspect.signature(model.forward).parameters))  # the original's name for its input
    with pydlx.use_backend(backend):
        ep = export(fast, (x,), dynamic_shapes={arg: {0: Dim("batch", min=2, max=1024)}})
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    for batch in ((2, 7, 33) if backend != "triton" else (2, 3)):  # (the interpreter: small batches)
        xb = torch.randn(batch, *x.shape[1:])
        with torch.no_grad():
            torch.testing.assert_close(loaded(xb), model(xb), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_torchscript_trace_saves_loads_and_runs(name, backend):
    """``torch.jit.trace`` of an optimized model (pydlx's ops recorded as ``pydlx::`` calls under a forced backend),
    saved and loaded, gives the original's results on new inputs of the traced shape."""
    model, fast, x = _pair(name)
    x = x[:2] if backend == "triton" else x  # (the interpreter: a small batch)
    with pydlx.use_backend(backend), torch.no_grad():
        traced = torch.jit.trace(fast, (x,), check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    if backend == "reference" and name in ("cnn", "small_mlp"):  # (fused there: the trace holds pydlx's ops)
        assert "pydlx::" in str(loaded.inlined_graph)
    for _ in range(2 if backend != "triton" else 1):  # (the interpreter: one run)
        xb = torch.randn_like(x)
        with torch.no_grad():
            torch.testing.assert_close(loaded(xb), model(xb), rtol=1e-5, atol=1e-5)


FUNC_CASES = [(name, backend) for name in ("cnn", "autoencoder", "small_mlp") for backend in ("auto", "reference")] + [
    pytest.param(name, "triton", marks=pytest.mark.interpreter) for name in ("cnn", "autoencoder", "small_mlp")]


def _as_close_as_eager(got, eager, truth, what: str, tol: float = 1e-4) -> None:
    """``got`` (pydlx, float32) is within ``tol`` of the float64 ``truth`` plus twice what eager PyTorch in float32
    (``eager``) is off by: a max pool's backward sends a window's gradient to its argmax, which a near-tie flips
    between two float32 computations (eager's and the kernel's, summing in different orders) -- against float64,
    either may be the one that is off (seed 65529: eager's conv1 weight gradient is 1.4e-3 from float64, the Triton
    kernels' 2e-8)."""
    err = (got.double() - truth).abs().max().item()
    allow = tol + 2 * (eager.double() - truth).abs().max().item()
    assert err <= allow, f"{what}: max error {err:.3g} from float64 > {allow:.3g} (eager's error x 2 + {tol})"


@pytest.mark.parametrize("name,backend", FUNC_CASES)
def test_torch_func_grad_and_vjp(name, backend):
    """torch.func.grad over functional_call, and vjp, through an optimized model give the original's gradients (a
    kernel backend's ops differentiate with their own formulas under the transforms, the reference's ops with
    torch's), checked against the original in float64."""
    from torch.func import functional_call, grad, vjp

    model, fast, x = _pair(name)
    x = x[:3]
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(module):
        return lambda p, inp: functional_call(module, p, (inp,)).pow(2).sum()

    with pydlx.use_backend(backend):
        got = grad(loss(fast), argnums=(0, 1))(params, x)
        out, pull = vjp(lambda inp: fast(inp), x)
        cot = torch.randn_like(out)
        got_vjp = pull(cot)[0]
    want = grad(loss(model), argnums=(0, 1))(params, x)
    out_want, pull_want = vjp(lambda inp: model(inp), x)
    model64 = copy.deepcopy(model).double()
    params64, x64 = {k: v.double() for k, v in params.items()}, x.double()
    truth = grad(loss(model64), argnums=(0, 1))(params64, x64)
    out64, pull64 = vjp(lambda inp: model64(inp), x64)
    for k in want[0]:
        _as_close_as_eager(got[0][k], want[0][k], truth[0][k], f"d loss / d {k}")
    _as_close_as_eager(got[1], want[1], truth[1], "d loss / d input")
    _as_close_as_eager(out, out_want, out64, "output")
    _as_close_as_eager(got_vjp, pull_want(cot)[0], pull64(cot.double())[0], "vjp")


def test_vmap_and_jvp_through_the_reference():
    """On the reference backend a pydlx op is PyTorch ops under torch.func's transforms: vmap, jvp and jacfwd give
    the original's results."""
    from torch.func import jacfwd, jvp, vmap

    model, fast, x = _pair("small_mlp")
    tangent = torch.randn_like(x)
    with pydlx.use_backend("reference"):
        got = vmap(lambda row: fast(row.unsqueeze(0)))(x)
        got_jvp = jvp(fast, (x,), (tangent,))[1]
        got_jac = jacfwd(lambda row: fast(row.unsqueeze(0)))(x[0])
    torch.testing.assert_close(got, vmap(lambda row: model(row.unsqueeze(0)))(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_jvp, jvp(model, (x,), (tangent,))[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_jac, jacfwd(lambda row: model(row.unsqueeze(0)))(x[0]), rtol=1e-5, atol=1e-6)


@pytest.mark.interpreter
def test_vmap_and_jvp_through_a_forced_kernel_backend_raise_naming_the_op():
    """A kernel's Function has no vmap or jvp rule, and a forced backend never falls back: torch's error names the
    op."""
    from torch.func import jvp, vmap

    _, fast, x = _pair("small_mlp")
    with pydlx.use_backend("triton"):
        with pytest.raises(RuntimeError, match="pydlx_mlp_fused"):
            vmap(lambda row: fast(row.unsqueeze(0)))(x)
        with pytest.raises(NotImplementedError, match="jvp"):
            jvp(fast, (x,), (torch.randn_like(x),))


@pytest.mark.interpreter
def test_torch_func_under_auto_as_on_a_gpu_with_measured_kernels(monkeypatch, auto_as_gpu):
    """``auto`` on a GPU whose measurements chose the Triton kernels (made to look so: the CPU shortcut skipped,
    every decision "triton"): an optimized CNN runs pydlx's kernels, and under torch.func -- the per-sample-gradient
    recipe (vmap over grad), jvp, jacfwd, jacrev (a vmap over a backward), grad -- ``auto`` takes the reference,
    whose PyTorch ops every transform handles: the model as written's results."""
    import pydlx.triton.conv_relu_pool as triton_conv
    from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

    auto_as_gpu("kernels")
    torch.manual_seed(0)

    def make():
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(4 * 3 * 3, 8), nn.ReLU(), nn.Linear(8, 3))
    model, fast = make(), pydlx.optimize(make())
    fast.load_state_dict(model.state_dict())
    x, t = torch.randn(4, 1, 6, 6), torch.randint(0, 3, (4,))
    ran = []
    monkeypatch.setattr(triton_conv, "conv_relu_pool_fwd", (
        lambda f: lambda *a, **k: ran.append("conv") or f(*a, **k))(triton_conv.conv_relu_pool_fwd))
    fast(x)
    assert ran, "the kernel did not run"

    def per_sample(m):
        params = {k: v.detach() for k, v in m.named_parameters()}

        def loss(p, xi, ti):
            return nn.functional.cross_entropy(functional_call(m, p, (xi[None],)), ti[None])
        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, t)
    got, want = per_sample(fast), per_sample(model)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    tangent = torch.randn_like(x)
    torch.testing.assert_close(jvp(fast, (x,), (tangent,))[1], jvp(model, (x,), (tangent,))[1], rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(jacfwd(fast)(x[:1]), jacfwd(model)(x[:1]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(jacrev(fast)(x[:1]), jacrev(model)(x[:1]), rtol=1e-5, atol=1e-6)
    params = {k: v.detach() for k, v in fast.named_parameters()}
    g = grad(lambda p: functional_call(fast, p, (x,)).square().sum())(params)
    want_g = grad(lambda p: functional_call(model, p, (x,)).square().sum())(params)
    for k in want_g:
        torch.testing.assert_close(g[k], want_g[k], rtol=1e-5, atol=1e-6)
    assert ran == ["conv"], ran  # (the first call's only: under the transforms auto ran the reference)
    fast(x)
    assert ran == ["conv", "conv"], ran  # (and outside them the kernel again)


@pytest.mark.interpreter
def test_torch_func_beyond_grad_and_vjp_through_a_kernel_backend_raises_naming_the_op():
    """A kernel backend's backward runs under one level of grad / vjp; under vmap of it (jacrev) or nested grad its
    kernels would read torch.func's batched or wrapped tensors: a clear error naming the op and the way out, never
    a wrong derivative. (The same through the reference backend works: torch's own ops all the way.)"""
    from torch.func import grad, jacrev

    model, fast, x = _pair("small_mlp")
    with pydlx.use_backend("triton"):
        with pytest.raises(RuntimeError, match="pydlx::mlp_fused_bwd: the triton backend's backward runs under"):
            jacrev(lambda inp: fast(inp).sum(0))(x)
        with pytest.raises(RuntimeError, match="pydlx::mlp_fused_bwd: the triton backend's backward runs under"):
            grad(lambda inp: grad(lambda i: fast(i).pow(2).sum())(inp).pow(2).sum())(x)
    with pydlx.use_backend("reference"):
        want = jacrev(lambda inp: model(inp).sum(0))(x)
        torch.testing.assert_close(jacrev(lambda inp: fast(inp).sum(0))(x), want, rtol=1e-5, atol=1e-6)


def test_user_hooks_fire_after_optimize():
    """A module with hooks is never absorbed into a fused op: it runs as written, so that its hooks fire, whether
    they were registered before ``optimize`` (forward code and module swaps) or after it (the forward code's guards
    see them; removed again, the chain is fused again). ``explain`` says which chains were kept for hooks."""
    x = torch.randn(2, 3, 24, 24)
    model = CNN().eval()
    fired = []
    model.conv1.register_forward_hook(lambda m, i, o: fired.append("conv1"))
    model.fc1.register_forward_pre_hook(lambda m, i: fired.append("fc1"))
    fast = pydlx.optimize(model)
    with pydlx.use_backend("reference"), torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
    assert fired == ["conv1", "fc1"] * 2
    text = pydlx.explain(fast)
    assert "conv1 has hooks" in text and "fc1 has hooks" in text and "fuse   conv2" in text, text

    fast = pydlx.optimize(CNN().eval())
    with pydlx.use_backend("reference"), torch.no_grad():
        fast(x)
        fired.clear()
        handle = fast.conv2.register_forward_hook(lambda m, i, o: fired.append("conv2"))
        fast(x)
        assert fired == ["conv2"]
        handle.remove()
        fast(x)
        assert fired == ["conv2"]
    assert any(s.fused and "conv2" in s.fused for s in fast._pydlx_fx.specs if s.fn is not None)

    seq = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(),
                        nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2)))
    seq[0].register_forward_hook(lambda m, i, o: fired.append("lin0"))
    seq[4][1].register_forward_hook(lambda m, i, o: fired.append("relu"))
    fast = pydlx.optimize(seq)
    assert type(fast[0]) is nn.Linear and type(fast[2]) is not nn.Linear  # the hooked Linear kept, the other fused
    assert type(fast[4][0]) is nn.Conv2d
    fired.clear()
    fast[0](torch.randn(1, 16))
    fast[4](torch.randn(1, 1, 6, 6))
    assert fired == ["lin0", "relu"]


RESTORE_MODELS = {
    **{name: MODELS[name] for name in ("cnn", "rnn", "autoencoder", "small_mlp")},
    "conv_seq": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                       nn.Linear(4 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 2)), (3, 3, 8, 8)),
}


@pytest.mark.parametrize("name", list(RESTORE_MODELS))
def test_restore_gives_back_the_original_modules(name):
    """``pydlx.restore`` after training the optimized model a step: the original's module types and forward, the
    optimized model's current parameters (the same tensors, so its optimizer goes on), train/eval kept; the
    restored model computes what the original with those parameters computes."""
    make, shape = RESTORE_MODELS[name]
    torch.manual_seed(0)
    model = make()
    x = torch.randn(shape)
    layout = [(n, type(m)) for n, m in model.named_modules()]
    fast = pydlx.optimize(copy.deepcopy(model))
    assert [(n, type(m)) for n, m in fast.named_modules()] != layout  # (something was swapped or fused)
    opt = torch.optim.SGD(fast.parameters(), lr=0.1)
    with pydlx.use_backend("reference"):
        fast(x).float().pow(2).mean().backward()
    opt.step()
    params = {k: v for k, v in fast.state_dict(keep_vars=True).items()}
    fast.eval()
    plain = pydlx.restore(fast)
    assert [(n, type(m)) for n, m in plain.named_modules()] == layout  # (a fused forward's class is a subclass)
    assert type(plain).forward is type(model).forward and not plain.training
    restored = plain.state_dict(keep_vars=True)
    assert list(restored) == list(params) and all(restored[k] is params[k] for k in params)
    want = copy.deepcopy(model).eval()
    want.load_state_dict({k: v.detach() for k, v in params.items()})
    with torch.no_grad():
        torch.testing.assert_close(plain(x), want(x), rtol=0, atol=0)
    assert pydlx.restore(plain) is plain  # (nothing left to undo)


def test_state_dict_hooks_survive_optimize():
    """A module with state_dict or load_state_dict hooks is not swapped for a pydlx module (the hooks would go with
    it): they run on the optimized model's state_dict and load_state_dict as on the original's."""
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    seen = []
    seq[0].register_state_dict_post_hook(lambda m, sd, prefix, local: seen.append(("save", prefix)))
    seq[2].register_load_state_dict_post_hook(lambda m, keys: seen.append(("load", type(m).__name__)))
    fast = pydlx.optimize(seq)
    sd = fast.state_dict()
    assert ("save", "0.") in seen and list(sd) == list(seq.state_dict())
    fast.load_state_dict(sd)
    assert ("load", "Linear") in seen
    assert "state_dict hooks" in pydlx.explain(seq)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("name", ["cnn", "rnn", "autoencoder"])
def test_cuda_export_lowers_and_runs_without_the_kernels(name, backend):
    """On a GPU: an optimized model exported with a dynamic batch under each GPU backend runs as exported, and
    lowered with ``pydlx.decompositions()`` to plain ATen gives the original's results (the kernels' graph and the
    lowered one)."""
    model, fast, x = _pair(name)
    model, fast, x = model.cuda(), fast.cuda(), x.cuda()
    arg = next(iter(inspect.signature(model.forward).parameters))
    with pydlx.use_backend(backend):
        ep = export(fast, (x,), dynamic_shapes={arg: {0: Dim("batch", min=2, max=1024)}})
    lowered = ep.run_decompositions(pydlx.decompositions())
    assert not [n for n in lowered.graph.nodes if str(n.target).startswith("pydlx.")]
    xb = torch.randn(5, *x.shape[1:], device="cuda")
    with torch.no_grad():
        want = model(xb)
        torch.testing.assert_close(ep.module()(xb), want, rtol=2e-3, atol=2e-3)  # (TF32 in the kernels' GEMMs)
        torch.testing.assert_close(lowered.module()(xb), want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("name", list(MODELS))
def test_compile_dynamic_gives_the_originals_results_at_other_sizes(name, backend):
    """``torch.compile(dynamic=True)`` of an optimized model compiles as often as the original's over batch sizes
    (the ops' fake implementations keep the batch symbolic; nothing pydlx reads makes a new graph), with the
    original's results; training too (gradients)."""
    from torch._dynamo.testing import CompileCounter

    model, fast, x = _pair(name)
    counts = []
    for m in (model, fast):
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(m, dynamic=True, backend=counter)
        with pydlx.use_backend(backend):
            for batch in (3, 5, 9, 17):
                xb = torch.randn(batch, *x.shape[1:])
                with torch.no_grad():
                    torch.testing.assert_close(compiled(xb), model(xb), rtol=1e-5, atol=1e-5)
        counts.append(counter.frame_count)
    assert counts[1] <= counts[0], counts  # (never more graphs than the original: the seed CNN has 3, torch's conv
    # specialising sizes; under a forced backend its op keeps one of them symbolic)
    with pydlx.use_backend(backend):
        xb = torch.randn(6, *x.shape[1:])
        compiled(xb).pow(2).sum().backward()
    model(xb).pow(2).sum().backward()
    for (k, p), q in zip(fast.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=k)
