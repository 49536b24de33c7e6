"""Double backward (``create_graph=True``, then a backward through the gradient: gradient penalties, second-order
meta-learning, Hessian-vector products) through pydlx's ops.

On the reference backend a backward op is PyTorch ops, and pydlx lets autograd record them in a backward that
records a graph, handing them only tensors that carry their history (a saved pre-activation or an MLP's hidden
layers are recomputed from the inputs there): the second-order gradients are checked against finite differences in
float64 (``gradgradcheck``). Under ``auto`` a call that ran on a kernel takes the reference's backward there; a
forced kernel backend (Triton, C++/CUDA) raises torch's RuntimeError instead -- never a silent wrong gradient, and
a forced backend never falls back."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradgradcheck

import pydlx
from graph import pydlx_nodes

D = dict(dtype=torch.float64, requires_grad=True)


def _through_op(y):
    assert type(y.grad_fn).__name__.startswith("pydlx"), type(y.grad_fn).__name__  # (the op ran, not eager)
    return y


@pytest.mark.parametrize("activation", [None, "relu", "tanh", "sigmoid", "leaky_relu(0.2)", "elu(0.7)", "selu", "relu6",
                                        "hardsigmoid"])
def test_linear_second_order_on_the_reference(activation):
    x, w, b = torch.randn(5, 7, **D), torch.randn(3, 7, **D), torch.randn(3, **D)
    with pydlx.use_backend("reference"):
        assert gradgradcheck(lambda x, w, b: _through_op(pydlx.ops.linear(x, w, b, activation)), (x, w, b))
        assert gradgradcheck(lambda x, w: _through_op(pydlx.ops.linear(x, w, None, activation)),
                             (torch.randn(2, 3, 7, **D), w))  # (3-D input, no bias)


@pytest.mark.parametrize("activation,pool,stride,padding", [
    ("relu", 2, 1, 1), ("leaky_relu(0.2)", 1, 2, 1), ("tanh", 3, 1, 0), (None, 2, 1, 1), ("elu", 1, 1, 2),
    ("sigmoid", 2, 2, 0)])
def test_conv_block_second_order_on_the_reference(activation, pool, stride, padding):
    x, w, b = torch.randn(2, 3, 9, 11, **D), torch.randn(4, 3, 3, 3, **D), torch.randn(4, **D)
    with pydlx.use_backend("reference"):
        assert gradgradcheck(lambda x, w, b: _through_op(
            pydlx.ops.conv_act_pool2d(x, w, b, stride, padding, activation, pool)), (x, w, b))


@pytest.mark.parametrize("activation,pool", [("relu", 2), ("tanh", 1), ("gelu", 1), (None, 1)])
def test_conv_bn_training_form_second_order_on_the_reference(activation, pool):
    """The training form recomputes from x in backward, so even a pre-activation's derivative (gelu) is exact."""
    x, w, b = torch.randn(3, 2, 7, 7, **D), torch.randn(4, 2, 3, 3, **D), torch.randn(4, **D)
    gamma, beta = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_(), torch.randn(4, **D)
    stats = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    with pydlx.use_backend("reference"):
        assert gradgradcheck(lambda x, w, b, g, be: _through_op(pydlx.ops.conv_bn_act_pool2d(
            x, w, b, *stats, g, be, 1e-5, 1, 1, activation, pool, training=True)), (x, w, b, gamma, beta))


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_linear_bn_training_form_second_order_on_the_reference(activation):
    x, w, b = torch.randn(6, 5, **D), torch.randn(4, 5, **D), torch.randn(4, **D)
    gamma, beta = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_(), torch.randn(4, **D)
    stats = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    with pydlx.use_backend("reference"):
        assert gradgradcheck(lambda x, w, b, g, be: _through_op(pydlx.ops.linear_batchnorm(
            x, w, b, *stats, g, be, 1e-5, activation, training=True)), (x, w, b, gamma, beta))


def _refused(call, inputs, backend):
    """The first backward with create_graph=True works and is right; the second raises torch's RuntimeError."""
    with pydlx.use_backend(backend):
        y = _through_op(call(*inputs))
        g = torch.autograd.grad(y.square().sum(), inputs[0], create_graph=True)[0]
        with pytest.raises(RuntimeError, match="no autograd formula"):
            g.sum().backward()


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu", "hardswish", "mish"])
def test_a_saved_pre_activation_is_recomputed_with_its_history(activation):
    """Where the derivative needs the pre-activation z (saved as a non-differentiable output: autograd cannot see
    how it depends on the inputs), a backward that records a graph recomputes z from the inputs (the bias is saved
    for it), so the second order is exact. (Let through without the recompute, gradgradcheck fails on these.)"""
    x, w, b = torch.randn(5, 7, **D), torch.randn(3, 7, **D), torch.randn(3, **D)
    xc, wc, bc = torch.randn(2, 3, 7, 7, **D), torch.randn(4, 3, 3, 3, **D), torch.randn(4, **D)
    with pydlx.use_backend("reference"):
        assert gradgradcheck(lambda x, w, b: _through_op(pydlx.ops.linear(x, w, b, activation)), (x, w, b))
        assert gradgradcheck(lambda x, w: _through_op(pydlx.ops.linear(x, w, None, activation)), (x, w))
        assert gradgradcheck(lambda x, w, b: _through_op(
            pydlx.ops.conv_act_pool2d(x, w, b, 1, 1, activation, 1)), (xc, wc, bc))


