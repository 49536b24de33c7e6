"""Measured on first use (pydlx/_measure.py), the user cache and ``pydlx.tune``, on the CPU: a faked GPU (its name
and capability), the CPU standing in for it where the trials run (``_measure.trial_device``), a fake device clock
(scripted timings; each timed function still runs), and fake backends registered like any other: ``fastok`` (the
reference's implementations under another name: correct everywhere), ``wrong`` (a Linear whose output is 1% off)
and ``broken`` (a Linear that raises). The real measurement on a GPU is the GPU test at the end."""
from __future__ import annotations

import copy
import functools
import io
import json
import os
import subprocess
import sys
import threading
import time
import types
import warnings

import pytest
import torch
from torch import nn

import pydlx
from pydlx import _backend, _measure, _policy, registry
from pydlx.reference import linear as reference_linear

CARD = ("NVIDIA H100 80GB HBM3", "9.0")
DEV = torch.device("cuda", 0)  # (never touched: the trials run on the CPU)
EAGER = (1.0, 0.98, 1.02)


def call(M=100, training=True, dtype=torch.bfloat16, N=32, K=48):
    return registry.LinearCall(dtype, training, M, N, K)


class FakeClock:
    """Times every function once (so each runs, as the real clock runs them) and returns the scripted (median, p20,
    p80) ms per name (eager: EAGER; a backend not scripted: as slow as eager)."""

    def __init__(self):
        self.times, self.calls, self.delay = {}, 0, 0.0

    def __call__(self, fns, device):
        self.calls += 1
        time.sleep(self.delay)
        out = {}
        for name, fn in fns.items():
            fn()
            out[name] = self.times.get(name, EAGER)
        return out


def _linear_impl(forward):
    m = types.SimpleNamespace(supports=lambda call, device: None, linear_bwd=reference_linear.linear_bwd)
    m.linear_fwd = forward
    return m


def _wrong_fwd(*args):
    y, z = reference_linear.linear_fwd(*args)
    return y * 1.1, z


def _broken_fwd(*args):
    raise RuntimeError("an illegal memory access was encountered")


FAKES = {"fastok": dict(package="pydlx.reference"),
         "wrong": dict(implementations={"linear": _linear_impl(_wrong_fwd)}),
         "broken": dict(implementations={"linear": _linear_impl(_broken_fwd)})}


def fake_gpu_here(cache_dir, clock=None, patch=None):
    """The set-up the tests share (``patch(obj, name, value)``: monkeypatch.setattr, or setattr in a spawned rank):
    the fake card, its cache folder, the CPU standing in for the GPU, the real kernel backends out of the way, the
    fake backends registered. Returns the clock."""
    patch = patch or setattr
    clock = clock or FakeClock()
    patch(_policy, "device_key", lambda device=None: CARD)
    patch(_policy, "_cache", {})
    patch(_measure, "trial_device", lambda device: torch.device("cpu"))
    patch(_measure, "clock", clock)
    patch(_measure, "_driver", lambda: "580.65")
    for name in ("triton", "cuda"):
        patch(registry.BACKENDS[name], "why_not_on", lambda device, name=name: f"{name} is not part of this test")
    os.environ["PYDLX_CACHE_DIR"] = str(cache_dir)
    os.environ.pop("PYDLX_POLICY", None)
    for name, kw in FAKES.items():
        registry.register_backend(registry.Backend(name, **kw))
    _measure.forget()
    return clock


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("PYDLX_CACHE_DIR", str(tmp_path / "cache"))  # (restored after the test)
    monkeypatch.delenv("PYDLX_POLICY", raising=False)
    monkeypatch.setattr(_measure, "BUDGET", _measure.Budget())
    clock = fake_gpu_here(tmp_path / "cache", patch=monkeypatch.setattr)
    try:
        yield clock
    finally:
        for name in FAKES:
            registry.unregister_backend(name)
        _measure.forget()


def measure_decide(c, family="linear"):
    with pydlx.use_policy("measure"):
        return _backend.decide(family, DEV, c)


