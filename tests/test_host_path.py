"""The host path's guards: what one call of a pydlx op (and one forward of an optimized model) costs the host,
counted rather than timed, against budgets written here.

Two counts per call, on the path an eager call takes on a GPU (the backend forced to ``reference`` so that a CPU
takes it too):
  * Python: the function calls (``sys.setprofile``'s ``call`` events) of pydlx's own code;
  * ATen: the top-level ATen ops the call runs (torch.profiler's events that have no ATen op above them).
A later change that adds work to the hot path (a check run on every call again, a string parsed, a closure built, an
extra tensor op) raises a count past its budget and fails here, however fast or loaded the machine. The budgets are
today's counts; ``python -m pydlx.bench --host`` measures the time those calls cost. A path slowed on purpose (the
kept plans switched off) must fail its budget: the guard is checked to guard.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pydlx
from pydlx import _backend, registry
from pydlx.bench.seed_models import CNN

PKG = os.path.dirname(pydlx.__file__) + os.sep


def python_calls(fn: Callable[[], object]) -> Counter:
    """pydlx's Python function calls while ``fn`` runs, by function name (and their sum under "pydlx")."""
    calls: Counter = Counter()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(PKG):
            calls["pydlx"] += 1
            calls[frame.f_code.co_name] += 1
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def aten_ops(fn: Callable[[], object]) -> Counter:
    """The top-level ATen ops ``fn`` runs (an op that another ATen op runs inside itself is not counted)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    top = [e.name for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return Counter(top)


def _linear(training):
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=training)
    return lambda: pydlx.ops.linear(x, lin.weight, lin.bias, "relu"), lambda: torch.relu(lin(x))


def _mlp(training):
    seq = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    ws, bs = [seq[i].weight for i in (0, 2, 4)], [seq[i].bias for i in (0, 2, 4)]
    x = torch.randn(4, 16, requires_grad=training)
    return lambda: pydlx.ops.mlp(x, ws, bs, "relu"), lambda: seq(x)


def _conv(training):
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 8, 8, requires_grad=training)
    return (lambda: pydlx.ops.conv_relu_pool2d(x, conv.weight, conv.bias, 1, 1, 2),
            lambda: F.max_pool2d(torch.relu(conv(x)), 2))


def _conv_bn_eval(training):
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4).eval()
    x = torch.randn(2, 3, 8, 8)
    args = (conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    return (lambda: pydlx.ops.conv_bn_act_pool2d(x, *args, 1, 1, "relu"),
            lambda: torch.relu(bn(conv(x))))


def _conv_bn_train(training):
    """The training form (batch statistics; the conv recomputed in backward), forced as every case here is."""
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4).train()
    x = torch.randn(1, 3, 8, 8, requires_grad=training)

    def fused():
        return pydlx.ops.conv_bn_act_pool2d(x, conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight,
                                            bn.bias, bn.eps, 1, 1, "relu", training=True, momentum=bn.momentum,
                                            num_batches_tracked=bn.num_batches_tracked)
    return fused, lambda: torch.relu(bn(conv(x)))


def _cnn(training):
    model = CNN().eval()
    fast = pydlx.optimize(CNN().eval())
    fast.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 24, 24)
    return lambda: fast(x), lambda: model(x)


def _resnet18(training):
    """A model with guards (traced-through blocks, attributes read in forward) and twenty Conv -> BatchNorm folds."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18().eval()
    fast = pydlx.optimize(torchvision.models.resnet18().eval())
    fast.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    return lambda: fast(x), lambda: model(x)


CASES = {"resnet18": _resnet18, "linear": _linear, "mlp": _mlp, "conv_relu_pool": _conv, "conv_bn_eval": _conv_bn_eval,
         "conv_bn_train": _conv_bn_train, "optimized_cnn": _cnn}

