"""pydlx.optimize / pydlx.explain for the Linear + activation chains (later families add their patterns)."""
import copy
import importlib.util
import os

import pytest
import torch
from torch import nn

import pydlx
from tolerance import assert_close


def blocks(model, **kw):
    """pydlx.plan's blocks of ``model`` by their modules (", "-joined fqns)."""
    return {", ".join(b.modules): b for b in pydlx.plan(model, **kw).blocks}

_spec = importlib.util.spec_from_file_location(
    "seed_models", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                                "seed_models.py"))
seed_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seed_models)


def seed_autoencoder():
    return seed_models.Autoencoder(input_size=784, encoding_dim=32, n_layers=3).double()


def test_optimize_seed_autoencoder_keeps_state_dict_and_outputs():
    net = seed_autoencoder()
    original = copy.deepcopy(net.state_dict())
    fast = pydlx.optimize(net)
    assert fast is not net
    for part in (fast.encoder, fast.decoder):  # each Sequential became one pydlx.nn.MLP over the same modules
        assert isinstance(part, pydlx.nn.MLP) and (part.activation, part.last_activation) == ("relu", None)
    assert type(net.encoder) is nn.Sequential  # inplace=False left the original untouched
    sd = fast.state_dict()
    assert list(sd) == list(original) and all(torch.equal(sd[k], original[k]) for k in sd)
    net.load_state_dict(sd)  # checkpoints load both ways
    fast.load_state_dict(original)
    x = torch.rand(9, 784, dtype=torch.float64)
    assert_close(fast(x), net(x), name="autoencoder")
    x.requires_grad_()
    g_fast = torch.autograd.grad(fast(x).square().sum(), [x, *fast.parameters()])
    g_net = torch.autograd.grad(net(x).square().sum(), [x, *net.parameters()])
    for a, b in zip(g_fast, g_net):
        assert_close(a, b, name="grad")


@pytest.mark.parametrize("act,name", [(nn.GELU(), "gelu"), (nn.GELU("tanh"), "gelu_tanh"), (nn.SiLU(), "silu"),
                                      (nn.Tanh(), "tanh"), (nn.Sigmoid(), "sigmoid"), (nn.ReLU(), "relu"),
                                      (nn.LeakyReLU(), "leaky_relu"), (nn.LeakyReLU(0.2, True), "leaky_relu(0.2)"),
                                      (nn.ELU(), "elu"), (nn.ELU(0.5), "elu(0.5)"), (nn.Hardswish(), "hardswish"),
                                      (nn.Hardsigmoid(), "hardsigmoid"), (nn.Mish(), "mish"), (nn.ReLU6(), "relu6"),
                                      (nn.SELU(), "selu")])
def test_each_activation_module_is_fused(act, name):
    model = nn.Sequential(nn.Linear(5, 6), act, nn.Linear(6, 2)).double()
    fast = pydlx.optimize(model)
    assert isinstance(fast, pydlx.nn.MLP) and fast.activation == name
    assert list(fast.state_dict()) == list(model.state_dict())
    x = torch.randn(4, 5, dtype=torch.float64)
    assert_close(fast(x), model(x), name=name)


def test_mlp_shaped_sequentials_inside_a_model_and_filter_fn():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 4))
            self.head = nn.Sequential(nn.Linear(4, 4), nn.Tanh())

        def forward(self, x):
            return self.head(self.body(x))

    net = Net().double()
    body, head = blocks(net)["body"], blocks(net)["head"]
    assert body.fused and body.op == "pydlx.nn.MLP" and body.arg("sizes") == [8, 16, 16, 4] and body.family == "mlp"
    assert head.fused and head.arg("sizes") == [4, 4] and head.arg("last_activation") == "tanh"
    assert {b.family for b in pydlx.plan(seed_autoencoder()).fused} == {"linear"}  # wider than 128: a chain
    fast = pydlx.optimize(net, filter_fn=lambda m, fqn: fqn != "head")
    assert isinstance(fast.body, pydlx.nn.MLP) and type(fast.head) is nn.Sequential
    assert isinstance(fast.head[0], nn.Linear) and type(fast.head[0]) is nn.Linear  # excluded whole
    x = torch.randn(3, 8, dtype=torch.float64)
    assert_close(fast(x), net(x), name="net")
    assert list(fast.state_dict()) == list(net.state_dict())


def test_inplace_and_filter_fn_and_explain():
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 7), nn.Softplus(), nn.Linear(7, 3), nn.Tanh())
    b = blocks(model)
    assert b["0"].fused and b["0"].chain == ("Linear", "relu") and b["0"].op == "pydlx.nn.Linear"
    assert b["2"].reason == "Softplus is not a fusable activation"
    assert b["4"].fused and b["4"].kind == "Linear+tanh"
    assert "keep   2: Linear (Softplus is not a fusable activation)" in pydlx.explain(model)  # the rendering
    same = pydlx.optimize(model, inplace=True, filter_fn=lambda m, fqn: fqn != "4")
    assert same is model
    assert isinstance(model[0], pydlx.nn.Linear) and type(model[4]) is nn.Linear and isinstance(model[5], nn.Tanh)


def test_explain_names_a_module_that_is_no_activation_as_such():
    class Permute(nn.Module):  # (torchvision's, after ConvNeXt's second Linear)
        def forward(self, x):
            return x.flip(-1)

    model = nn.Sequential(nn.Linear(5, 6), nn.Dropout(), nn.Linear(6, 7), Permute(), nn.Linear(7, 3), nn.Softplus())
    b = blocks(model)
    assert b["0"].reason == "followed by Dropout, not an activation"
    assert b["2"].reason == "followed by Permute, not an activation"
    assert b["4"].reason == "Softplus is not a fusable activation"


