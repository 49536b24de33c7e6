"""Drop-in behaviour against torch.nn's own, on the modules pydlx replaces.

Empty dimensions (batch, in-features, out-features, hidden, sequence): the same outputs and gradients as torch.

Misuse: for the same bad call, a pydlx module raises what the torch.nn module it replaces raises.

Each case builds the torch model, the pydlx one over the same parameters, and a bad input; both must raise, and
pydlx's exception must be an instance of torch's exception type (pydlx keeps its own, clearer message). The cases
run on the reference backend (auto on CPU) and on the Triton backend (forced, under the interpreter): the checks
come before any backend runs.
"""
import copy

import pytest
import torch
from torch import nn

import pydlx


def _linear():
    t = nn.Sequential(nn.Linear(6, 5), nn.ReLU())
    return t, pydlx.nn.Linear.from_module(t[0], activation="relu")


def _mlp():
    t = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    return t, pydlx.nn.MLP.from_sequential(t)


def _conv():
    t = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    return t, pydlx.nn.ConvReLUPool2d.from_modules(t[0], t[2])


def _lstm():
    t = nn.LSTM(6, 5, num_layers=2)
    return t, pydlx.nn.LSTM.from_module(t)


def _cell():
    t = nn.LSTMCell(6, 5)
    return t, pydlx.nn.LSTMCell.from_module(t)


# (model factory, bad call arguments)
CASES = [
    pytest.param(_linear, lambda: (torch.randn(3, 7),), id="linear-wrong-features"),
    pytest.param(_linear, lambda: (torch.randn(3, 6, dtype=torch.float64),), id="linear-dtype-mismatch"),
    pytest.param(_linear, lambda: (torch.ones(3, 6, dtype=torch.int64),), id="linear-integer-input"),
    pytest.param(_linear, lambda: (torch.tensor(1.0),), id="linear-0d-input"),
    pytest.param(_mlp, lambda: (torch.randn(3, 7),), id="mlp-wrong-features"),
    pytest.param(_mlp, lambda: (torch.randn(3, 6, dtype=torch.float64),), id="mlp-dtype-mismatch"),
    pytest.param(_mlp, lambda: (torch.ones(3, 6, dtype=torch.int64),), id="mlp-integer-input"),
    pytest.param(_conv, lambda: (torch.randn(2, 5, 8, 8),), id="conv-wrong-channels"),
    pytest.param(_conv, lambda: (torch.randn(8, 8),), id="conv-2d-input"),
    pytest.param(_conv, lambda: (torch.randn(1, 2, 3, 8, 8),), id="conv-5d-input"),
    pytest.param(_conv, lambda: (torch.randn(2, 3, 8, 8, dtype=torch.float64),), id="conv-dtype-mismatch"),
    pytest.param(_conv, lambda: (torch.ones(2, 3, 8, 8, dtype=torch.int64),), id="conv-integer-input"),
    pytest.param(_lstm, lambda: (torch.randn(4, 2, 7),), id="lstm-wrong-features"),
    pytest.param(_lstm, lambda: (torch.randn(4, 2, 6, 1),), id="lstm-4d-input"),
    pytest.param(_lstm, lambda: (torch.randn(6),), id="lstm-1d-input"),
    pytest.param(_lstm, lambda: (torch.randn(4, 2, 6, dtype=torch.float64),), id="lstm-dtype-mismatch"),
    pytest.param(_lstm, lambda: (torch.randn(4, 2, 6), (torch.randn(2, 3, 5), torch.randn(2, 2, 5))),
                 id="lstm-h0-batch"),
    pytest.param(_lstm, lambda: (torch.randn(4, 2, 6), (torch.randn(2, 2, 5), torch.randn(1, 2, 5))),
                 id="lstm-c0-layers"),
    pytest.param(_lstm, lambda: (torch.randn(4, 2, 6), (torch.randn(2, 2, 4), torch.randn(2, 2, 5))),
                 id="lstm-h0-width"),
    pytest.param(_cell, lambda: (torch.randn(3, 7),), id="cell-wrong-features"),
    pytest.param(_cell, lambda: (torch.randn(3, 6), (torch.randn(3, 4), torch.randn(3, 5))), id="cell-hidden-size"),
    pytest.param(_cell, lambda: (torch.randn(3, 6), (torch.randn(2, 5), torch.randn(2, 5))), id="cell-batch"),
    pytest.param(_cell, lambda: (torch.randn(2, 3, 6),), id="cell-3d-input"),
    pytest.param(_cell, lambda: (torch.randn(3, 6, dtype=torch.float64),), id="cell-dtype-mismatch"),
]