# ----------------------------------------------------------------------------------------------- the decision
def test_first_use_keeps_the_fastest_correct_backend(gpu):
    gpu.times = {"wrong": (0.2, 0.19, 0.21), "fastok": (0.5, 0.49, 0.51)}
    backend, why = measure_decide(call())
    assert backend == "fastok"
    assert why == ("fastok: 2.00x eager (1.92x-2.08x), measured this process on NVIDIA H100 80GB HBM3 (sm_90) "
                   "(linear 128x32x48 bf16 training)")
    d = _measure.recorded("linear", DEV, call())
    verdicts = dict(d.checked)
    assert verdicts["fastok"] == "correct, 2.00x eager (1.92x-2.08x)"
    assert verdicts["wrong"].startswith("wrong: output max error")  # the fastest, and never chosen
    assert verdicts["broken"] == "failed: RuntimeError: an illegal memory access was encountered"
    assert verdicts["triton"] == "cannot run it: triton is not part of this test"
    assert gpu.calls == 1
    # later calls of the bucket (M rounded up to a power of two) reuse it; another bucket or mode is measured
    for M in (100, 128, 65):
        assert measure_decide(call(M))[0] == "fastok"
    assert gpu.calls == 1
    measure_decide(call(129))
    measure_decide(call(100, training=False))
    assert gpu.calls == 3
    # the default setting follows what is recorded, and measures nothing
    assert _backend.decide("linear", DEV, call(100))[0] == "fastok"
    assert _backend.decide("linear", DEV, call(4096))[0] == "reference"  # no rule near it: linear's defaults can't run
    assert gpu.calls == 3


@pytest.mark.parametrize("times, expected", [
    ((0.96, 0.95, 0.97), "reference"),  # 1.04x: under the 1.05x a backend must beat eager by
    ((0.8, 0.7, 1.01), "reference"),  # 1.25x by the medians, but its p80 is above eager's median: within the spread
    ((0.8, 0.78, 0.82), "fastok"),
])
def test_the_spread_rule_is_the_policy_files_rule(gpu, times, expected):
    gpu.times = {"fastok": times}
    backend, why = measure_decide(call())
    assert backend == expected
    assert (_policy.faster(EAGER, times) is not None) == (expected == "fastok")
    if expected == "reference":
        assert why.startswith("eager: no backend measured faster, measured this process")
        assert "fastok correct, " in why  # its ratio is shown, never claimed


@pytest.mark.parametrize("family, c", [
    ("linear", registry.LinearCall(torch.float32, True, 37, 19, 23)),
    ("linear", registry.LinearCall(torch.float16, False, 5, 7, 3)),
    ("mlp", registry.MLPCall(torch.float32, True, 33, (20, 16, 8))),
    ("mlp", registry.MLPCall(torch.bfloat16, False, 9, (12, 5, 7, 3))),
    ("conv_relu_pool", registry.ConvCall(torch.float32, True, 2, 3, 9, 9, 4, 3, 1, 1, 2, 2, 0, False, "relu",
                                         (243, 81, 9, 1))),
    ("conv_relu_pool", registry.ConvCall(torch.float32, False, 3, 4, 8, 7, 5, 3, 2, 1, 3, 2, 1, True, "leaky_relu",
                                         (224, 1, 28, 4))),  # channels_last, padded ceil-mode pool
    ("lstm", registry.LSTMCall(torch.float32, True, 5, 3, 8, 8, False)),
    ("lstm", registry.LSTMCall(torch.float32, True, 4, 2, 8, 5, False)),  # proj_size 5
    ("lstm", registry.LSTMCall(torch.float32, False, 1, 3, 6, 6, True)),  # LSTMCell
])
def test_every_familys_trial_passes_the_gate_on_a_correct_backend(gpu, family, c):
    """The trials build each family's call from its descriptor, and a correct backend passes the check against the
    float64 reference in training (output and every input's gradient) and inference; the caller's random streams
    are left as they were."""
    gpu.times = {"fastok": (0.5, 0.49, 0.51)}
    state = torch.get_rng_state()
    d = _measure.measure(family, DEV, c)
    assert torch.equal(torch.get_rng_state(), state)
    assert dict(d.checked)["fastok"].startswith("correct"), d.checked
    assert d.backend == "fastok" and d.bucket == registry.FAMILIES[family].bucket_of(c)


def test_the_gate_rejects_a_wrong_gradient(gpu):
    """A backward 1% off in one input's gradient (the forward correct) is wrong."""
    def bwd(*args):
        dx, dw, db = reference_linear.linear_bwd(*args)
        return dx, dw * 1.01, db

    impl = types.SimpleNamespace(supports=lambda call, device: None, linear_fwd=reference_linear.linear_fwd,
                                 linear_bwd=bwd)
    registry.register_backend(registry.Backend("badgrad", implementations={"linear": impl}))
    try:
        d = _measure.measure("linear", DEV, call(dtype=torch.float32))
    finally:
        registry.unregister_backend("badgrad")
    assert dict(d.checked)["badgrad"].startswith("wrong: gradient of input 1 max error")
    inference = _measure.measure("linear", DEV, call(dtype=torch.float32, training=False))
    assert dict(inference.checked)["fastok"].startswith("correct")