def _same_outputs_and_grads(fast, model, x):
    """float64 outputs and gradients. The gradients to 1e-7 relative: torch's float64 hardsigmoid backward multiplies
    by 1/6 rounded to float32 (3e-8 off), pydlx's reference backward by 1/6 in float64."""
    assert_close(fast(x), model(x), name="y")
    x = x.clone().requires_grad_()
    for a, b in zip(torch.autograd.grad(fast(x).square().sum(), [x, *fast.parameters()]),
                    torch.autograd.grad(model(x).square().sum(), [x, *model.parameters()])):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)


def test_new_activation_modules_fuse_and_a_negative_slope_is_kept_with_the_reason():
    """Linear -> LeakyReLU(0.2) / Hardswish / ELU(0.5) / Mish modules become fused Linears; a LeakyReLU with
    a negative slope is kept (its derivative cannot be taken from the output), and explain says why."""
    model = nn.Sequential(nn.Linear(5, 6), nn.LeakyReLU(0.2), nn.Linear(6, 7), nn.Hardswish(), nn.Linear(7, 4),
                          nn.ELU(0.5), nn.Linear(4, 4), nn.LeakyReLU(-0.1), nn.Linear(4, 3), nn.Mish()).double()
    b = blocks(model)
    assert [b[k].arg("activation") for k in "0248"] == ["leaky_relu(0.2)", "hardswish", "elu(0.5)", "mish"]
    assert all(b[k].fused and b[k].op == "pydlx.nn.Linear" for k in "0248")
    assert b["6"].reason.startswith("LeakyReLU(negative_slope=-0.1): leaky_relu with a negative slope (-0.1) is not")
    original = copy.deepcopy(model.state_dict())
    fast = pydlx.optimize(model)
    assert [getattr(m, "activation", None) for m in fast if isinstance(m, pydlx.nn.Linear)] == [
        "leaky_relu(0.2)", "hardswish", "elu(0.5)", "mish"]
    assert type(fast[6]) is nn.Linear and type(fast[7]) is nn.LeakyReLU
    sd = fast.state_dict()
    assert list(sd) == list(original) and all(torch.equal(sd[k], original[k]) for k in sd)
    _same_outputs_and_grads(fast, model, torch.randn(9, 5, dtype=torch.float64))
    mlp = pydlx.optimize(nn.Sequential(nn.Linear(5, 6), nn.Hardsigmoid(), nn.Linear(6, 7), nn.Hardsigmoid(),
                                       nn.Linear(7, 2), nn.ReLU6()))
    assert isinstance(mlp, pydlx.nn.MLP) and (mlp.activation, mlp.last_activation) == ("hardsigmoid", "relu6")


class _NewActsNet(nn.Module):
    """leaky_relu, elu, hardswish, hardsigmoid, mish and relu6 in forward code: functional, in-place and module
    spellings."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.fc4, self.fc5, self.fc6 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.neg, self.out, self.mish = nn.Linear(8, 8), nn.Linear(8, 3), nn.Mish()

    def forward(self, x):  # (the arithmetic between the blocks keeps them from forming one MLP chain)
        h = F.elu(self.fc2(F.leaky_relu(self.fc1(x), negative_slope=0.2)), alpha=0.5, inplace=True)  # one mlp call
        h = F.hardswish(self.fc3(h * 2))
        h = self.mish(self.fc4(h + 1)) * 3
        h = F.leaky_relu_(self.fc6(F.hardsigmoid(self.fc5(h))), 0.3) - 1  # one mlp call
        h = F.leaky_relu(self.neg(h), -0.1) + 1  # refused: kept
        return F.relu6(self.out(h), inplace=True)


def test_new_activations_in_forward_code_fuse():
    model = _NewActsNet().double()
    b = blocks(model)
    assert all(x.source == "forward" for x in b.values())
    assert b["fc1, fc2"].op == "pydlx.ops.mlp" and b["fc1, fc2"].args == (
        ("sizes", [6, 8, 8]), ("activation", "leaky_relu(0.2)"), ("last_activation", "elu(0.5)"))
    assert b["fc5, fc6"].args == (("sizes", [8, 8, 8]), ("activation", "hardsigmoid"),
                                  ("last_activation", "leaky_relu(0.3)"))
    for fqn, act in (("fc3", "hardswish"), ("fc4", "mish"), ("out", "relu6")):
        assert b[fqn].fused and b[fqn].op == "pydlx.ops.linear" and b[fqn].arg("activation") == act
    assert b["neg"].arg("activation") == "leaky_relu(-0.1)"
    assert b["neg"].reason.startswith("leaky_relu with a negative slope (-0.1) is not supported")
    original = copy.deepcopy(model.state_dict())
    fast = pydlx.optimize(model)
    x = torch.randn(5, 6, dtype=torch.float64)
    assert _pydlx_calls(fast, x) == ["mlp", "mul", "linear", "add", "linear", "mul", "mlp", "sub", "leaky_relu",
                                     "add", "linear"], _pydlx_calls(fast, x)
    sd = fast.state_dict()
    assert list(sd) == list(original) and all(torch.equal(sd[k], original[k]) for k in sd)
    for backend in ("auto", "reference"):
        with pydlx.use_backend(backend):
            _same_outputs_and_grads(fast, model, x)


@pytest.mark.interpreter
def test_optimized_new_activations_run_the_triton_kernels_under_the_interpreter():
    model = nn.Sequential(nn.Linear(7, 16), nn.LeakyReLU(0.2), nn.Linear(16, 16), nn.LeakyReLU(0.2), nn.Linear(16, 5),
                          nn.ELU(0.5))
    fast = pydlx.optimize(model)
    x = torch.randn(11, 7)
    with pydlx.use_backend("triton"):
        got = fast(x)
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)


def test_explain_with_nothing_to_fuse():
    assert pydlx.plan(nn.Conv2d(1, 1, 1)).blocks == []
    assert "nothing to fuse" in pydlx.explain(nn.Conv2d(1, 1, 1))


def _vgg_like():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),      # fused
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.MaxPool2d(2),       # groups: kept
        nn.Conv2d(8, 6, 5, stride=2, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),    # overlapping pool: fused
        nn.Conv2d(6, 4, 1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),            # ceil mode: fused
        nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()


def test_conv_relu_pool_chains_are_swapped_with_state_dict_and_gradients_unchanged():
    net = _vgg_like()
    original = copy.deepcopy(net.state_dict())
    b = blocks(net)
    assert b["0"].fused and b["0"].op == "pydlx.nn.ConvReLUPool2d" and b["0"].kind == "Conv+ReLU+MaxPool"
    assert b["0"].arg("in_channels") == 3 and b["0"].arg("out_channels") == 8 and b["0"].arg("kernel_size") == 3
    assert b["3"].reason == "groups=2 (only 1)" and b["3"].source == "forward"
    assert b["6"].fused and (b["6"].arg("pool_size"), b["6"].arg("pool_stride")) == (3, 2)
    assert b["9"].fused and b["9"].arg("ceil_mode") is True
    # what auto runs for them here (a CPU: eager; on a GPU, its measured policy or "not measured": tests/test_policy.py)
    assert b["6"].auto == "auto here: eager PyTorch (no GPU)"
    fast = pydlx.optimize(net)
    assert isinstance(fast[0], pydlx.nn.ConvReLUPool2d) and isinstance(fast[6], pydlx.nn.ConvReLUPool2d)
    assert isinstance(fast[9], pydlx.nn.ConvReLUPool2d)
    assert all(isinstance(fast[i], nn.Identity) for i in (1, 2, 7, 8, 10, 11))
    assert type(fast[3]) is nn.Conv2d and type(net[0]) is nn.Conv2d
    assert fast[0].weight is not net[0].weight  # inplace=False: a copy
    sd = fast.state_dict()
    assert list(sd) == list(original) and all(torch.equal(sd[k], original[k]) for k in sd)
    net.load_state_dict(sd)
    fast.load_state_dict(original)
    x = torch.randn(2, 3, 40, 36, dtype=torch.float64, requires_grad=True)
    for backend in ("auto", "reference"):
        with pydlx.use_backend(backend):
            assert_close(fast(x), net(x), name=f"vgg-like {backend}")
            g_fast = torch.autograd.grad(fast(x).square().sum(), [x, *fast.parameters()])
            g_net = torch.autograd.grad(net(x).square().sum(), [x, *net.parameters()])
            for a, b in zip(g_fast, g_net):
                assert_close(a, b, name="grad")
    kept = pydlx.optimize(net, filter_fn=lambda m, fqn: fqn != "6")
    assert isinstance(kept[0], pydlx.nn.ConvReLUPool2d) and type(kept[6]) is nn.Conv2d


@pytest.mark.interpreter
def test_optimized_conv_chain_runs_the_triton_kernel_under_the_interpreter():
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)).float()
    fast = pydlx.optimize(net)
    x = torch.randn(2, 3, 9, 10)
    with pydlx.use_backend("triton"):
        y = fast(x)
    assert_close(y.double(), net.double()(x.double()), dtype=torch.float32, name="triton via optimize")


class _LSTMClassifier(nn.Module):
    """The seed models' LSTM classifier: nn.LSTM(batch_first=True), zero h0/c0, fc on the last step."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.cell = nn.LSTMCell(16, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h0 = torch.zeros(2, x.size(0), 16, dtype=x.dtype)
        out, _ = self.lstm(x, (h0, torch.zeros_like(h0)))
        h, _ = self.cell(out[:, -1, :])
        return self.fc(h)