# (case, training) -> (pydlx Python calls, top-level ATen ops) per call (training: forward and backward) after the
# first call, the backend forced to the reference. Today's counts: lower them when the path gets cheaper.
BUDGETS: Dict[Tuple[str, bool], Tuple[int, int]] = {
    ("linear", False): (12, 3),
    ("linear", True): (33, 14),
    ("mlp", False): (20, 7),
    ("mlp", True): (64, 37),
    ("conv_relu_pool", False): (13, 5),
    ("conv_relu_pool", True): (38, 25),
    ("conv_bn_eval", False): (19, 4),
    ("conv_bn_train", True): (91, 28),  # (before its batch norm was ATen's own: 84 ATen ops)
    ("optimized_cnn", False): (50, 16),
    ("resnet18", False): (407, 89),  # (eager: 69 ATen ops; the folds save 20 batch norms, each conv's op adds empties)
}
# inference: the fused call's ATen ops may exceed the eager chain's by this (the op's empty outputs for what only
# backward keeps). Training is not compared: the backward's glue around a fused kernel's layout (slices of the
# stacked pre-activation gradients, for one) counts views that launch nothing on a GPU.
EAGER_OPS_MARGIN = {"linear": 1, "mlp": 2, "conv_relu_pool": 2}


def _one_call(fn, training):
    def call():
        with torch.set_grad_enabled(training):
            y = fn()
            if training:
                y.sum().backward()
    return call


def counts(case: str, training: bool):
    fused, eager = CASES[case](training)
    run = _one_call(fused, training)
    with pydlx.use_backend("reference"):
        run()  # (the first call of a signature makes its plan)
        return python_calls(run), aten_ops(run), aten_ops(_one_call(eager, training))


@pytest.mark.parametrize("case,training", list(BUDGETS), ids=[f"{c}-{'train' if t else 'infer'}"
                                                               for c, t in BUDGETS])
def test_host_path_within_budget(case, training):
    py, ops, eager_ops = counts(case, training)
    max_py, max_ops = BUDGETS[(case, training)]
    assert py["pydlx"] <= max_py, (f"{case}: {py['pydlx']} pydlx Python calls per call (budget {max_py}): "
                                   f"{sorted(py.items())}")
    assert sum(ops.values()) <= max_ops, f"{case}: {sum(ops.values())} ATen ops per call (budget {max_ops}): {ops}"
    if case in EAGER_OPS_MARGIN and not training:  # no more ATen ops than the eager chain, plus the margin
        assert sum(ops.values()) <= sum(eager_ops.values()) + EAGER_OPS_MARGIN[case], (ops, eager_ops)


# what a call whose signature was seen before never runs: the argument checks, the dispatcher, the spec parsing
FIRST_CALL_ONLY = ("check_linear_args", "check_conv_relu_pool_args", "check_floating", "check_like", "choose",
                   "decide", "_decide", "why_not", "_parse", "activation_refused")


def test_a_repeated_call_runs_no_check_and_no_dispatcher():
    """After the first call of a signature, a call neither checks its arguments nor asks the dispatcher, nor
    parses or checks an activation spec again, forward or backward (the conv block's BatchNorm training form
    included: its conv and BatchNorm arguments are checked once per signature too)."""
    for case, training in (("linear", False), ("linear", True), ("conv_bn_train", True)):
        py, _, _ = counts(case, training)
        for name in FIRST_CALL_ONLY:
            assert py[name] == 0, (name, case, training, sorted(py.items()))


@pytest.mark.parametrize("case,training", [("conv_relu_pool", False), ("conv_relu_pool", True),
                                           ("conv_bn_eval", False)])
def test_auto_on_a_gpu_repeats_a_call_at_the_forced_backends_cost(case, training, auto_as_gpu):
    """On a GPU ``auto`` decides a call signature once; a repeated call then costs the host what the forced
    backend's does, plus one Python call (the check that ``auto`` runs no CPU shortcut), and never asks the
    dispatcher again. ``auto`` decides here as on an unmeasured GPU: the conv block's op with the reference inside,
    which the forced ``reference`` runs too (conftest.py auto_as_gpu)."""
    assert_auto_costs_the_forced_path(counts(case, training)[0], case, training, auto_as_gpu, "unmeasured")