# ----------------------------------------------------------------------------------------------- the user cache
def test_decisions_persist_per_card_and_a_version_change_invalidates_them(gpu, tmp_path):
    gpu.times = {"fastok": (0.5, 0.49, 0.51)}
    measure_decide(call())
    path = tmp_path / "cache" / "decisions" / _policy.file_name(*CARD)
    data = json.loads(path.read_text())
    assert data["env"]["device"] == CARD[0] and data["env"]["torch"] == torch.__version__
    assert data["env"]["driver"] == "580.65" and data["env"]["pydlx"] == pydlx.__version__
    assert [d["backend"] for d in data["decisions"]] == ["fastok"]
    # a new process (this one, forgetting what it measured) follows the cache and measures nothing
    _measure.forget()
    backend, why = measure_decide(call())
    assert backend == "fastok" and "user cache on NVIDIA H100" in why and gpu.calls == 1
    assert _backend.decide("linear", DEV, call())[0] == "fastok"  # the default setting follows it too
    # another torch (or driver, Triton, pydlx, kernel source): the file no longer speaks for this machine
    real = _measure.environment
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_measure, "environment", lambda device: dict(real(device), torch="9.9.9"))
        _measure.forget()
        assert _measure.user_cache(DEV).state == f"invalidated (torch {torch.__version__} -> 9.9.9): remeasured"
        assert _backend.decide("linear", DEV, call())[0] == "reference"  # nothing recorded: the defaults
        measure_decide(call())
        assert gpu.calls == 2
        assert json.loads(path.read_text())["env"]["torch"] == "9.9.9"