@pytest.mark.parametrize("activation,last", [("tanh", None), ("leaky_relu(0.2)", "sigmoid"), ("gelu", "relu")])
def test_fused_mlp_second_order_on_the_reference(activation, last):
    """The fused MLP saves its hidden layers as non-differentiable outputs, so in a backward that records a graph
    the reference recomputes the MLP from its inputs (the biases are saved for it) and differentiates that: the
    chain's second-order gradients. (The fused op takes the kernels' dtypes: float32 here, against eager's float32
    and float64.)"""
    torch.manual_seed(0)
    sizes = [6, 16, 9, 3]
    ws = [torch.randn(o, i, dtype=torch.float64) / i ** 0.5 for i, o in zip(sizes, sizes[1:])]
    bs = [torch.randn(16, dtype=torch.float64), None, torch.randn(3, dtype=torch.float64)]
    x = torch.randn(5, 6, dtype=torch.float64)
    act = {"tanh": torch.tanh, "leaky_relu(0.2)": lambda t: F.leaky_relu(t, 0.2), "gelu": F.gelu,
           "sigmoid": torch.sigmoid, "relu": torch.relu, None: lambda t: t}

    def chain(t, ws, bs):
        for i, (w, b) in enumerate(zip(ws, bs)):
            t = act[activation if i + 1 < len(ws) else last](F.linear(t, w, b))
        return t

    def penalty_grads(fn, dtype):
        w = [t.to(dtype).requires_grad_() for t in ws]
        b = [None if t is None else t.to(dtype).requires_grad_() for t in bs]
        xx = x.to(dtype).requires_grad_()
        (g,) = torch.autograd.grad(fn(xx, w, b).square().sum(), xx, create_graph=True)
        return torch.autograd.grad(g.square().sum(), [*w, *[t for t in b if t is not None]])
    with pydlx.use_backend("reference"):
        y = pydlx.ops.mlp(x.float().requires_grad_(), [w.float() for w in ws],
                          [None if b is None else b.float() for b in bs], activation, last)
        assert type(y.grad_fn).__name__ == "pydlx_mlp_fusedBackward"
        got = penalty_grads(lambda t, w, b: pydlx.ops.mlp(t, w, b, activation, last), torch.float32)
    want, truth = penalty_grads(chain, torch.float32), penalty_grads(chain, torch.float64)
    for g, w, t in zip(got, want, truth):
        assert (g.double() - t).abs().max() <= 2 * (w.double() - t).abs().max() + 1e-5 * t.abs().max()


def test_refused_on_a_kernel_backend():
    """A Triton kernel's backward is not differentiable, and a forced backend never falls back: the second
    backward raises, as before."""
    x, w = torch.randn(4, 6, requires_grad=True), torch.randn(5, 6, requires_grad=True)
    _refused(lambda x, w: pydlx.ops.linear(x, w, None, "relu"), (x, w), "triton")


class _Critic(nn.Module):
    """A DCGAN-style critic as a WGAN-GP trains it (strided convolutions, LeakyReLU, no BatchNorm, a Linear head)."""

    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 16, 4, 2, 1),
                                  nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(16 * 4 * 4, 1))

    def forward(self, x):
        return self.main(x)


def _gradient_penalty_grads(model, real, fake, eps):
    """WGAN-GP's penalty (its gradients with respect to the critic's parameters): the critic's input gradient at
    points between real and fake, through create_graph=True, then a backward through its norm."""
    mixed = (eps * real + (1 - eps) * fake).requires_grad_()
    (g,) = torch.autograd.grad(model(mixed).sum(), mixed, create_graph=True)
    penalty = ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()
    return torch.autograd.grad(penalty, list(model.parameters()), allow_unused=True)  # (the head's bias: unused)


