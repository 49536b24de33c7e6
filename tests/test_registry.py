"""The registry (pydlx/registry.py) as a contributor uses it: a backend registered through the public API runs every
family (docs/DEVELOPING.md's recipe, followed by a toy backend: a counting copy of the reference), the dispatcher
keeps one decision per call signature, every backend's modules have their family's interface, the lists elsewhere
derive from the registry, and the package's structure holds (no import cycle, no module shadowed by a function)."""
import ast
import collections
import inspect
import pathlib
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pydlx
from pydlx import registry
from tolerance import assert_close

ROOT = pathlib.Path(pydlx.__file__).resolve().parent


@pytest.fixture
def toy():
    """A backend named "toy": for every family, the reference's functions wrapped to count their calls (so a test
    can tell that the toy ran, not the reference), registered through the public API; removed afterwards."""
    calls = collections.Counter()
    implementations = {}
    for family, fam in registry.FAMILIES.items():
        ref = registry.implementation(family, "reference")

        def counted(fn, key):
            def run(*args, **kwargs):
                calls[key] += 1
                return fn(*args, **kwargs)
            return run

        implementations[family] = SimpleNamespace(
            supports=counted(ref.supports, f"{family}.supports"),
            **{fn: counted(getattr(ref, fn), f"{family}.{fn}") for fn in fam.functions})
    registry.register_backend(registry.Backend("toy", implementations=implementations, doc="a test's toy"))
    try:
        yield calls
    finally:
        registry.unregister_backend("toy")


def _grads(*tensors):
    return [t.grad for t in tensors]


def test_a_registered_backend_runs_every_family(toy):
    torch.manual_seed(0)
    d = torch.float64
    # linear: forward and backward through the toy's linear_fwd / linear_bwd
    x = torch.randn(5, 7, dtype=d, requires_grad=True)
    lin = nn.Linear(7, 3, dtype=d)
    with pydlx.use_backend("toy"):
        y = pydlx.ops.linear(x, lin.weight, lin.bias, "gelu")
    g = torch.randn_like(y)
    y.backward(g)
    got = _grads(x, lin.weight, lin.bias)
    for t in (x, lin.weight, lin.bias):
        t.grad = None
    F.gelu(lin(x)).backward(g)
    assert_close(y, F.gelu(lin(x)), name="linear")
    for a, b, n in zip(got, _grads(x, lin.weight, lin.bias), ("dx", "dw", "db")):
        assert_close(a, b, name=f"linear {n}")
    assert toy["linear.linear_fwd"] == 1 and toy["linear.linear_bwd"] == 1

    # mlp: the fused op (fp32: the fused path's dtypes) through the toy's mlp_fwd / mlp_bwd, against float64
    w1, b1, w2 = torch.randn(9, 6), torch.randn(9), torch.randn(4, 9, requires_grad=True)
    x = torch.randn(3, 6)
    with pydlx.use_backend("toy"):
        y = pydlx.ops.mlp(x, [w1, w2], [b1, None], "tanh")
    assert_close(y, F.linear(torch.tanh(F.linear(x.double(), w1.double(), b1.double())), w2.double()),
                 dtype=torch.float32, name="mlp")
    y.sum().backward()
    assert w2.grad is not None and toy["mlp.mlp_fwd"] == 1 and toy["mlp.mlp_bwd"] == 1

    # conv_relu_pool: forward and backward (the backend's backward, not a shared one)
    conv = nn.Conv2d(3, 4, 3, padding=1, dtype=d)
    x = torch.randn(2, 3, 9, 9, dtype=d, requires_grad=True)
    with pydlx.use_backend("toy"):
        y = pydlx.ops.conv_relu_pool2d(x, conv.weight, conv.bias, 1, 1, 2)
    assert_close(y, F.max_pool2d(F.relu(conv(x)), 2), name="conv")
    y.sum().backward()
    assert toy["conv_relu_pool.conv_relu_pool_fwd"] == 1 and toy["conv_relu_pool.conv_relu_pool_bwd"] == 1

    # the training form (conv and Linear, BatchNorm in training mode) runs the toy's layer, forward and recompute
    bn = nn.BatchNorm2d(4, dtype=d)
    with pydlx.use_backend("toy"):
        y = pydlx.ops.conv_bn_act_pool2d(x, conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight,
                                         bn.bias, bn.eps, 1, 1, "relu", 2, training=True)
    y.sum().backward()
    assert toy["conv_relu_pool.conv_relu_pool_fwd"] == 3  # forward, and recomputed in backward
    bn1 = nn.BatchNorm1d(3, dtype=d)
    with pydlx.use_backend("toy"):
        y = pydlx.ops.linear_batchnorm(torch.randn(4, 7, dtype=d), lin.weight, lin.bias, bn1.running_mean,
                                       bn1.running_var, bn1.weight, bn1.bias, bn1.eps, "relu", training=True)
    y.sum().backward()
    assert toy["linear.linear_fwd"] == 3

    # lstm: the layer op (the toy's linear for the input projection, its lstm_fwd / lstm_bwd for the recurrence),
    # bidirectional, two layers, against torch.nn.LSTM forward and backward
    ref = nn.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True, dtype=d)
    mine = pydlx.nn.LSTM.from_module(ref)
    x = torch.randn(3, 4, 5, dtype=d, requires_grad=True)
    with pydlx.use_backend("toy"):
        out, (h, c) = mine(x)
    want, (hw, cw) = ref(x)
    for a, b, n in ((out, want, "output"), (h, hw, "h_n"), (c, cw, "c_n")):
        assert_close(a, b, name=f"lstm {n}")
    g = torch.randn_like(out)
    (out * g).sum().backward()
    got = [x.grad] + [p.grad for p in ref.parameters()]
    x.grad = None
    for p in ref.parameters():
        p.grad = None
    (want * g).sum().backward()
    for a, b in zip(got, [x.grad] + [p.grad for p in ref.parameters()]):
        assert_close(a, b, name="lstm gradients")
    assert toy["lstm.lstm_fwd"] == 4 and toy["lstm.lstm_bwd"] == 4  # 2 layers x 2 directions