def assert_auto_costs_the_forced_path(forced: Counter, case: str, training: bool, simulate, mode: str) -> None:
    """Under ``auto`` deciding as on a GPU (``simulate(mode)``: conftest.py auto_as_gpu), a repeated call of ``case``
    costs at most the forced backend's pydlx Python calls (``forced``) plus one (the check that ``auto`` takes no
    CPU shortcut), and runs none of the first-call-only functions."""
    simulate(mode)
    run = _one_call(CASES[case](training)[0], training)
    run()  # (the first call of the signature decides)
    auto = python_calls(run)
    assert auto["pydlx"] <= forced["pydlx"] + 1, (sorted(auto.items()), sorted(forced.items()))
    for name in FIRST_CALL_ONLY:
        assert auto[name] == 0, (name, sorted(auto.items()))


def test_the_guard_fails_on_a_slowed_path(monkeypatch):
    """With the kept plans switched off (every call checks its arguments and asks the dispatcher again), the
    counts exceed the budgets: the budgets are tight enough to see the hot path grow."""
    monkeypatch.setattr(_backend.Plans, "get", lambda self, key: None)
    for case in ("linear", "mlp", "conv_relu_pool"):
        py, _, _ = counts(case, False)
        assert py["pydlx"] > BUDGETS[(case, False)][0], (case, py["pydlx"])


# (case, training) -> (pydlx Python calls, top-level ATen ops) per call on the Triton backend's path as a GPU runs
# it (the launchers' configs kept per call key), up to Triton's own launch (stood in for: ``triton_run_stood_in``;
# its two Python calls a launch are counted too; a launch runs no ATen op). Today's counts: lower them when the path
# gets cheaper.
TRITON_BUDGETS: Dict[Tuple[str, bool], Tuple[int, int]] = {
    ("linear", False): (23, 2),
    ("linear", True): (74, 12),
    ("mlp", False): (31, 3),
    ("mlp", True): (80, 30),
    ("conv_relu_pool", False): (28, 3),
    ("conv_relu_pool", True): (56, 11),
}
TRITON_FAMILIES = ("linear", "mlp", "conv_relu_pool")


@pytest.fixture
def triton_run_stood_in(monkeypatch):
    """The Triton backend's host path as on a GPU, every kernel's run a no-op (pydlx.triton.common
    ``kernels_stood_in``), on CPU tensors: any machine counts the Python a GPU call runs before Triton's JIT."""
    pytest.importorskip("triton")
    import importlib

    common = importlib.import_module("pydlx.triton.common")
    if registry.BACKENDS["triton"].why_not_on(torch.device("cpu")) is not None:
        # (a GPU machine: the backend takes CPU tensors only under the interpreter; no kernel runs here)
        monkeypatch.setattr(registry.BACKENDS["triton"], "why_not_on", lambda device: None)
    with common.kernels_stood_in([importlib.import_module(f"pydlx.triton.{f}") for f in TRITON_FAMILIES]):
        yield common


def triton_counts(case: str, training: bool, ops: bool = False):
    """The Python calls (and with ``ops``, also the ATen ops) of a repeated call on the Triton backend."""
    fused, _ = CASES[case](training)
    run = _one_call(fused, training)
    with pydlx.use_backend("triton"):
        run()  # (the first call of a signature makes its plans and keeps its launch configs)
        return (python_calls(run), aten_ops(run)) if ops else python_calls(run)


@pytest.mark.parametrize("case,training", list(TRITON_BUDGETS), ids=[f"{c}-{'train' if t else 'infer'}"
                                                                      for c, t in TRITON_BUDGETS])
def test_triton_path_within_budget(case, training, triton_run_stood_in):
    """The GPU path's host work up to Triton's launch: a repeated call of the Linear, the fused MLP and the conv
    block on the Triton backend stays within its Python and ATen budgets and runs none of the first-call-only
    functions."""
    py, ops = triton_counts(case, training, ops=True)
    max_py, max_ops = TRITON_BUDGETS[(case, training)]
    assert py["pydlx"] <= max_py, (f"{case}: {py['pydlx']} pydlx Python calls per call on the Triton path (budget "
                                   f"{max_py}): {sorted(py.items())}")
    assert sum(ops.values()) <= max_ops, f"{case}: {sum(ops.values())} ATen ops per call (budget {max_ops}): {ops}"
    for name in FIRST_CALL_ONLY:
        assert py[name] == 0, (name, sorted(py.items()))


