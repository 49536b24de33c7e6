"""pydlx.optimize on the three seed models as written (pydlx/bench/seed_models.py) and on functional
forwards (torch.fx): what is fused, state_dict identical, same outputs and gradients, training curves that agree,
and integration -- torch.compile(fullgraph=True), autocast, DistributedDataParallel over two CPU processes,
deepcopy / pickle / torch.save. CUDA graphs: tests/test_cuda_graphs.py."""
import copy
import io
import os
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pydlx
from graph import pydlx_nodes
from pydlx import _fx_fuse
from tolerance import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))  # importable by name: pickling the models needs it
import seed_models as S  # noqa: E402

KINDS = ["cnn", "rnn", "autoencoder"]


def _inputs(kind, n=6, dtype=torch.float64):
    data = S.make_data(kind, dtype=dtype)
    return data["x_train"][:n], data["y_train"][:n]


def fused_calls(fast: nn.Module, *args):
    """(target, kwargs) of each function call in the fused forward that ``fast(*args)`` runs now."""
    spec = _fx_fuse.current(fast, *args)
    assert spec is not None and spec.graph is not None, "the forward code is not fused"
    return [(n.target, n.kwargs) for n in spec.graph.nodes if n.op in ("call_function", "call_method")]


def _same_state_dict(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", KINDS)
def test_seed_model_is_optimized_with_state_dict_outputs_and_gradients_unchanged(kind):
    torch.manual_seed(0)
    dtype = torch.float32 if kind == "rnn" else torch.float64  # the seed RNN makes fp32 h0/c0 (nn.LSTM: same dtype)
    model = S.make_model(kind, small=True).to(dtype)
    original = copy.deepcopy(model)
    fast = pydlx.optimize(model)
    _same_state_dict(fast, original)
    _same_state_dict(model, original)  # inplace=False left it alone
    assert isinstance(fast, type(model))  # the model's own class (a subclass of it when its forward is fused)
    fused = {type(m).__name__ for m in fast.modules()}
    want = {"cnn": set(), "rnn": {"LSTM"}, "autoencoder": {"MLP"}}[kind]
    assert want <= {n for n in fused if n in ("ConvReLUPool2d", "Linear", "LSTM", "MLP")}
    if kind == "cnn":
        # the forward code's chains become pydlx op calls over the modules' own parameters; the modules stay
        assert type(fast.conv1) is nn.Conv2d and type(fast.fc1) is nn.Linear and type(fast.fc2) is nn.Linear
        spec = _fx_fuse.current(fast)
        convs = [n for n in spec.graph.nodes if n.target is pydlx.ops.conv_relu_pool2d]
        assert [n.args[1].target for n in convs] == ["conv1.weight", "conv2.weight"]
        mlps = [n for n in spec.graph.nodes if n.op == "call_function" and n.target is pydlx.ops.mlp]
        assert len(mlps) == 1 and mlps[0].kwargs == {"activation": "relu", "last_activation": None}
        assert [a.target for a in mlps[0].args[1]] == ["fc1.weight", "fc2.weight"]
    x, y = _inputs(kind, dtype=dtype)
    x.requires_grad_()
    assert_close(fast(x), model(x).double(), dtype=dtype, name=f"{kind} output")
    g_fast = torch.autograd.grad(S.loss_fn(kind, fast, x, y), [x, *fast.parameters()])
    g_model = torch.autograd.grad(S.loss_fn(kind, model, x, y), [x, *model.parameters()])
    for a, b in zip(g_fast, g_model):
        assert_close(a, b.double(), dtype=dtype, name=f"{kind} grad")
    model.load_state_dict(fast.state_dict())  # checkpoints load both ways
    fast.load_state_dict(original.state_dict())


def _blocks(model):
    return {", ".join(b.modules): b for b in pydlx.plan(model).blocks}


def test_explain_lists_the_seed_cnn_functional_chains():
    b = _blocks(S.CNN())
    assert b["conv1"].fused and b["conv1"].source == "forward" and b["conv1"].op == "pydlx.ops.conv_relu_pool2d"
    assert b["conv2"].fused and b["conv2"].kind == "Conv+ReLU+MaxPool"
    assert b["fc1, fc2"].op == "pydlx.ops.mlp" and b["fc1, fc2"].family == "mlp"
    assert b["fc1, fc2"].args == (("sizes", [2304, 128, 10]), ("activation", "relu"), ("last_activation", None))


class _Variants(nn.Module):
    """torch.relu, x.relu(), F.gelu(tanh), an in-place ReLU(True) module called from forward, F.max_pool2d."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3)
        self.act = nn.ReLU(True)
        self.fc1 = nn.Linear(4 * 2 * 2, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.a(x)), 2)
        x = F.max_pool2d(self.b(x).relu(), 3, 2)
        x = torch.flatten(x, 1)
        x = self.act(self.fc1(x))
        x = F.gelu(self.fc2(x), approximate="tanh")
        return torch.sigmoid(self.fc3(x))


def test_functional_variants_are_fused():
    torch.manual_seed(0)
    model = _Variants().double()
    fast = pydlx.optimize(model)
    # conv -> relu -> pool twice; fc1 -> ReLU(True) -> fc2 -> gelu(tanh): one MLP (hidden relu, last gelu_tanh);
    # fc3 -> sigmoid: a fused Linear
    pool = lambda p, q: {"stride": 1, "padding": 1 if p == 2 else 0, "pool_size": p, "pool_stride": q}  # noqa: E731
    assert fused_calls(fast) == [
        (pydlx.ops.conv_relu_pool2d, pool(2, 2)), (pydlx.ops.conv_relu_pool2d, pool(3, 2)), (torch.flatten, {}),
        (pydlx.ops.mlp, {"activation": "relu", "last_activation": "gelu_tanh"}),
        (pydlx.ops.linear, {"activation": "sigmoid"})]
    _same_state_dict(fast, model)
    x = torch.randn(3, 2, 15, 15, dtype=torch.float64, requires_grad=True)
    assert_close(fast(x), model(x), name="variants")
    for a, b in zip(torch.autograd.grad(fast(x).sum(), [x, *fast.parameters()]),
                    torch.autograd.grad(model(x).sum(), [x, *model.parameters()])):
        assert_close(a, b, name="grad")


class _Unfusable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, dilation=2)
        self.shared = nn.Linear(5, 5)
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)          # dilated: kept
        x = F.relu(self.fc(x.mean((2, 3))))                 # fused
        return torch.tanh(self.shared(x)) + self.shared(x)  # shared, only one call followed by tanh: kept


def test_unsupported_and_shared_modules_are_kept_with_the_reason():
    model = _Unfusable().double()
    b = _blocks(model)
    assert b["conv"].kind == "Conv+ReLU+MaxPool" and b["conv"].reason.startswith("dilation=(2, 2)")
    assert b["shared"].reason.startswith("shared is called 2 times and not every call")
    assert b["fc"].fused and b["fc"].op == "pydlx.ops.linear"
    fast = pydlx.optimize(model)
    assert [t for t, _ in fused_calls(fast) if str(getattr(t, "__module__", "")).startswith("pydlx")] == [
        pydlx.ops.linear]
    x = torch.randn(2, 2, 9, 9, dtype=torch.float64)
    assert_close(fast(x), model(x), name="unfusable")
    kept = pydlx.optimize(model, filter_fn=lambda m, fqn: fqn != "fc")
    assert type(kept) is _Unfusable and _fx_fuse.current(kept) is None  # nothing left to fuse


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return F.relu(self.fc(self.body(x)))


def test_untraceable_model_keeps_module_swaps_and_explain_says_why():
    model = _Untraceable().double()
    plan = pydlx.plan(model)
    assert [(b.modules, b.op) for b in plan.fused] == [(("body",), "pydlx.nn.MLP")]
    assert [(n.module, n.what) for n in plan.notes] == [("", "not traced")]
    assert plan.notes[0].text.startswith("TraceError")
    assert "note   forward code of the model not traced by torch.fx (TraceError" in pydlx.explain(model)
    fast = pydlx.optimize(model)
    assert _fx_fuse.current(fast) is None and isinstance(fast.body, pydlx.nn.MLP)
    assert type(fast.fc) is nn.Linear
    x = torch.randn(3, 4, dtype=torch.float64)
    assert_close(fast(x), model(x), name="untraceable")


@pytest.mark.parametrize("kind", KINDS)
def test_training_curves_agree(kind):
    """A few steps of the seed's optimizer on digits, as written and optimized, from the same weights (auto)."""
    torch.manual_seed(0)
    model = S.make_model(kind, small=True)
    fast = pydlx.optimize(model)
    data = S.make_data(kind)
    a = S.train(kind, model, data, epochs=1, batch=32, max_steps=8)
    b = S.train(kind, fast, data, epochs=1, batch=32, max_steps=8)
    assert len(a["losses"]) == 8
    if kind != "cnn":  # Adam learns within 8 steps; the seed CNN's SGD (lr 0.001) barely moves the loss yet
        assert a["losses"][-1] < a["losses"][0]
    for la, lb in zip(a["losses"], b["losses"]):
        assert abs(la - lb) <= 1e-4 * max(1.0, abs(la)), (a["losses"], b["losses"])


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["rnn", "autoencoder"])
def test_training_curves_agree_on_the_triton_kernels(kind):
    """The same with the Triton kernels forced (under the interpreter here, compiled on a GPU): a small LSTM
    classifier and the full autoencoder, 2 steps at batch 4."""
    torch.manual_seed(0)
    model = S.make_model(kind, small=True)
    fast = pydlx.optimize(model)
    data = S.make_data(kind)
    a = S.train(kind, model, data, epochs=1, batch=4, max_steps=2, metrics=False)
    with pydlx.use_backend("triton"):
        b = S.train(kind, fast, data, epochs=1, batch=4, max_steps=2, metrics=False)
    assert len(b["losses"]) == 2
    for la, lb in zip(a["losses"], b["losses"]):
        assert abs(la - lb) <= 2e-3 * max(1.0, abs(la)), (a["losses"], b["losses"])


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.parametrize("kind", KINDS)
def test_training_curves_agree_under_auto_as_on_an_unmeasured_gpu(kind, auto_as_gpu):
    """The same under ``auto`` deciding as on a GPU with nothing measured (conftest.py auto_as_gpu): the CNN's conv
    blocks run their op (the reference inside) and its two-layer head the Triton fused MLP; the autoencoder's
    layers (wider than the fused MLP's 128) the Triton Linear; the LSTM classifier runs as written (cuDNN's place
    until measured; its head is one Linear without an activation). 2 steps at batch 4."""
    torch.manual_seed(0)
    model = S.make_model(kind, small=True)
    fast = pydlx.optimize(model)
    data = S.make_data(kind)
    a = S.train(kind, model, data, epochs=1, batch=4, max_steps=2, metrics=False)
    auto_as_gpu("unmeasured")
    b = S.train(kind, fast, data, epochs=1, batch=4, max_steps=2, metrics=False)
    assert len(b["losses"]) == 2
    out = fast(data["x_train"][:4])
    ops = pydlx_nodes(out)
    assert ops == {"cnn": {"pydlx_conv_relu_pool2d_fwdBackward", "pydlx_mlp_fusedBackward"}, "rnn": set(),
                   "autoencoder": {"pydlx_linear_fwdBackward"}}[kind], ops
    for la, lb in zip(a["losses"], b["losses"]):
        assert abs(la - lb) <= 2e-3 * max(1.0, abs(la)), (a["losses"], b["losses"])