def test_the_registry_lists_a_registered_backend_everywhere(toy):
    from pydlx import _backend
    from pydlx.bench import providers

    assert "toy" in pydlx.backends() and pydlx.backends()["toy"] == "available"
    assert "toy" in _backend.choices() and "pydlx-toy" in providers()
    with pytest.raises(ValueError, match="backend must be one of"):
        with pydlx.use_backend("no_such_backend"):
            pass
    # a backend without a family's implementation refuses it with the reason
    registry.register_backend(registry.Backend("half", implementations={"linear": registry.implementation(
        "linear", "reference")}))
    try:
        with pydlx.use_backend("half"), pytest.raises(pydlx.BackendUnavailableError, match="no mlp implementation"):
            pydlx.ops.mlp(torch.randn(2, 3), [torch.randn(4, 3)], [None])
    finally:
        registry.unregister_backend("half")


def test_a_decision_is_made_once_per_call_signature(toy):
    x, w = torch.randn(4, 3), torch.randn(5, 3)
    with pydlx.use_backend("toy"):
        for _ in range(3):
            pydlx.ops.linear(x, w, None, "relu")
        assert toy["linear.supports"] == 1  # the same signature: decided once
        pydlx.ops.linear(torch.randn(6, 3), w, None, "relu")
        assert toy["linear.supports"] == 2  # another size: decided again
        pydlx.ops.linear(x.double(), w.double(), None, "relu")
        assert toy["linear.supports"] == 3  # another dtype
    with pydlx.use_backend("reference"):
        pydlx.ops.linear(x, w, None, "relu")
    with pydlx.use_backend("toy"):
        pydlx.ops.linear(x, w, None, "relu")
    assert toy["linear.supports"] == 3  # the backend in force is part of the signature; the toy's is kept
    assert toy["linear.linear_fwd"] == 6