def test_lstm_modules_are_swapped_with_state_dict_unchanged():
    net = _LSTMClassifier().double()
    b = blocks(net)
    assert b["lstm"].fused and b["lstm"].op == "pydlx.nn.LSTM" and b["lstm"].family == "lstm"
    assert b["cell"].fused and b["cell"].op == "pydlx.nn.LSTMCell"
    fast = pydlx.optimize(net)
    assert type(fast.lstm) is pydlx.nn.LSTM and type(fast.cell) is pydlx.nn.LSTMCell
    assert type(net.lstm) is nn.LSTM
    sd, original = fast.state_dict(), net.state_dict()
    assert list(sd) == list(original) and all(torch.equal(sd[k], original[k]) for k in sd)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert_close(fast(x), net(x), name="lstm classifier")
    g_fast = torch.autograd.grad(fast(x).sum(), [x, *fast.parameters()])
    g_net = torch.autograd.grad(net(x).sum(), [x, *net.parameters()])
    for a, b in zip(g_fast, g_net):
        assert_close(a, b, name="grad")
    kept = pydlx.optimize(net, filter_fn=lambda m, fqn: fqn != "lstm")
    assert type(kept.lstm) is nn.LSTM and type(kept.cell) is pydlx.nn.LSTMCell


@pytest.mark.interpreter
def test_optimized_lstm_classifier_runs_the_triton_kernels():
    net = _LSTMClassifier()
    fast = pydlx.optimize(net)
    x = torch.randn(2, 4, 8)
    with pydlx.use_backend("triton"):
        y = fast(x)
    assert_close(y.double(), net.double()(x.double()), dtype=torch.float32, name="triton via optimize")


@pytest.mark.parametrize("pool", [
    pytest.param(nn.MaxPool2d(2, dilation=2), id="pool-dilation-int"),
    pytest.param(nn.MaxPool2d((2, 3)), id="pool-non-square"),
    pytest.param(nn.MaxPool2d(4), id="pool-4"),
])
def test_unsupported_pools_stay_eager_and_explained_never_a_crash(pool):
    """torchvision's ResNet stem (int pool padding) crashed explain/optimize with a TypeError. A pool the kernel
    does not take stays eager, with its reason; the conv and its ReLU still fuse."""
    net = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3), nn.ReLU(), pool)
    plan = pydlx.plan(net)
    assert [b.modules for b in plan.blocks] == [("0",)], plan  # said once
    b = plan.blocks[0]
    assert b.fused and b.op == "pydlx.ops.conv_act_pool2d" and b.chain == ("Conv2d", "relu")
    assert b.detail.startswith("the MaxPool2d after it runs eagerly (")
    fast = pydlx.optimize(net)
    assert type(fast[0]) is nn.Conv2d and type(fast[2]) is nn.MaxPool2d
    assert _pydlx_calls(fast, torch.randn(1, 3, 16, 16)) == ["conv_act_pool2d"]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fast(x), net(x))
    with pytest.raises(ValueError, match=r"from_modules: (pool|non-square)"):
        pydlx.nn.ConvReLUPool2d.from_modules(net[0], pool)