@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph_of_optimized_model(kind):
    torch.manual_seed(0)
    fast = pydlx.optimize(S.make_model(kind, small=True))
    x, y = _inputs(kind, dtype=torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), fast(x).double(), dtype=torch.float32, name=f"{kind} compiled")


@pytest.mark.parametrize("kind", KINDS)
def test_autocast_bf16_on_cpu(kind):
    torch.manual_seed(0)
    model = S.make_model(kind)
    fast = pydlx.optimize(model)
    x, _ = _inputs(kind, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast(x)
        # torch's own LSTM under CPU autocast needs AVX-512 (oneDNN): no eager baseline for the RNN on every CPU
        want = model(x) if kind != "rnn" else None
    assert got.dtype == torch.bfloat16 and (want is None or want.dtype == torch.bfloat16)
    # (the seed RNN makes fp32 h0/c0 in its forward, so it cannot run in float64: its oracle is fp32)
    oracle = model.double()(x.double()) if kind != "rnn" else model(x)
    assert_close(got, oracle, dtype=torch.bfloat16, baseline=want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_autocast(kind, dtype):
    torch.manual_seed(0)
    model = S.make_model(kind).cuda()
    fast = pydlx.optimize(model)
    x, y = _inputs(kind, n=32, dtype=torch.float32)
    x, y = x.cuda(), y.cuda()
    with torch.autocast("cuda", dtype=dtype):
        got, want = fast(x), model(x)
        S.loss_fn(kind, fast, x, y).backward()
    assert got.dtype == want.dtype
    ref = torch.float32 if kind == "rnn" else torch.float64  # the seed RNN builds fp32 h0/c0
    assert_close(got, model.to(ref)(x.to(ref)).double(), dtype=dtype, baseline=want)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fast.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_deepcopy_pickle_and_torch_save(kind):
    torch.manual_seed(0)
    fast = pydlx.optimize(S.make_model(kind, small=True))
    x, _ = _inputs(kind, dtype=torch.float32)
    want = fast(x)
    copies = [copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))]
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    copies.append(torch.load(buf, weights_only=False))
    for c in copies:
        assert type(c) is type(fast)
        _same_state_dict(c, fast)
        assert torch.equal(c(x), want)