def test_an_optimized_wgan_gp_critic_under_auto_as_on_an_unmeasured_gpu(auto_as_gpu):
    """On a GPU without a measured faster kernel, ``auto`` runs the conv block's op with the reference inside (its
    memory saving: the output and int8 indices saved, not the conv map). A WGAN-GP critic swapped by
    ``pydlx.optimize`` then takes its gradient penalty through the op's double backward: the same gradients as the
    critic as written. The device is made to look like an unmeasured GPU (conftest.py auto_as_gpu)."""
    auto_as_gpu("unmeasured")
    torch.manual_seed(0)
    critic = _Critic().double()
    fast = pydlx.optimize(_Critic().double())
    fast.load_state_dict(critic.state_dict())
    real, fake = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randn(4, 3, 16, 16, dtype=torch.float64)
    eps = torch.rand(4, 1, 1, 1, dtype=torch.float64)
    mixed = (eps * real + (1 - eps) * fake).requires_grad_()
    out = fast(mixed)  # (kept: a custom Function's node lives only as long as the graph holding it)
    assert pydlx_nodes(out)  # (the op runs)
    want = _gradient_penalty_grads(critic, real, fake, eps)
    got = _gradient_penalty_grads(fast, real, fake, eps)
    assert [g is None for g in got] == [g is None for g in want] == [False] * 5 + [True]
    for a, b in zip(got[:5], want[:5]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class _MlpCritic(nn.Module):
    """The critic with an MLP head (Linear -> LeakyReLU -> ... , every layer at most 128 wide: one fused op)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 16, 4, 2, 1),
                                      nn.LeakyReLU(0.2), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(16 * 4 * 4, 64), nn.LeakyReLU(0.2), nn.Linear(64, 32), nn.LeakyReLU(0.2),
                                  nn.Linear(32, 1))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.interpreter
def test_an_optimized_critic_under_auto_with_measured_kernels(auto_as_gpu):
    """``auto`` on a GPU whose measurements chose the Triton kernels (made to look so: the CPU shortcut skipped,
    every decision "triton"): the critic's conv blocks and MLP head run the kernels, and its gradient penalty's
    backward (create_graph=True) takes the reference's backward on the same saved tensors -- auto's choice: a
    kernel's backward is not differentiable -- giving the penalty gradients of the critic as written. A forced
    ``triton`` refuses instead."""
    auto_as_gpu("kernels")
    torch.manual_seed(0)
    critic = _MlpCritic()
    fast = pydlx.optimize(_MlpCritic())
    fast.load_state_dict(critic.state_dict())
    real, fake, eps = torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16), torch.rand(3, 1, 1, 1)
    mixed = (eps * real + (1 - eps) * fake).requires_grad_()
    out = fast(mixed)  # (kept: a custom Function's node lives only as long as the graph holding it)
    names = pydlx_nodes(out)
    assert {"pydlx_conv_relu_pool2d_fwdBackward", "pydlx_mlp_fusedBackward"} <= names, names
    got = _gradient_penalty_grads(fast, real, fake, eps)
    want = _gradient_penalty_grads(critic, real, fake, eps)
    truth = _gradient_penalty_grads(copy.deepcopy(critic).double(), real.double(), fake.double(), eps.double())
    for g, w, t in zip(got, want, truth):
        if t is None:
            assert g is None and w is None
            continue
        assert (g.double() - t).abs().max() <= 2 * (w.double() - t).abs().max() + 1e-5 * t.abs().max()
    with pydlx.use_backend("triton"), pytest.raises(RuntimeError, match="no autograd formula"):
        _gradient_penalty_grads(fast, real, fake, eps)


def test_torch_func_hessian_vector_product_through_the_reference():
    """torch.func's grad of grad (a Hessian-vector product) through a Linear on the reference backend, against the
    chain as torch computes it."""
    x, w, b, v = (torch.randn(4, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64),
                  torch.randn(5, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64))

    def loss(w, f):
        return f(x, w, b).square().sum()

    def hvp(f):  # (reverse over reverse: the op's Function has no forward-mode rule)
        return torch.func.vjp(torch.func.grad(lambda w: loss(w, f)), w)[1](v)[0]
    with pydlx.use_backend("reference"):
        got = hvp(lambda x, w, b: pydlx.ops.linear(x, w, b, "tanh"))
    want = hvp(lambda x, w, b: torch.tanh(F.linear(x, w, b)))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_lstm_second_order_on_the_reference():
    """The LSTM on the reference is ATen's LSTM, differentiated twice as nn.LSTM is."""
    torch.manual_seed(0)
    lstm = pydlx.nn.LSTM(3, 4, num_layers=2).double()
    x = torch.randn(5, 2, 3, **D)
    with pydlx.use_backend("reference"):
        assert gradgradcheck(lambda x, w: torch.func.functional_call(lstm, {"weight_ih_l0": w}, (x,))[0], (
            x, lstm.weight_ih_l0.detach().clone().requires_grad_()))