def _raised(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001  (the point is which type)
        return e
    return None


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("factory, bad", CASES)
def test_same_exception_type_as_torch(factory, bad, backend):
    model_t, model_p = factory()
    args = bad()
    want = _raised(model_t, *args)
    assert want is not None, "the case must be a misuse torch itself rejects"
    with pydlx.use_backend(backend):
        got = _raised(model_p, *args)
    assert got is not None, f"pydlx accepted what torch rejects with {type(want).__name__}: {want}"
    assert isinstance(got, type(want)), (f"torch raises {type(want).__name__} ({want}); pydlx raises "
                                         f"{type(got).__name__} ({got})")
    assert not isinstance(got, pydlx.BackendUnavailableError), f"checked after choosing a backend: {got}"


def _seq_linear(k, n, act):
    lin = nn.Linear(k, n)
    nn.init.normal_(lin.bias)  # nn.Linear(0, n) initialises its bias to zeros: the test wants it to matter
    return nn.Sequential(lin, {"relu": nn.ReLU, "gelu": nn.GELU, None: nn.Identity}[act]())


EMPTY = [
    pytest.param(lambda: _seq_linear(0, 5, "relu"), lambda m: pydlx.nn.Linear.from_module(m[0], activation="relu"),
                 (3, 4, 0), id="linear-in0-relu"),
    pytest.param(lambda: _seq_linear(0, 5, "gelu"), lambda m: pydlx.nn.Linear.from_module(m[0], activation="gelu"),
                 (3, 0), id="linear-in0-gelu"),
    pytest.param(lambda: _seq_linear(5, 0, "relu"), lambda m: pydlx.nn.Linear.from_module(m[0], activation="relu"),
                 (3, 5), id="linear-out0"),
    pytest.param(lambda: _seq_linear(5, 3, None), lambda m: pydlx.nn.Linear.from_module(m[0]), (0, 5),
                 id="linear-batch0"),
    pytest.param(lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)), pydlx.nn.MLP.from_sequential,
                 (0, 6), id="mlp-batch0"),
    pytest.param(lambda: nn.Sequential(nn.Linear(0, 8), nn.ReLU(), nn.Linear(8, 4)), pydlx.nn.MLP.from_sequential,
                 (3, 0), id="mlp-in0"),
    pytest.param(lambda: nn.Sequential(nn.Linear(6, 0), nn.ReLU(), nn.Linear(0, 4)), pydlx.nn.MLP.from_sequential,
                 (3, 6), id="mlp-hidden0"),
    pytest.param(lambda: nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 0)), pydlx.nn.MLP.from_sequential,
                 (3, 6), id="mlp-out0"),
    pytest.param(lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
                 lambda m: pydlx.nn.ConvReLUPool2d.from_modules(m[0], m[2]), (0, 3, 8, 8), id="conv-batch0"),
    pytest.param(lambda: nn.LSTM(4, 5, num_layers=2, bidirectional=True), pydlx.nn.LSTM.from_module, (3, 0, 4),
                 id="lstm-batch0"),
    pytest.param(lambda: nn.LSTM(4, 5), pydlx.nn.LSTM.from_module, (0, 2, 4), id="lstm-seq0"),
    pytest.param(lambda: nn.LSTMCell(4, 5), pydlx.nn.LSTMCell.from_module, (0, 4), id="cell-batch0"),
]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("backend", ["auto", "reference", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("make_torch, make_pydlx, shape", EMPTY)
def test_empty_dimensions_as_torch(make_torch, make_pydlx, shape, backend):
    model_t = make_torch()
    model_p = make_pydlx(copy.deepcopy(model_t))
    x = torch.randn(shape)
    xt, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = _raised(model_t, xt)
    if want is not None:  # e.g. nn.LSTM refuses a sequence of length 0: so must pydlx, with torch's type
        with pydlx.use_backend(backend):
            got = _raised(model_p, xp)
        assert isinstance(got, type(want)), f"torch raises {type(want).__name__} ({want}); pydlx: {got!r}"
        return
    yt = _first(model_t(xt))
    with pydlx.use_backend(backend):
        yp = _first(model_p(xp))
        assert yp.shape == yt.shape and yp.dtype == yt.dtype
        torch.testing.assert_close(yp, yt, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(yt)
        # every parameter takes part, also where the output is empty (its gradient must then be zeros)
        ((yp * g).sum() + sum(0 * p.sum() for p in model_p.parameters())).backward()
    ((yt * g).sum() + sum(0 * p.sum() for p in model_t.parameters())).backward()
    torch.testing.assert_close(xp.grad, xt.grad, rtol=1e-5, atol=1e-5)
    for (name, pp), pt in zip(model_p.named_parameters(), model_t.parameters()):
        torch.testing.assert_close(pp.grad, pt.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.interpreter
def test_double_backward_through_a_forced_kernel_raises_torchs_error_not_a_wrong_gradient():
    """A kernel's backward is not differentiable, and a forced backend never falls back: create_graph=True then a
    second backward raises torch's RuntimeError (what is supported: tests/test_double_backward.py); under auto on a
    CPU (plain PyTorch) it works."""
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    with pydlx.use_backend("triton"), pytest.raises(RuntimeError, match="no autograd formula"):
        y = pydlx.ops.linear(x, w, None, activation="gelu")
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        g.sum().backward()
    y = pydlx.ops.linear(x, w, None, activation="gelu")
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), w)
    y_ = torch.nn.functional.gelu(torch.nn.functional.linear(x, w))
    (g_,) = torch.autograd.grad(y_.square().sum(), x, create_graph=True)
    torch.testing.assert_close(gg, torch.autograd.grad(g_.sum(), w)[0])