@pytest.mark.parametrize("pool", [
    pytest.param(nn.MaxPool2d(3, stride=2, padding=1), id="resnet-stem-pool-padding"),
    pytest.param(nn.MaxPool2d(2, ceil_mode=True), id="pool-ceil"),
    pytest.param(nn.MaxPool2d(3, 2, 1, ceil_mode=True), id="pool-padding-ceil"),
])
def test_pool_padding_and_ceil_mode_fuse(pool):
    """The ResNet stem's padded pool and GoogLeNet/SqueezeNet's ceil-mode pools fuse."""
    net = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3), nn.ReLU(), pool).double()
    assert blocks(net)["0"].fused and blocks(net)["0"].op == "pydlx.nn.ConvReLUPool2d"
    fast = pydlx.optimize(net)
    assert isinstance(fast[0], pydlx.nn.ConvReLUPool2d)
    x = torch.randn(2, 3, 29, 31, dtype=torch.float64, requires_grad=True)
    with pydlx.use_backend("reference"):  # the op (its argmax bookkeeping and backward), not plain eager
        assert_close(fast(x), net(x), name="fused")
        g1 = torch.autograd.grad(fast(x).sum(), [x, *fast.parameters()])
    g2 = torch.autograd.grad(net(x).sum(), [x, *net.parameters()])
    for a, b in zip(g1, g2):
        assert_close(a, b, name="grad")


# ------------------------------------------------------------------- forward code that reads modes, attributes, args
import pickle  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from pydlx import _fx_fuse  # noqa: E402


class _DropoutNet(nn.Module):
    """The pattern of many published examples: F.dropout(x, training=self.training) in forward."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        return self.fc2(x)


class _BranchNet(nn.Module):
    """Branches on self.training and on a plain attribute."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.use_tanh = False

    def forward(self, x):
        x = x * 0.5 if self.training else x + 1
        x = F.relu(self.fc(x))
        return torch.tanh(x) if self.use_tanh else x


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return F.dropout(F.relu(self.fc(x)), 0.3, self.training)


class _Nested(nn.Module):
    """A custom submodule the trace runs through, with a mode of its own; an optional argument."""

    def __init__(self):
        super().__init__()
        self.block, self.head = _Block(), nn.Linear(8, 3)

    def forward(self, x, scale=None):
        if scale is not None:
            x = x * scale
        return torch.sigmoid(self.head(self.block(x)))


class _ShapeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.shape[0] > 4:  # torch.fx cannot trace a branch on a shape: the forward must run as written
            x = x.flip(0)
        return F.relu(self.fc(x))


class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.calls = nn.Linear(8, 8), 0

    def forward(self, x):
        self.calls += 1  # a side effect a fused forward would lose: not fused
        return F.relu(self.fc(x))