def test_every_backend_module_has_its_familys_interface():
    """For every registered backend and family it implements: ``supports(call, device)`` and the family's functions,
    taking the reference's parameters (the ops pass them by position; a backend may add trailing optional ones)."""
    for name in registry.backend_names():
        for family, fam in registry.FAMILIES.items():
            impl = registry.implementation(family, name)
            if impl is None:
                continue
            assert list(inspect.signature(impl.supports).parameters) == ["call", "device"], (name, family)
            ref = registry.implementation(family, "reference")
            for fn in fam.functions:
                want = list(inspect.signature(getattr(ref, fn)).parameters.values())
                got = list(inspect.signature(getattr(impl, fn)).parameters.values())
                required = [p for p in got if p.default is inspect.Parameter.empty]
                assert len(got) >= len(want) and len(required) <= len(want), (name, family, fn, got, want)
                for p, q in zip(got, want):  # keyword arguments the ops pass keep their names
                    if q.default is not inspect.Parameter.empty:
                        assert p.name == q.name, (name, family, fn, p.name, q.name)


def test_families_and_backends_are_declared_once():
    """The benchmark groups, the policy's families and the conftest's GPU-test backends come from the registry."""
    from pydlx import _policy
    from pydlx.bench.__main__ import FAMILIES as bench_groups

    assert set(registry.FAMILIES) <= set(bench_groups)
    assert _policy.size_from_shape("linear", "4x5x6") == 120.0
    assert registry.candidates() == ("triton", "cuda") and registry.backend_names()[0] == "reference"


# ----------------------------------------------------------------------------------------------- a new family
class ScaleCall(NamedTuple):
    """The toy family's call descriptor: y = x * s over n elements."""
    dtype: torch.dtype
    training: bool
    n: int


def _scale_ops():
    """docs/DEVELOPING.md's family recipe, steps 3 and 4, for the toy family: its schemas and its op registered
    through pydlx's scaffold (once per process)."""
    from pydlx.ops import _common, schemas

    if hasattr(torch.ops.pydlx, "recipe_scale_fwd"):
        return
    schemas.LIB.define("recipe_scale_fwd(Tensor x, float s, str backend) -> Tensor y")
    schemas.LIB.define("recipe_scale_bwd(Tensor grad, float s, str backend) -> Tensor dx")
    fwd = _common.implement("recipe_scale_fwd",
                            lambda x, s, backend: registry.implementation("scale", backend).scale_fwd(x, s),
                            lambda x, s, backend: torch.empty_like(x), differentiable=True)
    bwd = _common.implement("recipe_scale_bwd",
                            lambda grad, s, backend: registry.implementation("scale", backend).scale_bwd(grad, s),
                            lambda grad, s, backend: torch.empty_like(grad))
    _common.autograd("recipe_scale_fwd", save=lambda a, out: (),
                     backward=lambda a, saved, grads, needs: {"x": bwd(grads[0], a.s, a.backend)})
    assert fwd.overload is torch.ops.pydlx.recipe_scale_fwd.default
    _SCALE_OP.append(fwd)


_SCALE_OP: list = []


def scale(x, s):
    """The toy family's entry point (recipe step 4): checks, the dispatcher's choice, the op."""
    from pydlx.ops._common import check_floating

    check_floating("scale", "x", x)
    call = ScaleCall(x.dtype, torch.is_grad_enabled() and x.requires_grad, x.numel())
    return _SCALE_OP[0](x, float(s), pydlx._backend.choose("scale", x.device, call, "scale"))


