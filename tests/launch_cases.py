"""How pydlx launches its compiled Triton kernels, checked without a GPU: Triton compiles each kernel for sm_90 and
a driver that stands in for the GPU's records every launch instead of running it (pydlx.triton.common
``launches_recorded``), so Triton's whole launch path runs -- ``JITFunction.run`` (binding, specialisation, the
kernel cache) and the launch call -- and pydlx's ``Tuned``, whose repeated launches skip that run
(``Tuned._direct``). Each case checks that such a launch is the one Triton's own run makes for the same
arguments, and that every change that makes Triton compile or call anything else takes Triton's run.

    python tests/launch_cases.py           # a line per case (exit 1 if one failed)
    python tests/launch_cases.py --json    # what tests/test_triton_launch.py reads

Runs with TRITON_INTERPRET=0 (kernels compiled, not interpreted) and PYDLX_TRITON_AUTOTUNE=0 (a first launch is
not timed), so the test suite calls it in a subprocess. About a minute on 2 cores (each kernel compiled once;
Triton's cache keeps them for the next run).
"""
import contextlib
import json
import os
import sys
import traceback

if __name__ == "__main__":  # before triton is imported; a test that imports this module keeps its own
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["PYDLX_TRITON_AUTOTUNE"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import pydlx  # noqa: E402
from pydlx import registry  # noqa: E402

FAMILIES = tuple(registry.FAMILIES)  # (each a pydlx.triton.<family> module; a family without a step here fails)
CASES = {}  # name -> function; raises (AssertionError) on a failure


def case(fn):
    CASES[fn.__name__] = fn
    return fn


# ----------------------------------------------------------------------------------------------- the harness
class Launches:
    """The recorded launches, and each ``Tuned`` call taken apart: whether Triton's run was called, and what the
    same call launches through Triton's run alone (PYDLX_TRITON_DIRECT=0)."""

    def __init__(self, common, recorder):
        self.common, self.recorder, self.jit_runs, self.calls = common, recorder, 0, []

    @property
    def all(self) -> list:
        return self.recorder.launches

    @contextlib.contextmanager
    def compared(self):
        """Within the block each launcher call is made twice: as pydlx makes it, then with the direct launch off;
        ``self.calls`` gets (Triton runs in pydlx's call, its launches, Triton's own launches) per call."""
        common, self.calls = self.common, []
        tuned_call = common.Tuned.__call__

        def both(tuned, grid, args, kwargs):
            start, runs = len(self.all), self.jit_runs
            tuned_call(tuned, grid, args, kwargs)
            mine, mine_runs = self.all[start:], self.jit_runs - runs
            with common.through_tritons_run():
                tuned_call(tuned, grid, args, kwargs)
            self.calls.append((tuned.__name__, mine_runs, mine, self.all[start + len(mine):]))
        common.Tuned.__call__ = both
        try:
            yield self.calls
        finally:
            common.Tuned.__call__ = tuned_call


@contextlib.contextmanager
def recorded():
    """Triton's launches recorded (sm_90), every pydlx Triton launcher's kernel runs counted, the Triton backend
    taking CPU tensors (nothing runs them)."""
    import importlib
    common = importlib.import_module("pydlx.triton.common")
    modules = [importlib.import_module(f"pydlx.triton.{f}") for f in FAMILIES]
    backend = registry.BACKENDS["triton"]
    saved_why = vars(backend).get("why_not_on")
    with common.launches_recorded(modules) as recorder:
        launches = Launches(common, recorder)
        wrapped = []
        for tuned in common._tuned(modules):
            run = tuned.kernel.run

            def counted(*a, _run=run, **k):
                launches.jit_runs += 1
                return _run(*a, **k)
            tuned.kernel.run = counted
            wrapped.append(tuned.kernel)
        backend.why_not_on = lambda device: None
        try:
            with pydlx.use_backend("triton"):
                yield launches
        finally:
            for k in wrapped:
                del k.run
            if saved_why is None:
                del backend.why_not_on
            else:
                backend.why_not_on = saved_why


def same_launch(a, b) -> bool:
    """Two recorded launches are the same: kernel, grid, stream, function handle (the compiled kernel), packed
    metadata, and every argument (the same tensor objects, equal values otherwise)."""
    name, grid, stream, function, packed, args = a
    name2, grid2, stream2, function2, packed2, args2 = b
    return (name, grid, stream, packed) == (name2, grid2, stream2, packed2) and function is function2 and \
        len(args) == len(args2) and all(x is y if isinstance(x, torch.Tensor) else (type(x) is type(y) and x == y)
                                        for x, y in zip(args, args2))


def assert_direct_and_same(calls, what: str, direct: bool = True) -> None:
    """Every launcher call launched once, as Triton's own run launches it; ``direct``: without calling that run."""
    assert calls, f"{what}: no Triton launch"
    for name, runs, mine, triton_own in calls:
        assert len(mine) == 1 and len(triton_own) == 1, (what, name, len(mine), len(triton_own))
        assert same_launch(mine[0], triton_own[0]), (what, name, mine[0][:5], triton_own[0][:5])
        assert runs == (0 if direct else 1), f"{what}: {name} called Triton's run {runs} times"


# ----------------------------------------------------------------------------------------------- each family's step
def _linear_step():
    x = torch.randn(8, 24, requires_grad=True)
    lin = nn.Linear(24, 40)

    def step():
        pydlx.ops.linear(x, lin.weight, lin.bias, "relu").sum().backward()
    return step


def _mlp_step():
    x = torch.randn(8, 24, requires_grad=True)
    layers = [nn.Linear(24, 32), nn.Linear(32, 16)]

    def step():
        pydlx.ops.mlp(x, [m.weight for m in layers], [m.bias for m in layers], "relu").sum().backward()
    return step


def _conv_step():
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    conv = nn.Conv2d(3, 8, 3, padding=1)

    def step():
        pydlx.ops.conv_relu_pool2d(x, conv.weight, conv.bias, padding=1).sum().backward()
    return step


def _lstm_step():
    x = torch.randn(5, 2, 8, requires_grad=True)
    m = nn.LSTM(8, 16)

    def step():
        y, _ = pydlx.ops.lstm(x, m._flat_weights)
        y.sum().backward()
    return step


STEPS = {"linear": _linear_step, "mlp": _mlp_step, "conv_relu_pool": _conv_step, "lstm": _lstm_step}


def _family_case(family):
    def check():
        with recorded() as launches:
            step = STEPS[family]()
            step()  # (the first step: compiled, and each launch's kernel kept)
            with launches.compared() as calls:
                step()
            assert_direct_and_same(calls, f"{family}: a repeated training step")
    check.__name__ = f"{family}_step_launches_what_triton_launches_without_its_run"
    return case(check)


for _family in FAMILIES:
    _family_case(_family)


# ----------------------------------------------------------------------------------------------- what changes it
def _forward(x, lin):
    pydlx.ops.linear(x, lin.weight, lin.bias, "relu")


def _kernel(call):
    """The compiled kernel (its function handle) a compared call's own launch ran."""
    return call[2][0][3]


def _first_kernel(launches, x, lin):
    """The kernel a first Linear forward on ``x`` launches (through Triton's run)."""
    with launches.compared() as calls:
        _forward(x, lin)
    return _kernel(calls[0])


def assert_new_kernel(launches, x, lin, first, what: str) -> None:
    """A Linear forward that Triton specialises or compiles differently from the one that launched ``first``: through
    Triton's run, to a kernel of its own; then launched directly."""
    with launches.compared() as calls:
        _forward(x, lin)
    assert_direct_and_same(calls, what, direct=False)
    assert _kernel(calls[0]) is not first, f"{what}: launched the first kernel"
    with launches.compared() as calls:
        _forward(x, lin)
    assert_direct_and_same(calls, f"{what}, again")


def assert_back_to(launches, x, lin, first, what: str) -> None:
    """Back to what launched ``first``: a launcher keeps the last kernel per device, so Triton's run finds ``first``
    again (in its cache) once, and then it is launched directly."""
    with launches.compared() as calls:
        _forward(x, lin)
        _forward(x, lin)
    assert_direct_and_same(calls[:1], what, direct=False)
    assert_direct_and_same(calls[1:], f"{what}, again")
    assert _kernel(calls[0]) is first and _kernel(calls[1]) is first


@case
def a_new_specialisation_goes_through_tritons_run():
    """Arguments Triton specialises differently -- a pointer off 16-byte alignment, a stride not divisible by 16 --
    under the same kept config: Triton's run compiles and launches its own kernel for them, which is then launched
    directly. A launcher keeps the last kernel per device: back to the first arguments, Triton's run finds the
    first kernel again (in its cache) once, then that one is launched directly."""
    with recorded() as launches:
        lin = nn.Linear(32, 48)
        buf = torch.randn(8 * 32 + 1)
        aligned, shifted = buf[:256].view(8, 32), buf[1:].view(8, 32)  # (the second 4 bytes off alignment)
        strided = torch.randn(8, 33)[:, :32]  # (row stride 33)
        first = _first_kernel(launches, aligned, lin)
        for x, what in ((shifted, "a misaligned input"), (strided, "a row stride of 33")):
            assert_new_kernel(launches, x, lin, first, what)
        assert_back_to(launches, aligned, lin, first, "aligned after the others")


@case
def launch_hooks_get_tritons_run():
    """A launch hook (a profiler's): every launch goes through Triton's run, and the hook sees each; removed, the
    launches are direct again."""
    from triton import knobs
    seen = []
    with recorded() as launches:
        x, lin = torch.randn(8, 32), nn.Linear(32, 48)
        _forward(x, lin)
        knobs.runtime.launch_enter_hook.add(seen.append)
        try:
            with launches.compared() as calls:
                _forward(x, lin)
        finally:
            knobs.runtime.launch_enter_hook.remove(seen.append)
        assert len(seen) == 2 and all(m is not None for m in seen), seen  # (pydlx's call and the comparison's)
        assert [runs for _, runs, _, _ in calls] == [1], calls
        with launches.compared() as calls:
            _forward(x, lin)
        assert_direct_and_same(calls, "the hook removed")
        assert len(seen) == 2


@case
def triton_debug_mode_recompiles_through_its_run():
    """TRITON_DEBUG's knob switched on after a kernel was kept: the options differ, so Triton's run compiles the
    debug kernel, which is then launched directly; switched off, Triton's run finds the first kernel again, which
    is then launched directly."""
    from triton import knobs
    with recorded() as launches:
        x, lin = torch.randn(8, 32), nn.Linear(32, 48)
        first = _first_kernel(launches, x, lin)
        old = knobs.runtime.debug
        knobs.runtime.debug = True
        try:
            assert_new_kernel(launches, x, lin, first, "debug on")
        finally:
            knobs.runtime.debug = old
        assert_back_to(launches, x, lin, first, "debug off")


@case
def a_replaced_global_is_checked_by_tritons_run():
    """A global the kernel read and Triton checks on every run (INTERPRETING, the interpreter switch) replaced by
    an equal object: Triton's run checks it and launches; by another value: Triton's run raises its RuntimeError,
    as it would without pydlx."""
    import triton.language as tl
    with recorded() as launches:
        common = launches.common
        x, lin = torch.randn(8, 32), nn.Linear(32, 48)
        _forward(x, lin)
        import pydlx.triton.linear as tri
        checked = {name for name, _ in tri._linear_fwd.kernel.used_global_vals}
        assert "INTERPRETING" in checked, checked
        old = common.INTERPRETING
        try:
            common.INTERPRETING = tl.constexpr(old.value)
            with launches.compared() as calls:
                _forward(x, lin)
            assert [runs for _, runs, _, _ in calls] == [1], [runs for _, runs, _, _ in calls]
            with launches.compared() as calls:
                _forward(x, lin)
            assert_direct_and_same(calls, "the equal global, again")
            common.INTERPRETING = tl.constexpr(not old.value)
            try:
                _forward(x, lin)
            except RuntimeError as e:
                assert "has changed since we compiled" in str(e), e
            else:
                raise AssertionError("a changed global launched without Triton's check")
        finally:
            common.INTERPRETING = old


@case
def each_device_and_stream_is_tritons_current_one():
    """The launch goes to the stream Triton sees as current (a side stream, a CUDA graph's capture stream), and a
    kernel kept on one device is not launched on another: there Triton's run loads its own."""
    with recorded() as launches:
        x, lin = torch.randn(8, 32), nn.Linear(32, 48)
        _forward(x, lin)
        launches.recorder.stream = 7
        with launches.compared() as calls:
            _forward(x, lin)
        assert_direct_and_same(calls, "a side stream")
        assert calls[0][2][0][2] == 7
        launches.recorder.device = 1
        with launches.compared() as calls:
            _forward(x, lin)
        assert_direct_and_same(calls, "another device", direct=False)
        with launches.compared() as calls:
            _forward(x, lin)
        assert_direct_and_same(calls, "another device, again")


@case
def pydlx_triton_direct_0_launches_through_tritons_run():
    """With the direct launch off (PYDLX_TRITON_DIRECT=0), every launch goes through Triton's run."""
    with recorded() as launches:
        x, lin = torch.randn(8, 32), nn.Linear(32, 48)
        _forward(x, lin)
        runs = launches.jit_runs
        with launches.common.through_tritons_run():
            _forward(x, lin)
            _forward(x, lin)
        assert launches.jit_runs == runs + 2, launches.jit_runs - runs


# Python calls (pydlx's, Triton's and the stand-in driver's) of one repeated Linear forward launch, launched
# directly; through Triton's run it makes ~100 on Triton 3.8, ~30 on 3.6 (its binding, cache key, checks of the
# globals the kernel read -- 3.8 checks every constexpr one -- launch metadata)
DIRECT_LAUNCH_CALLS = 14


@case
def a_repeated_launch_makes_few_python_calls():
    """A repeated launch's Python calls, counted: within DIRECT_LAUNCH_CALLS directly, at least 10 more through
    Triton's run (so the count sees a direct launch that stops being taken)."""
    from collections import Counter
    with recorded() as launches:
        common = launches.common
        x, lin = torch.randn(8, 32), nn.Linear(32, 48)
        _forward(x, lin)
        got = []
        tuned_call = common.Tuned.__call__
        common.Tuned.__call__ = lambda tuned, grid, args, kwargs: got.append((tuned, grid, args, kwargs))
        try:
            _forward(x, lin)
        finally:
            common.Tuned.__call__ = tuned_call
        (tuned, grid, args, kwargs), = got
        counts = {}
        for direct in (True, False):
            calls = Counter()

            def count(frame, event, arg):
                if event == "call":
                    calls[f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}"] += 1
            with contextlib.nullcontext() if direct else common.through_tritons_run():
                sys.setprofile(count)
                try:
                    tuned(grid, args, kwargs)
                finally:
                    sys.setprofile(None)
            counts[direct] = calls
        n, through = sum(counts[True].values()), sum(counts[False].values())
        assert n <= DIRECT_LAUNCH_CALLS, f"{n} Python calls a direct launch (budget {DIRECT_LAUNCH_CALLS}): " \
            f"{sorted(counts[True].items())}"
        assert through >= n + 10, (n, through, sorted(counts[False].items()))


def run(name: str) -> str:
    """"ok", or what failed."""
    try:
        CASES[name]()
        return "ok"
    except Exception:
        return traceback.format_exc(limit=6)


def main():
    names = [n for n in CASES if "--only" not in sys.argv or n.startswith(sys.argv[sys.argv.index("--only") + 1])]
    results = {n: run(n) for n in names}
    if "--json" in sys.argv:
        print(json.dumps(results))
        return
    for n, r in results.items():
        print(f"{n:70s} {r if r == 'ok' else 'FAILED'}")
        if r != "ok":
            print(r)
    sys.exit(0 if all(r == "ok" for r in results.values()) else 1)


if __name__ == "__main__":
    main()