def _same(fast, model, *args, seed=None, **kwargs):
    """fast(*args) == model(*args), with the same random stream when the forward draws (dropout)."""
    if seed is not None:
        torch.manual_seed(seed)
    got = fast(*args, **kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    want = model(*args, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _fused(fast, *args):
    spec = _fx_fuse.current(fast, *args)
    return spec is not None and bool(spec.fused)


@pytest.mark.parametrize("start", ["train", "eval"])
def test_optimized_model_follows_train_and_eval_like_the_original(start):
    """Regression: a forward reading self.training was frozen at the mode optimize() saw (dropout after eval())."""
    for cls in (_DropoutNet, _BranchNet, _Nested):
        model = cls()
        model.train(start == "train")
        fast = pydlx.optimize(model)
        assert isinstance(fast, cls) and _fused(fast), cls.__name__
        x = torch.randn(5, 8)
        for mode in ("eval", "train", "eval", "train"):
            getattr(model, mode)()
            getattr(fast, mode)()
            _same(fast, model, x, seed=7)
            assert _fused(fast), f"{cls.__name__}: {mode} ran unfused"
        assert len(fast._pydlx_fx.specs) == 2  # one per mode, made at optimize time, reused


def test_mixed_modes_attributes_and_optional_arguments_are_followed():
    model = _Nested()
    fast = pydlx.optimize(model)
    x = torch.randn(4, 8)
    model.block.eval()  # a submodule in eval, the model in train
    fast.block.eval()
    _same(fast, model, x, seed=3)
    _same(fast, model, x, torch.tensor(2.0), seed=3)  # the optional argument given
    _same(fast, model, x, scale=None, seed=3)
    assert _fused(fast, x) and _fused(fast, x, torch.tensor(2.0))
    branch = _BranchNet()
    fast_branch = pydlx.optimize(branch)
    for flag in (True, False, True):
        branch.use_tanh = fast_branch.use_tanh = flag
        _same(fast_branch, branch, x)
    notes = pydlx.plan(branch).notes
    assert [(n.module, n.what, n.text) for n in notes] == [("", "guards", "self.training, self.use_tanh")]


def test_replaced_submodules_and_later_hooks_are_followed():
    model = _Nested()
    fast = pydlx.optimize(model)
    x = torch.randn(4, 8)
    seen = []
    fast.block.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model.block.register_forward_hook(lambda m, i, o: None)
    _same(fast, model, x, seed=1)
    assert seen == [torch.Size([4, 8])]  # the hook ran (the forward runs as written while it is there)
    fast.block = model.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh())  # a new submodule: traced again
    _same(fast, model, x)
    assert _fused(fast, x)


def test_shape_branches_and_side_effects_run_the_forward_as_written():
    for cls in (_ShapeBranch, _Counter):
        model = cls()
        fast = pydlx.optimize(model)
        for n in (3, 6):
            _same(fast, model, torch.randn(n, 8))
        assert not _fused(fast, torch.randn(3, 8))
    counter = pydlx.optimize(_Counter())
    counter(torch.randn(2, 8))
    assert counter.calls == 1
    assert [(n.module, n.what) for n in pydlx.plan(_ShapeBranch()).notes] == [("", "not traced")]
    assert pydlx.plan(_Counter()).notes[0].text == "forward assigns attributes (calls)"


def test_fused_model_survives_pickle_deepcopy_and_compile_in_both_modes():
    model = _DropoutNet()
    fast = pydlx.optimize(model)
    x = torch.randn(5, 8)
    for copy_of in (lambda m: pickle.loads(pickle.dumps(m)), copy.deepcopy):
        c = copy_of(fast)
        assert type(c) is type(fast) and isinstance(c, _DropoutNet)
        c.eval()
        model.eval()
        _same(c, model, x)
        assert _fused(c, x)
        model.train()
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    for mode in ("eval", "train"):
        getattr(fast, mode)()
        getattr(model, mode)()
        _same(compiled, model, x, seed=5)


def test_bad_calls_of_a_fused_forward_raise_what_the_forward_raises():
    model = _Nested()
    fast = pydlx.optimize(model)
    x = torch.randn(2, 8)
    for args, kwargs in (((), {}), ((x,), {"bogus": 1}), ((x, 2.0), {"scale": 2.0}), ((x, 1, 2), {})):
        with pytest.raises(TypeError):
            model(*args, **kwargs)
        with pytest.raises(TypeError):
            fast(*args, **kwargs)


# ------------------------------------------------------------------------------- BatchNorm folded in eval mode
def _bn_net():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5)).double()
    with torch.no_grad():  # running statistics and affine parameters that are not the defaults
        for bn in (net[1], net[6]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
    return net


def _pydlx_calls(fast, *args):
    spec = _fx_fuse.current(fast, *args)
    # (getattr: the training form reads its BatchNorm's momentum at every call)
    return [n.target.__name__ for n in spec.graph.nodes if n.op == "call_function" and n.target is not getattr] \
        if spec and spec.graph else []


def test_batchnorm_is_folded_in_eval_and_recomputed_in_training():
    """Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d and Linear -> BatchNorm1d -> ReLU fuse in eval mode, the
    BatchNorm folded into the weights from its running statistics at every call; in training mode (batch
    statistics, running-stat updates) both become the ops' training forms (the layer's output recomputed in
    backward). Optimized in training mode, the default."""
    net = _bn_net()
    fast = pydlx.optimize(net)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    for mode in ("eval", "train", "eval"):
        getattr(net, mode)()
        getattr(fast, mode)()
        _same(fast, net, x)
        calls = _pydlx_calls(fast, x)
        assert calls == ["conv_bn_act_pool2d", "linear_batchnorm"], (mode, calls)
        if mode == "train":
            for backend in ("reference", "auto"):  # the training form forced, and eager under auto
                f, n = copy.deepcopy(fast), copy.deepcopy(net)
                with pydlx.use_backend(backend):
                    _same(f, n, x)
                for a, b in zip(f.buffers(), n.buffers()):
                    torch.testing.assert_close(a, b)
    # training: the running statistics move identically
    torch.testing.assert_close(fast[1].running_mean, net[1].running_mean)
    # eval: gradients reach the conv, the Linear and the BatchNorms' affine parameters as in torch
    xg = x.clone().requires_grad_()
    for a, b in zip(torch.autograd.grad(fast(xg).square().sum(), [xg, *fast.parameters()]),
                    torch.autograd.grad(net(xg).square().sum(), [xg, *net.parameters()])):
        assert_close(a, b, name="grad")
    # the fold reads the current statistics: a checkpoint loaded later is followed (never a stale copy)
    sd = {k: (v + 0.5 if "running_mean" in k else v) for k, v in net.state_dict().items()}
    net.load_state_dict(sd)
    fast.load_state_dict(sd)
    _same(fast, net, x)
    assert list(fast.state_dict()) == list(net.state_dict())
    b = blocks(net)
    assert b["0"].fused and b["0"].kind == "Conv+BN+ReLU+MaxPool" and b["0"].bn == "folded"
    assert b["5"].fused and b["5"].op == "pydlx.ops.linear_batchnorm" and b["5"].bn == "folded"


def test_batchnorm_that_cannot_fold_is_kept_with_the_reason():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU(),
                        nn.MaxPool2d(2)).double().eval()
    b = blocks(net)["0"]
    assert b.kind == "Conv+BN+ReLU+MaxPool" and b.source == "forward" and "track_running_stats=False" in b.reason
    fast = pydlx.optimize(net)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    _same(fast, net, x)
    assert _pydlx_calls(fast, x) == []
    train = blocks(_bn_net().train())
    assert train["5"].fused and train["5"].bn == "training" and train["5"].kind == "Linear+BN+relu"
    assert train["0"].fused and train["0"].bn == "training" and train["0"].kind == "Conv+BN+ReLU+MaxPool"
    assert "recomputed in backward" in train["0"].detail


def test_linear_batchnorm_on_a_3d_input_runs_as_torch_does():
    """BatchNorm1d normalises dim 1: after a Linear that is the features only for 2-D input; other ranks run the
    chain eagerly (here L == F, so torch accepts it and normalises over L)."""
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU()).double()
    with torch.no_grad():
        net[1].running_mean.normal_()
    net.eval()
    fast = pydlx.optimize(net)
    for shape in ((5, 4), (3, 6, 4)):
        _same(fast, net, torch.randn(shape, dtype=torch.float64))


