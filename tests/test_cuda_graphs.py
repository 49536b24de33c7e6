"""CUDA graphs: an optimized model's inference and its whole training step, captured and replayed.

GPU tests (skipped without a CUDA device, tests/conftest.py), for each seed model (pydlx/bench/seed_models.py: the
CNN, the LSTM classifier, the autoencoder, at the seed's sizes) after ``pydlx.optimize``, with each kernel backend
forced (``pydlx.registry.candidates()``) and under ``auto``, in fp32 with TF32 off (fp32's tolerance,
tests/tolerance.py):

* ``torch.cuda.CUDAGraph``: inference captured after the warm-up on a side stream, replayed on new batches copied
  into the static input, against the model as written (float64 on the CPU; the RNN in fp32, as it makes its
  states);
* a whole training step (forward, loss, backward, SGD step) captured with ``torch.cuda.graph`` and replayed on new
  batches; the forward and backward graphed by ``torch.cuda.make_graphed_callables`` with an eager optimizer step;
  ``torch.compile(mode="reduce-overhead")`` for inference calls and training steps (no graph skipped). Each
  training run is checked against the same steps run eagerly, by the optimized model (parameters within fp32's
  tolerance: the same kernels) and by the model as written (the losses within fp32's tolerance, the parameter
  updates within 10x fp32's relative tolerance in norm: two max-pool implementations may pick different maxima of
  a window whose values tie to the last bit, which moves single gradient terms but not the update).

CPU tests: what capture needs of pydlx's side of a call, on fake CUDA tensors (no GPU): the optimized models' forward
with a GPU backend forced makes no tensor on the CPU, copies nothing between host and device, reads nothing back
(each of which CUDA graph capture refuses) and runs the forced backend's ops.
"""
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import pydlx
from pydlx import registry
from pydlx.cuda.conv_relu_pool import MAX_CHANNELS
from pydlx.bench import seed_models as S
from tolerance import TOL, assert_close, rel_err

KINDS = ["cnn", "rnn", "autoencoder"]
BATCH = 32  # a small batch: where host time dominates and a graph pays
WARM_UP = 3  # eager iterations on a side stream before a capture (torch.cuda.graphs' documented warm-up)
STEPS = 3  # steps (replays, calls) checked
LR = 0.05  # SGD with momentum: updates linear in the gradients, large enough to see in a few steps

# What a forced backend refuses to run in a seed model: it raises BackendUnavailableError (no silent fallback).
# The C++/CUDA direct convolution takes first layers only (pydlx/cuda/conv_relu_pool.py), and the seed CNN's conv2
# has 32 input channels. test_gpu_forced_backend_refuses_what_it_cannot_run checks this table on a GPU.
REFUSED = {("cnn", "cuda"): f"at most {MAX_CHANNELS} input channels"}


def _cases(backends):
    return [pytest.param(kind, backend, id=f"{kind}-{backend}")
            for kind in KINDS for backend in backends if (kind, backend) not in REFUSED]