@pytest.mark.parametrize("case,training", list(TRITON_BUDGETS), ids=[f"{c}-{'train' if t else 'infer'}"
                                                                      for c, t in TRITON_BUDGETS])
def test_auto_choosing_triton_repeats_a_call_at_the_forced_triton_cost(case, training, triton_run_stood_in,
                                                                        auto_as_gpu):
    """Where ``auto`` runs a call on the Triton backend (a GPU whose measurements chose it: simulated), a repeated
    call costs the host what the forced Triton backend's does, plus one Python call, and never asks the dispatcher
    again."""
    assert_auto_costs_the_forced_path(triton_counts(case, training), case, training, auto_as_gpu, "kernels")


def test_the_triton_guard_fails_on_a_slowed_launch(monkeypatch, triton_run_stood_in):
    """With the launchers forgetting their kept configs before every launch (each launch prunes the shipped configs
    again, as before configs were kept), the Triton path's counts exceed their budgets."""
    real = triton_run_stood_in.Tuned.__call__
    monkeypatch.setattr(triton_run_stood_in.Tuned, "__call__", lambda self, *a: (self.kept.clear(), real(self, *a)))
    for case in TRITON_FAMILIES:
        py = triton_counts(case, False)
        assert py["pydlx"] > TRITON_BUDGETS[(case, False)][0], (case, py["pydlx"])


def test_the_guard_sees_an_extra_aten_op(monkeypatch):
    """An extra tensor op on the hot path (here, the input copied) exceeds the ATen budget."""
    from pydlx.reference import linear as ref

    real = ref.linear_fwd
    monkeypatch.setattr(ref, "linear_fwd", lambda x, *a: real(x.clone(), *a))
    _, ops, _ = counts("linear", False)
    assert sum(ops.values()) > BUDGETS[("linear", False)][1], ops


def test_an_eval_fold_is_kept_until_a_tensor_changes():
    """The eval-mode BatchNorm fold is computed once and reused while nothing it was computed from changes: an
    optimizer-style in-place update, a training-mode call (running statistics moved) or a swapped tensor makes a
    new one, and the output always equals eager's."""
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)

    def fused():
        return pydlx.ops.conv_bn_act_pool2d(x, conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight,
                                            bn.bias, bn.eps, 1, 1, "relu", training=bn.training,
                                            momentum=bn.momentum, num_batches_tracked=bn.num_batches_tracked)

    def check():
        bn.eval()
        with torch.no_grad(), pydlx.use_backend("reference"):
            want = torch.relu(bn(conv(x)))
            got = fused()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return aten_ops(lambda: _no_grad_reference(fused))

    first = check()
    assert "aten::rsqrt" not in first, first  # kept: the second call folds nothing
    with torch.no_grad():
        bn.weight.mul_(1.5)  # an optimizer step's in-place update
    check()
    with torch.no_grad():
        conv.weight.add_(0.1)
    check()
    bn.train()
    with torch.no_grad(), pydlx.use_backend("reference"):
        fused()  # training mode: the running statistics move in place
    check()
    bn.running_var = bn.running_var * 2  # a new tensor in the same place
    check()
    pydlx.clear_caches()
    check()


def _no_grad_reference(fn):
    with torch.no_grad(), pydlx.use_backend("reference"):
        return fn()