class _MnistNet(nn.Module):
    """PyTorch's MNIST example writes the block pool first: F.relu(F.max_pool2d(conv(x), 2)) (max and ReLU
    commute, so it is the same block); its forward also flattens with x.view(-1, 320)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 10, 5), nn.Conv2d(10, 20, 5)
        self.fc1, self.fc2 = nn.Linear(320, 50), nn.Linear(50, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        return F.log_softmax(self.fc2(x), dim=1)


class _Gate(nn.Module):
    """A forward torch.fx cannot trace (a branch on a value); its submodules' forwards can."""

    def __init__(self):
        super().__init__()
        self.body = _MnistNet()

    def forward(self, x):
        y = self.body(x)
        return y * 2 if y.sum() > 0 else y


def test_pool_before_relu_and_untraceable_parents():
    """The pool-first spelling is fused; regression: a parent whose forward does not trace no longer stops its
    submodules' forwards from being fused."""
    for cls, where in ((_MnistNet, ""), (_Gate, "body.")):
        model = cls().double()
        fast = pydlx.optimize(model)
        x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
        for mode in ("eval", "train"):
            getattr(model, mode)()
            getattr(fast, mode)()
            _same(fast, model, x, seed=2)
        inner = fast.body if where else fast
        assert _pydlx_calls(inner, x)[:2] == ["conv_relu_pool2d", "conv_relu_pool2d"], _pydlx_calls(inner, x)
        plan = pydlx.plan(model)
        b = {", ".join(x.modules): x for x in plan.blocks}[f"{where}conv1"]
        assert b.fused and b.source == "forward" and b.kind == "Conv+ReLU+MaxPool", plan
        if where:
            assert [(n.module, n.what) for n in plan.notes if n.what == "not traced"] == [("", "not traced")]


def test_explain_names_each_kept_block_once_with_its_reason():
    """Regression: a kept block was listed twice (module chain and forward code); ResNet's stem (Conv -> BN -> ReLU ->
    MaxPool with padding) was not mentioned at all -- it now fuses in eval mode (BatchNorm folded) and in training
    mode (batch statistics, the conv recomputed in backward)."""
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True))
    plan = pydlx.plan(grouped)
    assert [(b.modules, b.kind, b.reason) for b in plan.blocks] == [(("0",), "Conv+ReLU+MaxPool", "groups=2 (only 1)")]
    stem = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(3, 2, padding=1)).eval()
    for mode in ("folded", "training"):
        b = blocks(stem.train(mode == "training"))["0"]
        assert b.fused and b.op == "pydlx.ops.conv_bn_act_pool2d" and b.bn == mode
        assert (b.arg("pool_size"), b.arg("pool_stride"), b.arg("pool_padding")) == (3, 2, 1)

class _VggSlices(nn.Module):
    """A style-transfer VGG split into slices: Conv -> ReLU ends one nn.Sequential, MaxPool starts the next."""

    def __init__(self, return_inner: bool):
        super().__init__()
        self.return_inner = return_inner
        self.slice1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True))
        self.slice2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
                                    nn.Conv2d(8, 4, 1))

    def forward(self, x):
        h1 = self.slice1(x)
        h2 = self.slice2(h1)
        return (h1, h2) if self.return_inner else h2


def test_chains_across_sequential_boundaries():
    """The parent's forward traces through both slices, so Conv -> ReLU (slice1) -> MaxPool (slice2)
    is one block; when the forward also returns the ReLU output (the style-transfer features), the pool cannot be
    fused (two users) and Conv + ReLU fuse alone. Switching return_inner re-traces (a guarded attribute)."""
    model = _VggSlices(return_inner=False).double()
    fast = pydlx.optimize(model)
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    assert _pydlx_calls(fast, x) == ["conv_relu_pool2d", "conv_act_pool2d"], _pydlx_calls(fast, x)
    _same(fast, model, x)
    b = blocks(model)["slice1.0"]
    assert b.fused and b.kind == "Conv+ReLU+MaxPool" and b.source == "forward"
    model.return_inner = fast.return_inner = True
    assert _pydlx_calls(fast, x) == ["conv_act_pool2d", "conv_act_pool2d"], _pydlx_calls(fast, x)
    _same(fast, model, x)


class _BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, written out, with the residual added in place by ``add_`` (torch.fx records
    ResNet's ``out += identity`` as an out-of-place add): the folded Conv -> BatchNorm's output is updated in place."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out.add_(identity)
        return self.relu(out)


def test_frozen_batchnorm_fine_tuning_with_in_place_residual():
    """Eval-mode BatchNorm with gradients (fine-tuning with frozen statistics): the folded Conv -> BN output is then
    updated in place (``out.add_(identity)``), which eager allows because BatchNorm saves its input, not its output; the
    fused op must not save it either (autograd would raise "modified by an inplace operation")."""
    block = _BasicBlock().double()
    for bn in (block.bn1, block.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    block.eval()
    fast = pydlx.optimize(block)
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64, requires_grad=True)
    assert _pydlx_calls(fast, x)[:2] == ["conv_bn_act_pool2d", "conv_bn_act_pool2d"], _pydlx_calls(fast, x)
    for backend in ("auto", "reference"):
        with pydlx.use_backend(backend):
            got = torch.autograd.grad(fast(x).square().sum(), [x, *fast.parameters()])
        want = torch.autograd.grad(block(x).square().sum(), [x, *block.parameters()])
        for a, b in zip(got, want):
            assert_close(a, b, name=f"grad {backend}")


class _DCGANDiscriminator(nn.Module):
    """PyTorch examples' DCGAN discriminator (64x64 in, scaled down): its forward branches on ``input.is_cuda and
    self.ngpu > 1``, which torch.fx cannot trace; the Sequential inside can."""

    def __init__(self, ngpu=1, nc=3, ndf=4):
        super().__init__()
        self.ngpu = ngpu
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, 1, 4, 1, 0, bias=False), nn.Sigmoid())

    def forward(self, input):
        if input.is_cuda and self.ngpu > 1:
            output = nn.parallel.data_parallel(self.main, input, range(self.ngpu))
        else:
            output = self.main(input)
        return output.view(-1, 1).squeeze(1)