FORCED = _cases(registry.candidates())  # each kernel backend forced
CASES = _cases(("auto",) + registry.candidates())  # and what a user runs by default


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def full_fp32():
    """fp32 matmuls and cuDNN convolutions without TF32 for the test (fp32's tolerance then holds for the model as
    written too: TF32 is cuDNN's default for convolutions)."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def _setup(kind):
    """(the model as written on the GPU, the optimized one, [(x, y)] batches of BATCH on the GPU)."""
    torch.manual_seed(0)
    model = S.make_model(kind).cuda()
    fast = pydlx.optimize(model)
    data = S.make_data(kind, "cuda")
    x, y = data["x_train"], data["y_train"]
    batches = [(x[i * BATCH:(i + 1) * BATCH].clone(), y[i * BATCH:(i + 1) * BATCH].clone())
               for i in range(1 + STEPS + 1)]
    return model, fast, batches


def _oracle(kind, model, x):
    """The model as written on the CPU, in float64 (the RNN in fp32: its forward makes fp32 states)."""
    dtype = torch.float32 if kind == "rnn" else torch.float64
    with torch.no_grad():
        return copy.deepcopy(model).cpu().to(dtype)(x.cpu().to(dtype))


def _warm_up(fn, n=WARM_UP):
    """``fn`` n times on a side stream (kernels compiled and tuned, lazy state made), as torch.cuda.graphs
    documents before a capture."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(s)


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def _eager_step(kind, model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = S.loss_fn(kind, model, x, y)
    loss.backward()
    opt.step()
    return loss.detach()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _check_training(kind, backend, make_step):
    """``make_step(model, opt, x, y) -> (step, warm_steps)``: ``step(x, y) -> loss`` runs one training step of the
    optimized ``model`` the way under test (a replayed graph, graphed callables, a compiled model); ``warm_steps``:
    the eager steps on (x, y) it took while warming up. The references run the same steps eagerly: a copy of the
    optimized model (the same kernels) and the model as written."""
    model, fast, batches = _setup(kind)
    twin = copy.deepcopy(fast)
    opt_fast, opt_twin, opt_model = _sgd(fast), _sgd(twin), _sgd(model)
    x0, y0 = batches[0]
    with pydlx.use_backend(backend):
        step, warm_steps = make_step(fast, opt_fast, x0, y0)
        for _ in range(warm_steps):
            _eager_step(kind, twin, opt_twin, x0, y0)
            _eager_step(kind, model, opt_model, x0, y0)
        before_fast, before_model = _params(fast), _params(model)
        for i, (x, y) in enumerate(batches[1:1 + STEPS]):
            got = step(x, y).detach().clone()
            twin_loss = _eager_step(kind, twin, opt_twin, x, y)
            want = _eager_step(kind, model, opt_model, x, y)
            assert_close(got, twin_loss, dtype=torch.float32, name=f"{kind}/{backend} loss {i} (optimized, eager)")
            assert_close(got, want, dtype=torch.float32, name=f"{kind}/{backend} loss {i} (as written)")
    torch.cuda.synchronize()
    for (n, p), q in zip(fast.named_parameters(), twin.parameters()):
        assert_close(p, q, dtype=torch.float32, name=f"{kind}/{backend} {n} after {STEPS} steps")
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(fast.parameters(), before_fast)])
    written = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before_model)])
    assert written.abs().max() > 100 * TOL[torch.float32][1], "the steps did not move the parameters"
    err = rel_err(moved, written)
    assert err <= 10 * TOL[torch.float32][0], (f"{kind}/{backend}: the parameter updates differ from the model as "
                                               f"written's by {err:.2e} (relative, in norm)")


# ---------------------------------------------------------------------------------------------- GPU: torch.cuda.graphs
@pytest.mark.gpu
@pytest.mark.parametrize("kind, backend", CASES)
def test_gpu_inference_replays_in_a_cuda_graph(kind, backend, full_fp32):
    model, fast, batches = _setup(kind)
    static_x = batches[0][0].clone()
    with pydlx.use_backend(backend), torch.no_grad():
        _warm_up(lambda: fast(static_x))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_out = fast(static_x)
    outs = []
    for i, (x, _) in enumerate(batches[1:1 + STEPS]):
        static_x.copy_(x)
        g.replay()
        torch.cuda.synchronize()
        assert_close(static_out, _oracle(kind, model, x), dtype=torch.float32, name=f"{kind}/{backend} replay {i}")
        outs.append(static_out.clone())
    assert not torch.equal(outs[0], outs[1])  # (each replay computed its own batch)


@pytest.mark.gpu
@pytest.mark.parametrize("kind, backend", CASES)
def test_gpu_training_step_replays_in_a_cuda_graph(kind, backend, full_fp32):
    """Forward, loss, backward and the optimizer step in one graph (torch.cuda.graphs' whole-network recipe)."""
    def make_step(fast, opt, x0, y0):
        static_x, static_y = x0.clone(), y0.clone()
        _warm_up(lambda: _eager_step(kind, fast, opt, static_x, static_y))
        g = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)  # backward makes the gradients in the graph's memory
        with torch.cuda.graph(g):
            static_loss = S.loss_fn(kind, fast, static_x, static_y)
            static_loss.backward()
            opt.step()

        def step(x, y):
            static_x.copy_(x)
            static_y.copy_(y)
            g.replay()
            return static_loss
        return step, WARM_UP

    _check_training(kind, backend, make_step)


@pytest.mark.gpu
@pytest.mark.parametrize("kind, backend", CASES)
def test_gpu_make_graphed_callables_trains(kind, backend, full_fp32):
    """The forward and backward graphed by torch.cuda.make_graphed_callables (it warms up itself, without optimizer
    steps); the optimizer step eager."""
    def make_step(fast, opt, x0, y0):
        graphed = torch.cuda.make_graphed_callables(fast, (x0.clone(),))

        def step(x, y):
            return _eager_step(kind, graphed, opt, x, y)
        return step, 0

    _check_training(kind, backend, make_step)