def test_a_fold_is_recomputed_when_autograd_records():
    """With gradients recorded the fold is part of the graph (differentiable in w, b, gamma, beta): never kept."""
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4).eval()
    x = torch.randn(2, 3, 8, 8)
    args = (conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    with pydlx.use_backend("reference"):
        pydlx.ops.conv_bn_act_pool2d(x, *args, 1, 1, "relu").sum().backward()
        g1 = bn.weight.grad.clone()
        ops = aten_ops(lambda: pydlx.ops.conv_bn_act_pool2d(x, *args, 1, 1, "relu"))
    assert "aten::rsqrt" in ops, ops
    bn.weight.grad = None
    torch.relu(bn(conv(x))).sum().backward()
    torch.testing.assert_close(g1, bn.weight.grad, rtol=1e-4, atol=1e-5)


def test_generated_guard_checks_agree_with_the_guards():
    """An optimized model's forward checks its specialisation's guards with generated code; it must agree with the
    guards read one by one (pydlx._fx_fuse.guards_hold) as the model changes in every way a guard watches: train /
    eval, a hook added and removed, a plain attribute changed, a traced-through submodule replaced and deleted."""
    from pydlx import _fx_fuse

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.scale = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), 2.0
            self.extra = nn.Identity()

        def forward(self, x):
            return F.relu(self.bn(self.conv(x))) * self.scale + self.extra(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.head = Block(), nn.Linear(3 * 8 * 8, 4)

        def forward(self, x):
            return self.head(torch.flatten(self.block(x), 1))

    model = pydlx.optimize(Net().eval())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
    spec = model._pydlx_fx.specs[0]
    assert len(spec.guards) > 3, spec.guards

    def agree():
        assert spec.holds(model) == _fx_fuse.guards_hold(model, spec.guards)
        return spec.holds(model)

    assert agree()
    model.train()
    assert not agree()
    model.eval()
    assert agree()
    handle = model.block.register_forward_hook(lambda m, i, o: None)
    assert not agree()
    handle.remove()
    assert agree()
    model.block.scale = 3.0
    assert not agree()
    model.block.scale = 2.0
    assert agree()
    old = model.block  # (a module traced through: its identity is a guard; a leaf such as block.extra is not)
    model.block = Block().eval()
    assert not agree()
    model.block = old
    assert agree()
    del model.block
    assert not agree()  # (a path that no longer resolves: the generic check decides)


def test_eager_calls_skip_the_op_and_watched_calls_take_it():
    """Eagerly an op's implementation runs directly (no torch.library dispatch); under a dispatch mode (what
    torch.compile's fake tensors, FlopCounterMode and the like use) the call goes through the ``pydlx::`` op, so
    they see one opaque op; both give the same values and gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    seq = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3, bias=False))  # (a layer without a bias too)
    ws, bs = [seq[0].weight, seq[2].weight], [seq[0].bias, None]
    x = torch.randn(6, 5, requires_grad=True)
    from pydlx.ops._common import _OPS

    op, calls = _OPS["mlp_fused"], Counter()
    overload = op.overload
    op.overload = lambda *args: calls.update(["op"]) or overload(*args)
    try:
        with pydlx.use_backend("reference"):
            y = pydlx.ops.mlp(x, ws, bs, "relu")
            assert calls["op"] == 0
            seen = Seen()
            with seen:
                y_op = pydlx.ops.mlp(x, ws, bs, "relu")
            assert calls["op"] == 1
    finally:
        op.overload = overload
    assert seen.ops["pydlx.mlp_fused.default"] == 1, seen.ops
    torch.testing.assert_close(y, y_op, rtol=0, atol=0)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *ws, bs[0]], g)
    grads_op = torch.autograd.grad(y_op, [x, *ws, bs[0]], g)
    for a, b in zip(grads, grads_op):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    want = torch.autograd.grad(seq(x), [x, *ws, bs[0]], g)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["linear", "mlp", "conv"])
def test_auto_choosing_the_reference_runs_plain_eager(monkeypatch, family):
    """Where ``auto`` chooses the reference for a call (a GPU without a measured faster kernel for it), a Linear or
    MLP call runs plain eager PyTorch: autograd records torch's own nodes, no pydlx op or generated Function, so the
    host pays what the chain as written pays. The conv block keeps its op (its memory saving: the pooled output and
    int8 indices saved). A forced ``reference`` runs the op. The device is made to look like an unmeasured GPU by
    making ``auto`` skip its CPU shortcut and decide the reference."""
    from pydlx.ops._common import _OPS

    monkeypatch.setattr(_backend, "cpu_auto", lambda t: False)
    decided = []
    monkeypatch.setattr(_backend, "decide", lambda family, device, call, op=None: (
        decided.append(family) or ("reference", "eager: not measured on this GPU")))
    lin, lin2 = nn.Linear(6, 5), nn.Linear(5, 3)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(4, 6, requires_grad=True)
    xc = torch.randn(2, 2, 6, 6, requires_grad=True)
    call = {"linear": lambda: pydlx.ops.linear(x, lin.weight, lin.bias, "relu"),
            "mlp": lambda: pydlx.ops.mlp(x, [lin.weight, lin2.weight], [lin.bias, lin2.bias], "relu"),
            "conv": lambda: pydlx.ops.conv_relu_pool2d(xc, conv.weight, conv.bias, 1, 1, 2)}[family]
    want = {"linear": lambda: torch.relu(lin(x)), "mlp": lambda: lin2(torch.relu(lin(x))),
            "conv": lambda: F.max_pool2d(torch.relu(conv(xc)), 2)}[family]
    ran = Counter()
    for name, op in _OPS.items():
        monkeypatch.setattr(op, "impl", (lambda impl, name: lambda *a: ran.update([name]) or impl(*a))(op.impl, name))
    y = call()
    assert decided
    if family == "conv":
        assert ran and type(y.grad_fn).__name__.startswith("pydlx"), (ran, type(y.grad_fn).__name__)
    else:
        assert not ran and not type(y.grad_fn).__name__.startswith("pydlx"), (ran, type(y.grad_fn).__name__)
    torch.testing.assert_close(y, want(), rtol=1e-5, atol=1e-6)
    ran.clear()
    with pydlx.use_backend("reference"):
        y_op = call()
    assert ran and type(y_op.grad_fn).__name__.startswith("pydlx"), (ran, type(y_op.grad_fn).__name__)
    torch.testing.assert_close(y_op, y, rtol=1e-5, atol=1e-6)


def test_a_repeated_triton_launch_keeps_its_config(monkeypatch):
    """A Triton kernel's launcher (pydlx.triton.common.Tuned) chooses a call's config once per call key -- pruning
    the shipped configs, then the autotuner's timing where more than one is left -- and launches a repeated call
    with that config directly: no pruning and no pass through the autotuner's per-call Python again. A new key
    (another size, dtype or constexpr), a forced config and PYDLX_TRITON_AUTOTUNE=0 are each honoured. The GPU is
    stood in for: the kernel and the autotuner record what they are asked to run."""
    triton = pytest.importorskip("triton")
    common = pytest.importorskip("pydlx.triton.common")
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, M, N, ACT: tl.constexpr, BLOCK: tl.constexpr):
        pass

    configs = [triton.Config({"BLOCK": b}, num_warps=w, num_stages=2) for b, w in ((16, 2), (32, 4), (64, 8))]
    pruned = []

    def prune(cfgs, named_args, **kwargs):
        pruned.append((named_args["M"], kwargs["ACT"]))
        return cfgs[:1] if kwargs["ACT"] == 1 else cfgs[1:]  # one config left for ACT 1, two for the others

    tuned = common.Tuned(kernel, configs, ["M", "ACT"], prune, configs[0])
    launched, timed = [], []

    class Recorder:  # the kernel: kernel[grid](*args, **kwargs) records the launch
        arg_names = kernel.arg_names

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((grid, args[1], kwargs))

    class Autotuner:  # the autotuner: times the configs, picks the last one, launches it
        best_config = None

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                timed.append(args[1])
                Autotuner.best_config = configs[2]
            return run

    monkeypatch.setattr(tuned, "kernel", Recorder())
    monkeypatch.setattr(tuned, "tuned", Autotuner())
    monkeypatch.setattr(common, "INTERPRETED", False)
    monkeypatch.delenv("PYDLX_TRITON_AUTOTUNE", raising=False)
    x = torch.empty(4)
    grid = lambda meta: (meta["BLOCK"],)  # noqa: E731

    tuned(grid, (x, 100, 7), dict(ACT=0))  # first call of the key: pruned, timed (the autotuner launches)
    assert (pruned, timed, launched) == ([(100, 0)], [100], [])
    for _ in range(3):  # the same key: the kept config, launched directly
        tuned(grid, (x, 100, 9), dict(ACT=0))  # (N is not in the key: the autotuner's choice holds for it)
    assert (pruned, timed) == ([(100, 0)], [100])
    assert launched == [((64,), 100, dict(ACT=0, BLOCK=64, num_warps=8, num_stages=2))] * 3

    launched.clear()
    tuned(grid, (x, 200, 7), dict(ACT=0))  # another size: chosen afresh
    tuned(grid, (x.double(), 100, 7), dict(ACT=0))  # another dtype: chosen afresh
    assert pruned[1:] == [(200, 0), (100, 0)] and timed[1:] == [200, 100] and launched == []

    tuned(grid, (x, 100, 7), dict(ACT=1))  # one config left: launched as is, never timed
    tuned(grid, (x, 100, 7), dict(ACT=1))
    assert len(pruned) == 4 and len(timed) == 3
    assert launched == [((16,), 100, dict(ACT=1, BLOCK=16, num_warps=2, num_stages=2))] * 2

    launched.clear()
    monkeypatch.setenv("PYDLX_TRITON_AUTOTUNE", "0")  # tuning off: the first config kept, not the autotuner's
    tuned(grid, (x, 100, 7), dict(ACT=0))
    assert len(timed) == 3 and launched == [((32,), 100, dict(ACT=0, BLOCK=32, num_warps=4, num_stages=2))]

    launched.clear()
    with common.forced_config(configs[0]):  # a forced config wins over a kept one
        tuned(grid, (x, 100, 7), dict(ACT=0))
    assert launched == [((16,), 100, dict(ACT=0, BLOCK=16, num_warps=2, num_stages=2))]


def test_triton_launchers_call_no_constexpr_function_on_the_host(monkeypatch):
    """The Triton backends' host code (grids, dw splits) computes its ceilings with pydlx.triton.common.cdiv, not
    ``triton.cdiv``: that is a constexpr function, whose wrapper costs the host ~1.7 µs a call outside a kernel, and
    a Linear backward took nine. Counted per launch of the Linear, MLP and conv kernels with each grid evaluated as a
    launch evaluates it (the kernels themselves stood in for: no GPU)."""
    pytest.importorskip("triton")
    import triton
    import importlib

    common = importlib.import_module("pydlx.triton.common")
    tri = {f: importlib.import_module(f"pydlx.triton.{f}") for f in ("linear", "mlp", "conv_relu_pool")}
    grids = []
    monkeypatch.setattr(common.Tuned, "__call__", lambda self, grid, args, kwargs: grids.append(
        grid(self.interpret_config.kwargs) if callable(grid) else grid))
    called = []
    real = triton.cdiv
    monkeypatch.setattr(triton, "cdiv", lambda *a, **k: called.append(a) or real(*a, **k))
    x, w, b = torch.randn(40, 24), torch.randn(20, 24), torch.randn(20)
    y, _ = tri["linear"].linear_fwd(x, w, b, "relu", False)
    tri["linear"].linear_bwd(torch.randn(40, 20), x, w, y, "relu", True, True, True)
    ws, bs = [torch.randn(16, 24), torch.randn(8, 16)], [torch.randn(16), torch.randn(8)]
    y, H, Z = tri["mlp"].mlp_fwd(x, ws, bs, "relu", None, True)
    tri["mlp"].mlp_bwd(torch.randn(40, 8), x, ws, y, H, Z, "relu", None, True)
    tri["conv_relu_pool"].conv_relu_pool_fwd(torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), None, 1, 1, 2, 2)
    assert len(grids) >= 5 and all(isinstance(g, tuple) and all(isinstance(n, int) for n in g) for g in grids)
    assert called == []