def test_dcgan_discriminator_fuses_inside_its_untraceable_forward():
    """The untraceable forward runs as written; its Sequential's Conv -> LeakyReLU(0.2),
    Conv -> BatchNorm -> LeakyReLU(0.2) (eval: folded; training: batch statistics, recomputed in backward) and
    Conv -> Sigmoid fuse. Outputs and gradients equal in both modes and across switches."""
    model = _DCGANDiscriminator().double()
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
    fast = pydlx.optimize(model)
    plan = pydlx.plan(model)
    assert ("", "not traced") in [(n.module, n.what) for n in plan.notes], plan
    b = {", ".join(x.modules): x for x in plan.blocks}
    assert b["main.0"].fused and b["main.0"].chain == ("Conv2d", "leaky_relu(0.2)")
    assert b["main.2"].fused and b["main.2"].chain == ("Conv2d", "BatchNorm2d", "leaky_relu(0.2)")
    assert b["main.2"].bn == "training"
    assert b["main.5"].fused and b["main.5"].chain == ("Conv2d", "sigmoid")
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    for mode in ("train", "eval", "train"):
        getattr(model, mode)()
        getattr(fast, mode)()
        calls = _pydlx_calls(fast.main, x)
        assert calls == ["conv_act_pool2d", "conv_bn_act_pool2d", "conv_act_pool2d"], (mode, calls)
        for backend in ("auto", "reference"):
            fast_copy, model_copy = copy.deepcopy(fast), copy.deepcopy(model)  # train mode updates BN statistics
            with pydlx.use_backend(backend):
                yf = fast_copy(x)
                gf = torch.autograd.grad(yf.sum(), [x, *fast_copy.parameters()])
            ym = model_copy(x)
            gm = torch.autograd.grad(ym.sum(), [x, *model_copy.parameters()])
            assert_close(yf, ym, name=f"{mode} {backend}")
            for a, b in zip(gf, gm):
                assert_close(a, b, name=f"grad {mode} {backend}")


def _saved_bytes(model, x, y):
    """Bytes autograd saves for backward in one forward + loss (parameters excluded; each storage counted once)."""
    from pydlx.bench.seed_models import saved_bytes

    return saved_bytes(lambda: F.cross_entropy(model(x), y), list(model.parameters()))


def test_resnet18_saved_activation_bytes():
    """The saved-activation-bytes measurement, on torchvision's ResNet-18 (CPU, the reference backend forced so the
    fused ops run). Training mode: every Conv -> BatchNorm [-> ReLU] [-> MaxPool] is the op's training form, which
    saves x and recomputes the conv and the BatchNorm in backward, where eager keeps the conv output and the ReLU
    output too: 0.34 of eager's bytes (bench/NOTES.md), with the training step (loss, every gradient, the BatchNorm
    statistics) equal to eager's. Under ``auto`` the training form runs eagerly (no GPU measurement of the recompute
    yet): exactly eager's bytes. Eval mode with gradients (fine-tuning with frozen BatchNorm): the folded blocks
    save the output map (and int8 pool indices) instead of the conv output + BN output (+ int64 indices); a fold
    whose weight is larger than the map it saves runs as written (0.53 at this size, 0.40 at batch 16 x 224^2)."""
    import torchvision  # a requirement (requirements.txt)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    fast = pydlx.optimize(model)
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    ratios = {}
    for mode in ("train", "eval"):
        getattr(model, mode)()
        getattr(fast, mode)()
        eager = _saved_bytes(copy.deepcopy(model), x, y)
        with pydlx.use_backend("reference"):
            ours = _saved_bytes(copy.deepcopy(fast), x, y)
        ratios[mode] = ours / eager
        ratios[mode + " auto"] = _saved_bytes(copy.deepcopy(fast), x, y) / eager
    assert ratios["train"] <= 0.5, ratios
    assert ratios["train auto"] == 1.0, ratios
    assert ratios["eval"] < 0.6, ratios
    # one training step through the training form equals eager's
    model.train()
    fast.train()
    m, f = copy.deepcopy(model), copy.deepcopy(fast)
    lm = F.cross_entropy(m(x), y)
    gm = torch.autograd.grad(lm, list(m.parameters()))
    with pydlx.use_backend("reference"):
        lf = F.cross_entropy(f(x), y)
        gf = torch.autograd.grad(lf, list(f.parameters()))
    assert_close(lf, lm, dtype=torch.float32, name="loss")
    for (name, _), a, b in zip(m.named_parameters(), gf, gm):
        assert_close(a, b, dtype=torch.float32, name=name)
    for (name, a), b in zip(f.named_buffers(), m.buffers()):
        torch.testing.assert_close(a, b, msg=name)