def test_two_processes_with_one_cache_make_the_same_choices(gpu, tmp_path):
    gpu.times = {"fastok": (0.5, 0.49, 0.51)}
    assert measure_decide(call())[0] == "fastok"
    code = f"""
import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
import torch, pydlx
from pydlx import _backend
from test_measure import fake_gpu_here, call, DEV
clock = fake_gpu_here({str(tmp_path / "cache")!r})
with pydlx.use_policy("measure"):
    print(_backend.decide("linear", DEV, call())[1], clock.calls)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(" 0")  # measured nothing
    assert out.stdout.startswith("fastok: 2.00x eager (1.92x-2.08x), user cache on NVIDIA H100 80GB HBM3")


def test_a_corrupt_cache_warns_once_and_decisions_are_kept_in_memory(gpu, tmp_path, monkeypatch):
    monkeypatch.setattr(_measure, "_WARNED", set())
    path = tmp_path / "cache" / "decisions" / _policy.file_name(*CARD)
    path.parent.mkdir(parents=True)
    path.write_text('{"version": 1, "env": ')
    gpu.times = {"fastok": (0.5, 0.49, 0.51)}
    with pytest.warns(RuntimeWarning, match="is corrupt .*kept in memory"):
        assert measure_decide(call())[0] == "fastok"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        assert measure_decide(call(1000))[0] == "fastok"
        assert measure_decide(call())[0] == "fastok"
    assert path.read_text() == '{"version": 1, "env": '  # left for the user to look at
    assert "corrupt" in _measure.status(DEV)


def test_an_unwritable_cache_warns_once_and_decisions_are_kept_in_memory(gpu, tmp_path, monkeypatch):
    monkeypatch.setattr(_measure, "_WARNED", set())
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("PYDLX_CACHE_DIR", str(blocker))
    _measure.forget()
    gpu.times = {"fastok": (0.5, 0.49, 0.51)}
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        assert measure_decide(call())[0] == "fastok"
    assert measure_decide(call())[0] == "fastok" and gpu.calls == 1
    assert "unwritable" in _measure.status(DEV)


def test_a_stale_lock_file_does_not_block_a_write(gpu, tmp_path):
    """The lock is flock(2) on a file: a file left by a process that died holds no lock."""
    lock = tmp_path / "cache" / "decisions" / (_policy.file_name(*CARD) + ".lock")
    lock.parent.mkdir(parents=True)
    lock.write_text("12345")
    gpu.times = {"fastok": (0.5, 0.49, 0.51)}
    measure_decide(call())
    assert json.loads(lock.with_suffix("").read_text())["decisions"][0]["backend"] == "fastok"


# ----------------------------------------------------------------------------------------------- when not to measure
def test_nothing_is_measured_under_capture_or_deterministic_algorithms(gpu, monkeypatch):
    monkeypatch.setattr(_measure, "_capturing", lambda device: True)
    plans = _backend.Plans()
    backend, why = measure_decide(call())
    assert (backend, why) == ("reference", "eager: not measured (a CUDA graph is being captured: recorded decisions "
                                           "only)")
    plans.keep("signature", backend)  # (an entry point keeps its plan after deciding)
    assert plans.get("signature") is None  # nor is a plan built on that decision kept
    monkeypatch.setattr(_measure, "_capturing", lambda device: False)
    gpu.times = {"fastok": (0.5, 0.49, 0.51)}
    assert measure_decide(call())[0] == "fastok"  # the capture's eager was not kept
    assert gpu.calls == 1
    torch.use_deterministic_algorithms(True)
    try:
        assert measure_decide(call())[0] == "fastok"  # recorded: followed
        backend, why = measure_decide(call(5000))
        assert backend == "reference" and "use_deterministic_algorithms" in why
    finally:
        torch.use_deterministic_algorithms(False)
    assert gpu.calls == 1
    assert measure_decide(call(5000))[0] == "fastok"
    assert gpu.calls == 2


def test_nothing_is_measured_while_torch_compile_traces(gpu):
    """A compiled region takes its decision once, as a constant, from what is recorded (else eager under "measure");
    it guards on the policy setting."""
    gpu.times = {"fastok": (0.5, 0.49, 0.51)}

    def f(x):
        backend, _ = _backend.decide("linear", DEV, call())
        return x + (1 if backend == "fastok" else 2)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    with pydlx.use_policy("measure"):
        assert compiled(torch.zeros(2)).tolist() == [2, 2]
    assert gpu.calls == 0
    measure_decide(call())  # measured eagerly
    torch._dynamo.reset()
    with pydlx.use_policy("measure"):
        assert compiled(torch.zeros(2)).tolist() == [1, 1]
    with pydlx.use_policy("off"):  # another setting: the compiled code's guard sees it
        assert compiled(torch.zeros(2)).tolist() == [2, 2]
    assert gpu.calls == 1


def test_nothing_is_measured_under_a_dispatch_mode(gpu):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):
        backend, why = measure_decide(call())
    assert backend == "reference" and "traced or transformed" in why and gpu.calls == 0


def test_the_time_budget(gpu, monkeypatch):
    gpu.times = {"fastok": (0.5, 0.49, 0.51)}
    monkeypatch.setattr(_measure.BUDGET, "per_shape_s", 0.0)
    d = _measure.measure("linear", DEV, call())
    assert d.backend == "reference" and gpu.calls == 0
    assert dict(d.checked)["fastok"] == "not measured: the per-shape budget (0 s) ran out"
    monkeypatch.setattr(_measure.BUDGET, "per_shape_s", 60.0)
    assert measure_decide(call())[0] == "fastok"
    assert _measure.BUDGET.measured == 2 and _measure.BUDGET.spent_s > 0
    monkeypatch.setattr(_measure.BUDGET, "total_s", _measure.BUDGET.spent_s)
    backend, why = measure_decide(call(9999))
    assert backend == "reference" and why.startswith("eager: not measured (the measuring budget is spent (")
    assert gpu.calls == 1
    assert measure_decide(call(9999))[0] == "reference" and gpu.calls == 1  # (kept: no lookup per call)
    assert pydlx.tune.budget(total_s=1e6).total_s == 1e6  # a new budget: calls decided without one decide again
    assert measure_decide(call(9999))[0] == "fastok"
    assert gpu.calls == 2


def test_the_budget_from_the_environment(monkeypatch):
    monkeypatch.setattr(_measure, "_WARNED", set())
    monkeypatch.setenv("PYDLX_MEASURE_BUDGET", "30,2.5")
    assert (_measure.budget_from_env().total_s, _measure.budget_from_env().per_shape_s) == (30.0, 2.5)
    monkeypatch.setenv("PYDLX_MEASURE_BUDGET", "600")
    assert _measure.budget_from_env().total_s == 600.0
    monkeypatch.setenv("PYDLX_MEASURE_BUDGET", "a lot")
    with pytest.warns(RuntimeWarning, match="PYDLX_MEASURE_BUDGET='a lot' is not"):
        assert _measure.budget_from_env() == _measure.Budget()


def test_threads_measure_a_bucket_once(gpu):
    gpu.times, gpu.delay = {"fastok": (0.5, 0.49, 0.51)}, 0.2
    got, errors = [], []

    def run():
        try:
            got.append(measure_decide(call())[0])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == ["fastok"] * 6 and gpu.calls == 1


# ----------------------------------------------------------------------------------------------- what users see
def test_backends_and_explain_name_each_decisions_source(gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu.times = {"fastok": (0.5, 0.49, 0.51)}
    model = nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 3)).bfloat16()
    with pydlx.use_policy("measure"):
        assert pydlx.backends()["policy"].startswith("measure: each new shape measured on first use on NVIDIA H100")
        assert "measured on first use of each shape (none recorded yet)" in pydlx.explain(model)
        measure_decide(registry.MLPCall(torch.bfloat16, True, 100, (48, 32, 3)), "mlp")
        assert "1 measured in this process (" in pydlx.backends()["decisions"]
    text = pydlx.explain(model)
    assert "measured: fastok at 128:48-32-3 training (2.00x eager, 1.92x-2.08x) [measured this process]" in text
    _measure.forget()
    assert "[user cache]" in pydlx.explain(model)
    assert "1 decisions" in pydlx.backends()["decisions"]
    rows = pydlx.tune.format_table(pydlx.tune.decisions(DEV))
    assert "fastok" in rows and "2.00x (1.92-2.08)" in rows and "user cache" in rows


class Probe(nn.Module):
    """Records the policy setting in force when it runs (module level: a model holding it pickles)."""
    seen: list = []

    def forward(self, x):
        Probe.seen.append(_policy.setting())
        if x.shape[0] == 3:
            raise ValueError("a forward that fails")
        return x


def test_optimize_holds_its_policy_for_the_models_forward(gpu):
    seen = Probe.seen
    model = pydlx.optimize(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Probe()), policy="measure")
    seen.clear()  # (optimize traced the forward)
    model(torch.randn(2, 4))
    with pytest.raises(ValueError):
        model(torch.randn(3, 4))
    assert _policy.setting() == "default"  # left as it was, also after the failing forward
    with pydlx.use_policy("off"):
        model(torch.randn(2, 4))
    assert seen == ["measure"] * 3
    # a copy and a pickled model hold it too; restoring one leaves the other's hooks alone
    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pydlx.restore(model)
    model(torch.randn(2, 4))
    assert seen[-1] == "default" and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    twin(torch.randn(2, 4))
    loaded(torch.randn(2, 4))
    assert seen[-2:] == ["measure", "measure"]
    with pytest.raises(FileNotFoundError):
        pydlx.optimize(nn.Linear(2, 2), policy="no/such/policy.json")


def test_tune_calls_record_and_the_command_needs_a_gpu(gpu):
    gpu.times = {"fastok": (0.5, 0.49, 0.51)}
    got = pydlx.tune.tune_calls([("linear", call()), ("mlp", registry.MLPCall(torch.bfloat16, True, 8, (6, 5, 4)))],
                                DEV)
    assert [d.backend for d in got] == ["fastok", "fastok"]
    assert {d.key for d in pydlx.tune.decisions(DEV)} == {d.key for d in got}
    assert [fc[0] for fc in pydlx.tune.grid(["linear"], [torch.bfloat16])][:1] == ["linear"]
    out = subprocess.run([sys.executable, "-m", "pydlx.tune", "--minutes", "1"], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 2 and "no CUDA device here" in out.stderr


def test_tune_model_measures_the_shapes_a_model_calls(gpu):
    """tune_model runs a copy of the model (forward and backward) under "measure" and returns the decisions for the
    calls it made: here a module that asks the dispatcher as pydlx's entry points do (the fake card's tensors are
    CPU tensors, which the entry points would run eagerly without asking)."""
    gpu.times = {"fastok": (0.5, 0.49, 0.51)}

    class Asks(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            _backend.decide("linear", DEV, call(x.shape[0], training=self.training))
            return x @ self.w

    model = Asks()
    said = []
    _measure.HOOKS["progress"] = said.append  # (python -m pydlx.tune prints each decision as it lands)
    try:
        got = pydlx.tune.tune_model(model, torch.randn(100, 4), seconds=30)
    finally:
        _measure.HOOKS.pop("progress")
    assert [(d.backend, d.mode, d.bucket) for d in got] == [("fastok", "training", "128x32x48")] and said == got
    assert model.w.grad is None  # (a copy ran)
    got = pydlx.tune.tune_model(model, torch.randn(100, 4), training=False)
    assert [(d.backend, d.mode) for d in got] == [("fastok", "inference")]
    again = pydlx.tune.tune_model(model, torch.randn(90, 4))  # the same bucket: recorded, not measured again
    assert [d.key for d in again] == [got[0].key[:2] + ("training",) + got[0].key[3:]] and gpu.calls == 2
    assert _policy.setting() == "default"


# ----------------------------------------------------------------------------------------------- ranks
def _rank(rank: int, port: int, out, cache_root: str) -> None:
    """A rank that measured on its own before the job (rank 0: fastok faster; rank 1: eager), each with its own
    cache: without share() neither follows its cache; after it, both follow rank 0's."""
    import torch.distributed as dist

    from test_distributed import _run_rank

    clock = fake_gpu_here(os.path.join(cache_root, f"rank{rank}"))
    clock.times = {"fastok": (0.5, 0.49, 0.51) if rank == 0 else (2.0, 1.9, 2.1)}
    mine = measure_decide(call())[0]

    def body():
        _backend.clear_caches()
        before = (_backend.decide("linear", DEV, call())[0], measure_decide(call(5000)))
        calls = clock.calls
        installed = pydlx.tune.share(device=DEV)
        after = measure_decide(call())
        got = [None, None]
        dist.all_gather_object(got, (mine, before, calls, clock.calls, installed, after))
        return got

    _run_rank(rank, port, out, "gloo", body)