def _ddp_worker(rank, world, port, kind, x, y, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DDP(pydlx.optimize(S.make_model(kind, small=True)))
    half = x.shape[0] // world
    S.loss_fn(kind, model, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]).backward()
    if rank == 0:
        out.put([p.grad.numpy().copy() for p in model.module.parameters()])  # by value, not shared memory
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["cnn", "rnn"])
def test_ddp_two_cpu_processes_match_one(kind):
    import socket

    import torch.multiprocessing as mp

    x, y = _inputs(kind, n=8, dtype=torch.float32)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, kind, x, y, out)) for r in range(2)]
    for p in procs:
        p.start()
    grads = out.get(timeout=300)
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    torch.manual_seed(0)
    single = pydlx.optimize(S.make_model(kind, small=True))
    # DDP averages the two halves' gradients: the mean loss over the whole batch, when halves are equal
    S.loss_fn(kind, single, x, y).backward()
    assert len(grads) == len(list(single.parameters()))
    for g, p in zip(grads, single.parameters()):
        assert_close(torch.from_numpy(g).double(), p.grad.double(), dtype=torch.float32, name="ddp grad")


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_optimized_cnn_saves_at_most_half_the_activations(device):
    """The seed CNN at batch 64: what autograd saves for backward, counted with saved_tensors_hooks. On a GPU under
    auto; on the CPU with the reference backend forced (the same op: auto on a CPU runs plain eager PyTorch)."""
    torch.manual_seed(0)
    model = S.make_model("cnn").to(device)
    fast = pydlx.optimize(model)
    data = S.make_data("cnn", device)
    x, y = data["x_train"][:64], data["y_train"][:64]
    before = S.saved_activation_bytes("cnn", model, x, y)
    with pydlx.use_backend("auto" if device == "cuda" else "reference"):
        after = S.saved_activation_bytes("cnn", fast, x, y)
    assert after <= before / 2, (after, before)