def test_a_fold_that_would_save_more_than_eager_runs_as_written():
    """Frozen-BatchNorm fine-tuning: the folded weight is saved for backward; where it is larger than the output map
    (a wide conv on a small map) the chain runs eagerly, so pydlx never saves more than eager."""
    from pydlx.ops.conv_relu_pool import conv_bn_act_pool2d

    conv, bn = nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64).eval()
    args = (conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    for hw, fused in ((2, False), (32, True)):  # the weight: 36864 elements; the map: 2 * 64 * hw^2
        x = torch.randn(2, 64, hw, hw, requires_grad=True)
        with pydlx.use_backend("reference"):
            y = conv_bn_act_pool2d(x, *args, padding=1, activation="relu")
        assert ("pydlx" in y.grad_fn.name()) == fused, (hw, y.grad_fn.name())
        assert_close(y, torch.relu(bn(conv(x))), dtype=torch.float32, name=f"{hw}")


class _TinyResNet(nn.Module):
    """torchvision's ResNet shape in miniature: a stem Conv -> BN -> ReLU -> MaxPool(3, 2, 1), one BasicBlock with
    a strided downsample (Conv -> BN), an in-place residual add, a head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 5, 2, 2, bias=False), nn.BatchNorm2d(8)
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        self.b_conv1, self.b_bn1 = nn.Conv2d(8, 12, 3, 2, 1, bias=False), nn.BatchNorm2d(12)
        self.b_conv2, self.b_bn2 = nn.Conv2d(12, 12, 3, 1, 1, bias=False), nn.BatchNorm2d(12)
        self.down = nn.Sequential(nn.Conv2d(8, 12, 1, 2, bias=False), nn.BatchNorm2d(12))
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = self.relu(self.b_bn1(self.b_conv1(x)))
        out = self.b_bn2(self.b_conv2(out))
        out += self.down(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.relu(out), 1), 1))


@pytest.mark.interpreter
def test_optimized_resnet_like_model_runs_the_triton_kernels_in_both_modes(poison):
    """The Conv -> BatchNorm blocks on the Triton path: the folded eval-mode blocks and the training form (its
    convolution, forward and recompute, is the Triton kernel) through the interpreter, against eager in float64:
    outputs, every gradient and the BatchNorm statistics, train -> eval -> train."""
    torch.manual_seed(0)
    model = _TinyResNet()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.2)
    fast = pydlx.optimize(model)
    x = torch.randn(3, 3, 19, 17)
    for mode in ("train", "eval", "train"):
        getattr(model, mode)()
        getattr(fast, mode)()
        assert _pydlx_calls(fast, x).count("conv_bn_act_pool2d") == 4, _pydlx_calls(fast, x)
        with pydlx.use_backend("triton"):
            yf = fast(x)
            gf = torch.autograd.grad(yf.square().sum(), list(fast.parameters()))
        m64 = copy.deepcopy(model).double()
        y64 = m64(x.double())
        g64 = torch.autograd.grad(y64.square().sum(), list(m64.parameters()))
        with torch.no_grad():
            model(x)  # eager fp32: moves the original's statistics as the fused model's moved
        assert_close(yf, y64, dtype=torch.float32, name=f"{mode} output")
        for (name, _), a, b in zip(model.named_parameters(), gf, g64):
            assert_close(a, b, dtype=torch.float32, name=f"{mode} {name}.grad")
        for (name, a), b in zip(fast.named_buffers(), model.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


class _States(nn.Module):
    """Initial states made on the CPU and copied to the input's device, as the tutorial RNN makes its h0 and c0, in
    each spelling the rewrite takes, and a chain to fuse beside them."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        n = x.size(0)  # (a traced size, as the RNN's batch size; torch.fx takes it after a leading int)
        if self.spelling == "zeros":
            h = torch.zeros(1, n, 4).to(x.device)
        elif self.spelling == "ones-device-kw":
            h = torch.ones(1, n, 4, dtype=x.dtype).to(device=x.device)
        elif self.spelling == "full-constant":
            h = torch.full((1, n, 4), 0.5).to("cpu")
        else:  # empty, then filled in place
            h = torch.empty(1, n, 4).to(x.device).fill_(2.0)
        return torch.relu(self.fc(x.float())) + h


@pytest.mark.parametrize("spelling", ["zeros", "ones-device-kw", "full-constant", "empty"])
def test_tensors_copied_to_a_device_are_made_there(spelling):
    """``torch.zeros(...).to(x.device)`` in forward code becomes ``torch.zeros(..., device=x.device)``: no
    host-to-device copy (and wait) per call on a GPU, which CUDA graph capture refuses; the same values."""
    from pydlx import _fx_fuse

    model = _States(spelling)
    fast = pydlx.optimize(model)
    x = torch.randn(3, 4)
    spec = _fx_fuse.current(fast, x)
    made = [n for n in spec.graph.nodes if n.op == "call_function" and n.target in _fx_fuse._CONSTRUCTORS]
    assert len(made) == 1 and "device" in made[0].kwargs
    assert not any(n.op == "call_method" and n.target == "to" for n in spec.graph.nodes)
    torch.testing.assert_close(fast(x), model(x))
    assert [(n.module, n.what) for n in pydlx.plan(model).notes][:1] == [("", "device")]
    assert "makes tensors on the CPU and copies them to a device" in pydlx.explain(model)


class _Kept(nn.Module):
    """Constructions the rewrite leaves as written: another generator, a leaf that requires grad, a device named
    already, a second use, a conversion that is not (only) a device, a device the graph cannot tell."""

    def forward(self, x, where):
        a = torch.randn(2, 3).to(x.device)                    # random: the device's generator would differ
        b = torch.zeros(2, 3, requires_grad=True).to(x.device)  # a copy is no leaf; made there, it would be
        c = torch.zeros(2, 3, device="cpu").to(x.device)      # a device named already
        d = torch.ones(2, 3)
        e = d.to(x.device) + d                                 # used twice
        f = torch.ones(2, 3).to(x.device, x.dtype)             # more than a device
        g = torch.ones(2, 3).to(x)                             # a tensor's dtype and device
        h = torch.ones(2, 3).to(where)                         # a forward argument: a device or a dtype
        return a.sum() * 0 + b + c + e + f + g + h


def test_constructions_that_are_no_plain_copy_to_a_device_stay_as_written():
    from pydlx import _fx_fuse

    graph, _ = _fx_fuse.trace(_Kept())
    before = [(n.op, n.target, n.args, dict(n.kwargs)) for n in graph.nodes]
    assert _fx_fuse.construct_on_device(graph) == []
    assert [(n.op, n.target, n.args, dict(n.kwargs)) for n in graph.nodes] == before


def test_filter_fn_excluding_the_model_keeps_its_forward_as_written():
    from pydlx import _fx_fuse

    model = _States("zeros")
    kept = pydlx.optimize(model, filter_fn=lambda m, fqn: fqn != "")
    assert type(kept) is _States and _fx_fuse.current(kept) is None
    assert not any(n.what == "device" for n in pydlx.plan(model, filter_fn=lambda m, fqn: fqn != "").notes)