def test_ranks_agree_on_rank_0s_decisions(tmp_path):
    from test_distributed import _spawn

    results = _spawn(functools.partial(_rank_entry, cache_root=str(tmp_path)), 300)
    (mine0, before0, calls0, after_calls0, n0, after0), (mine1, before1, calls1, after_calls1, n1, after1) = results
    assert (mine0, mine1) == ("fastok", "reference")  # they measured differently on their own
    # in the job, before agreeing: neither follows its own cache, nothing is timed
    assert before0[0] == before1[0] == "reference"
    assert before0[1] == before1[1] == ("reference", "eager: not measured (a distributed job: ranks time nothing and "
                                                     "follow the decisions pydlx.tune.share() gave them all (measure "
                                                     "before the job with python -m pydlx.tune))")
    assert (calls0, calls1) == (after_calls0, after_calls1) == (1, 1)
    assert n0 == n1 == 1
    assert after0 == after1
    assert after0[0] == "fastok" and "shared by rank 0" in after0[1]


def _rank_entry(rank, port, out, cache_root):
    _rank(rank, port, out, cache_root)


# ----------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu  # (tests/conftest.py skips it where there is no CUDA device, as every GPU test)
def test_gpu_measure_on_first_use_and_tune_a_seed_model(tmp_path, monkeypatch):
    """On the GPU: the seed CNN and autoencoder measured on first use (real trials, CUDA-event timings), each
    decision's verdicts printed; a backend found wrong on this card fails the test (a kernel bug to fix)."""
    from pydlx.bench import seed_models as S

    monkeypatch.setenv("PYDLX_CACHE_DIR", str(tmp_path))
    _measure.forget()
    found = []
    for kind, shape in (("cnn", (64, 3, 24, 24)), ("autoencoder", (256, 784)), ("rnn", (64, 28, 28))):
        model = pydlx.optimize(S.make_model(kind)).cuda().bfloat16()
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        found += pydlx.tune.tune_model(model, x, seconds=120)
    print()
    print(pydlx.tune.format_table(found))
    assert {d.family for d in found} >= {"conv_relu_pool", "linear", "lstm"}
    wrong = [(d.family, d.bucket, b, v) for d in found for b, v in d.checked
             if v.startswith("wrong") or (v.startswith("failed") and "BackendUnavailableError" not in v)]
    assert not wrong, wrong  # a kernel wrong on this card, or one that crashed: a bug to fix
    with pydlx.use_policy("measure"):
        model = pydlx.optimize(S.make_model("autoencoder")).cuda().bfloat16()
        y = model(torch.randn(256, 784, device="cuda", dtype=torch.bfloat16))
    assert torch.isfinite(y).all()
    assert "measured" in pydlx.explain(model)