def test_a_new_family_through_the_recipe(toy):
    """docs/DEVELOPING.md's family recipe, followed with a toy family: the row (register_family), the reference, the
    schemas and op through the scaffold, the entry point through the dispatcher, and a second backend's kernels."""
    registry.register_family(registry.Family("scale", ScaleCall, ("scale_fwd", "scale_bwd"),
                                             work=lambda c: float(c.n), shape=lambda n: str(n),
                                             parse=lambda text: float(text) if text.isdigit() else None))
    calls = collections.Counter()
    ref = registry.BACKENDS["reference"]

    def impl(name):
        return SimpleNamespace(supports=lambda call, device: None if call.n < 1000 else "at most 999 elements",
                               scale_fwd=lambda x, s: calls.update([f"{name} fwd"]) or x * s,
                               scale_bwd=lambda g, s: calls.update([f"{name} bwd"]) or g * s)
    try:
        ref.implementations = dict(ref.implementations, scale=impl("reference"))  # recipe step 2
        registry.register_backend(ref)
        registry.register_backend(registry.Backend("kernels", implementations={"scale": impl("kernels")}))
        _scale_ops()
        torch.library.opcheck(torch.ops.pydlx.recipe_scale_fwd.default, (torch.randn(3, requires_grad=True), 2.0,
                                                                          "reference"))
        calls.clear()
        for backend in ("reference", "kernels"):
            x = torch.randn(5, 3, requires_grad=True)
            with pydlx.use_backend(backend):
                y = scale(x, 3.0)
            y.backward(torch.ones_like(y))
            assert torch.equal(y, x * 3) and torch.equal(x.grad, torch.full_like(x, 3.0))
            assert calls[f"{backend} fwd"] == 1 and calls[f"{backend} bwd"] == 1
        with pydlx.use_backend("kernels"), pytest.raises(pydlx.BackendUnavailableError, match="at most 999"):
            scale(torch.randn(1000), 2.0)
        with pydlx.use_backend("toy"), pytest.raises(pydlx.BackendUnavailableError, match="no scale implementation"):
            scale(torch.randn(4), 2.0)
        assert scale(torch.randn(4), 2.0).shape == (4,)  # auto on a CPU: the reference
        from pydlx import _policy
        assert _policy.size_from_shape("scale", "12") == 12.0
        compiled = torch.compile(lambda x: scale(x, 2.0), fullgraph=True, backend="aot_eager")
        with pydlx.use_backend("kernels"):
            x = torch.randn(6)
            assert torch.equal(compiled(x), x * 2)
    finally:
        registry.unregister_backend("kernels")
        registry.unregister_family("scale")
    assert "scale" not in registry.FAMILIES and "scale" not in ref.implementations


# ----------------------------------------------------------------------------------------------- structure
def _modules():
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
        out[name] = path
    return out


def _imports(name, path, modules):
    """The pydlx modules ``name`` imports (anywhere in it, functions included)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t.startswith("pydlx") and t != name:
                found.add(t)
    return found


def test_the_package_has_no_import_cycle():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert graph["pydlx.registry"] <= {"pydlx._geometry"}  # the registry sits below every backend and op


def test_no_module_is_shadowed_by_a_function():
    """``pydlx.reference.linear`` (and every backend's and nn's <family>) is the module, not a function of the same
    name that a package re-exports. The public API's functions are the exceptions, by design: ``pydlx.optimize``
    and the op functions ``pydlx.ops.linear``, ``.mlp``, ``.lstm`` (their modules: ``sys.modules``)."""
    import importlib

    public = {"pydlx.optimize", "pydlx.ops.linear", "pydlx.ops.mlp", "pydlx.ops.lstm"}
    for name in _modules():
        pkg, _, leaf = name.rpartition(".")
        if not pkg or name in public:
            continue
        importlib.import_module(name)
        attr = getattr(importlib.import_module(pkg), leaf, None)
        assert attr is None or inspect.ismodule(attr), f"{name} is shadowed by {attr!r}"