# ------------------------------------------------------------------------------------ the report's timing lines
def test_report_prints_a_speedup_only_where_the_spreads_resolve_it():
    """examples/train_seed_models.py's comparison line, fed fabricated (median, p20, p80) timings: no timing."""
    from pydlx import bench

    # the loaded-machine case: medians 1.31x apart, but the p20..p80 ranges overlap: no ratio, "within noise"
    noisy = bench.format_change((183.29, 150.10, 220.40), (139.57, 120.00, 190.00))
    assert noisy == "183.29 (150.10-220.40) -> 139.57 (120.00-190.00) ms: same within noise (0.79x-1.84x)"
    assert "1.31" not in noisy and "speedup" not in noisy
    # medians 2x apart, ranges that touch (original's p20 == optimized's p80): still not resolved
    assert "same within noise" in bench.format_change((10.0, 8.0, 12.0), (5.0, 4.0, 8.0))
    # resolved both ways: faster and slower
    assert bench.format_change((10.0, 9.5, 10.5), (5.0, 4.8, 5.2)).endswith("ms: speedup 2.00x")
    assert bench.format_change((5.0, 4.8, 5.2), (10.0, 9.5, 10.5)).endswith("ms: speedup 0.50x")
    # a small resolved difference is reported; the same difference with a wider spread is not
    assert bench.format_change((1.05, 1.04, 1.06), (1.0, 0.99, 1.01)).endswith("speedup 1.05x")
    assert "same within noise" in bench.format_change((1.05, 1.0, 1.1), (1.0, 0.95, 1.05))
    # sub-millisecond times keep three significant digits
    assert bench.format_change((0.0512, 0.05, 0.053), (0.0401, 0.04, 0.041), unit="ms").startswith(
        "0.0512 (0.0500-0.0530) -> 0.0401 (0.0400-0.0410) ms")


def test_report_runs_end_to_end_at_a_tiny_size(capsys):
    """The report on the CPU at batch 8, one epoch, 3 timing rounds: the correctness lines as before, and for each
    model a training-step and an inference line, each a median (p20-p80) pair, a speedup only where the printed
    spreads resolve it, else "same within noise"."""
    import re

    import train_seed_models

    assert train_seed_models.main(["--device", "cpu", "--epochs", "1", "--batch", "8", "--reps", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("state_dict unchanged: True") == 3
    assert len(re.findall(r"largest loss difference along the curves: 0\.00e\+00", out)) == 3
    assert out.count("batch 8 on cpu, original -> optimized, median (p20-p80) of 3 interleaved rounds:") == 3
    num = r"(\d+\.\d+)"
    line = re.compile(rf"^    (training step|inference) +{num} \({num}-{num}\) -> {num} \({num}-{num}\) ms: "
                      r"(speedup \d+\.\d\dx|same within noise \(\d+\.\d\dx-\d+\.\d\dx\))$", re.M)
    found = line.findall(out)
    assert [f[0] for f in found] == ["training step", "inference"] * 3, out
    for _, med, p20, p80, o_med, o20, o80, verdict in found:
        assert float(p20) <= float(med) <= float(p80) and float(o20) <= float(o_med) <= float(o80)
        if verdict.startswith("speedup"):  # (the printed values are rounded: strictly apart only if resolved)
            assert float(p20) >= float(o80) or float(p80) <= float(o20), verdict
    assert out.count("saved activations") == 3
