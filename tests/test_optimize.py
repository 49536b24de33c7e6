"""pydlx.optimize / pydlx.explain for the Linear + activation chains (later families add their patterns)."""
import copy
import importlib.util
import os

import pytest
import torch
from torch import nn

import pydlx
from tolerance import assert_close

_spec = importlib.util.spec_from_file_location(
    "swap_demo", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "swap_demo.py"))
swap_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(swap_demo)


def seed_autoencoder():
    return swap_demo.Autoencoder(input_size=784, encoding_dim=32, n_layers=3).double()


def test_optimize_seed_autoencoder_keeps_state_dict_and_outputs():
    net = seed_autoencoder()
    original = copy.deepcopy(net.state_dict())
    fast = pydlx.optimize(net)
    assert fast is not net
    assert isinstance(fast.encoder[0], pydlx.nn.Linear) and fast.encoder[0].activation == "relu"
    assert isinstance(fast.encoder[1], nn.Identity)
    assert type(fast.encoder[4]) is nn.Linear  # no activation after it: left alone
    assert type(net.encoder[0]) is nn.Linear  # inplace=False left the original untouched
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
                                      (nn.Tanh(), "tanh"), (nn.Sigmoid(), "sigmoid"), (nn.ReLU(), "relu")])
def test_each_activation_module_is_fused(act, name):
    model = nn.Sequential(nn.Linear(5, 6), act, nn.Linear(6, 2)).double()
    fast = pydlx.optimize(model)
    assert fast[0].activation == name
    x = torch.randn(4, 5, dtype=torch.float64)
    assert_close(fast(x), model(x), name=name)


def test_inplace_and_filter_fn_and_explain():
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 7), nn.LeakyReLU(), nn.Linear(7, 3), nn.Tanh())
    text = pydlx.explain(model)
    assert "fuse   0: Linear + relu" in text
    assert "keep   2: Linear (LeakyReLU is not a fusable activation)" in text
    assert "fuse   4: Linear + tanh" in text
    same = pydlx.optimize(model, inplace=True, filter_fn=lambda m, fqn: fqn != "4")
    assert same is model
    assert isinstance(model[0], pydlx.nn.Linear) and type(model[4]) is nn.Linear and isinstance(model[5], nn.Tanh)


def test_explain_with_nothing_to_fuse():
    assert "nothing to fuse" in pydlx.explain(nn.Conv2d(1, 1, 1))