# ---------------------------------------------------------------------------------------------- GPU: torch.compile
@pytest.mark.gpu
@pytest.mark.parametrize("kind, backend", CASES)
def test_gpu_compile_reduce_overhead(kind, backend, full_fp32):
    """torch.compile(mode="reduce-overhead") (CUDA graphs under Inductor): inference calls against the model as
    written, then training steps; no graph skipped (Inductor falls back to running without one, and counts it)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, fast, batches = _setup(kind)
    compiled = torch.compile(fast, mode="reduce-overhead")
    with pydlx.use_backend(backend), torch.no_grad():
        for i, (x, _) in enumerate(batches[:1 + STEPS]):  # the first calls warm up and record, the rest replay
            torch.compiler.cudagraph_mark_step_begin()
            out = compiled(x).clone()
            assert_close(out, _oracle(kind, model, x), dtype=torch.float32, name=f"{kind}/{backend} call {i}")

    def make_step(fast, opt, x0, y0):
        compiled = torch.compile(fast, mode="reduce-overhead")

        def step(x, y):
            torch.compiler.cudagraph_mark_step_begin()
            return _eager_step(kind, compiled, opt, x, y)
        return step, 0

    _check_training(kind, backend, make_step)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


@pytest.mark.gpu
@pytest.mark.parametrize("kind, backend", [pytest.param(k, b, id=f"{k}-{b}") for k, b in sorted(REFUSED)])
def test_gpu_forced_backend_refuses_what_it_cannot_run(kind, backend):
    """The cases left out of the tests above, for the reason REFUSED gives: the forced backend raises."""
    model, fast, batches = _setup(kind)
    with pydlx.use_backend(backend), pytest.raises(pydlx.BackendUnavailableError, match=REFUSED[(kind, backend)]):
        fast(batches[0][0])


# ---------------------------------------------------------------------------------------------- CPU: fake CUDA tensors
class _Calls(TorchDispatchMode):
    """Every op a call dispatches: (op, devices of its tensor inputs, devices of its tensor outputs, arguments)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        devices = lambda tree: [t.device.type for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]  # noqa: E731
        self.ops.append((func, devices((args, kwargs)), devices(out), args))
        return out


def _on_fake_cuda(model: nn.Module) -> None:
    """``model``'s parameters and buffers as fake CUDA tensors (inside a FakeTensorMode)."""
    for m in model.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            setattr(m, name, nn.Parameter(p.to("cuda"), requires_grad=p.requires_grad))
        for name, b in list(m.named_buffers(recurse=False)):
            setattr(m, name, b.to("cuda"))


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")  # (torch's LSTM, on fake weights)
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("kind, backend", FORCED)
def test_forward_on_a_gpu_makes_nothing_on_the_host(kind, backend, training, monkeypatch):
    """One forward and loss of the optimized seed model with a GPU backend forced, on fake CUDA tensors (torch's
    FakeTensorMode: shapes and devices, no data, no GPU): no op makes or reads a tensor on the CPU (a copy between
    host and device, or a tensor made on the host, is a host wait capture refuses), nothing is read back to the
    host (``.item()``, ``float(t)``, ``torch.cuda.synchronize``), and the fused layers run the forced backend's ops.
    The backend is taken as able to run every call on the fake device and its kernels do not run (the ops' fake
    implementations give the shapes): what runs is the model's code and pydlx's side of each call -- the optimized
    forward, the entry points, the dispatcher, the autograd bookkeeping. (A backward needs a real device, whose
    threads autograd's engine starts: the GPU tests capture it.) The seed RNN as written makes its h0 and c0 on the
    CPU and copies them: pydlx.optimize makes them on the device (pydlx/_fx_fuse.py construct_on_device)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = registry.why_not
    monkeypatch.setattr(registry, "why_not", lambda b, family, device, call: None if device.type == "cuda"
                        else real(b, family, device, call))

    def synchronize(*args, **kwargs):
        raise AssertionError("torch.cuda.synchronize in a forward")
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    fast = pydlx.optimize(S.make_model(kind))
    data = S.make_data(kind)
    with FakeTensorMode(allow_non_fake_inputs=True):
        _on_fake_cuda(fast)
        x, y = data["x_train"][:BATCH].to("cuda"), data["y_train"][:BATCH].to("cuda")
        with pydlx.use_backend(backend), torch.set_grad_enabled(training), _Calls() as calls:
            S.loss_fn(kind, fast, x, y)
    host = [(str(f), ins, outs) for f, ins, outs, _ in calls.ops if "cpu" in ins + outs]
    assert host == [], f"ops on the host in a forward on the GPU: {host}"
    ran = [(f, dict(zip([a.name for a in f._schema.arguments], args))) for f, _, _, args in calls.ops
           if f.namespace == "pydlx"]
    assert ran, "no pydlx op ran"
    assert {a["backend"] for _, a in ran} == {backend}, [(str(f), a["backend"]) for f, a in ran]
