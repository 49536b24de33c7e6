"""Test set-up. On a machine without CUDA the Triton kernels run under Triton's interpreter
(TRITON_INTERPRET=1 must be set before triton is imported, hence here, first). On a GPU machine the same tests
run the compiled kernels; run the interpreter pass there with TRITON_INTERPRET=1 set explicitly."""
import os
import tempfile

import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
# decisions measured by the tests (pydlx/_measure.py) go to a folder of their own, never the user's cache
os.environ["PYDLX_CACHE_DIR"] = tempfile.mkdtemp(prefix="pydlx-test-cache-")

import pytest  # noqa: E402

import pydlx  # noqa: E402  (after TRITON_INTERPRET is set)


def pytest_addoption(parser):
    parser.addoption("--fast", action="store_true",
                     help="the fast tier (bash scripts/test.sh --fast): every test function once, with its first "
                          "parameter set, and none marked slow (the extension build, the AOT compile of every "
                          "config, the GPU check's dry run, the zoo)")
    parser.addoption("--auto-as-gpu", choices=AUTO_AS_GPU, default=None,
                     help="run every test with `auto` deciding as on a GPU, on the CPU tensors: 'unmeasured' (each "
                          "family's unmeasured default: the Triton kernels for Linear and the MLP through the "
                          "interpreter, the reference inside the op for the conv block) or 'kernels' (a GPU whose "
                          "measurements chose the Triton kernel wherever it runs)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "interpreter: runs Triton kernels under TRITON_INTERPRET=1 on CPU")
    config.addinivalue_line("markers", "slow: left out of the fast tier (--fast); the full suite runs it")


def _fast_tier(config, items):
    """Keep each test function's first parameter set that will run here (not skipped for want of a GPU or of the
    interpreter), and no test marked slow."""
    keep, drop, seen = [], [], set()
    for item in items:
        function = item.nodeid.split("[")[0]
        skipped = any(m.name == "skip" or (m.name == "skipif" and m.args and m.args[0] is True)
                      for m in item.iter_markers())
        if "slow" in item.keywords or function in seen or skipped:
            drop.append(item)
        else:
            seen.add(function)
            keep.append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    no_interp = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (run the interpreter pass separately)")
    for item in items:
        if "gpu" in item.keywords:
            # which backend a GPU test verifies goes into the junit report (pydlx/_policy.py passed_backends: only
            # an implementation whose GPU tests passed may enter a measured policy)
            params = getattr(getattr(item, "callspec", None), "params", {})
            kernels = pydlx.registry.candidates()
            backend = params.get("backend") or next((b for b in kernels if b in item.name.split("[")[0]
                                                     or f"-{b}" in item.name or f"[{b}" in item.name), None)
            if backend in kernels:
                item.user_properties.append(("pydlx_backend", backend))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "interpreter" in item.keywords and not interp:
            item.add_marker(no_interp)
    if config.getoption("--fast"):
        _fast_tier(config, items)


@pytest.fixture
def poison():
    """Every torch.empty/new_empty/empty_like inside the test is filled with NaN, so an output element a kernel
    forgets to write shows up as NaN instead of whatever the allocator had there."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different seed per test (fresh random inputs), printed on failure so a failure can be replayed."""
    seed = int(os.environ.get("PYDLX_TEST_SEED", "0")) or (hash(request.node.nodeid) & 0xFFFF) + int.from_bytes(
        os.urandom(2), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"\n[pydlx] replay with PYDLX_TEST_SEED={seed}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep


AUTO_AS_GPU = ("unmeasured", "kernels")


@pytest.fixture
def auto_as_gpu(monkeypatch):
    """``auto_as_gpu(mode)``: from then on in the test, ``auto`` decides for CPU tensors as it does on a GPU (see
    --auto-as-gpu for the modes): the CPU shortcut (plain eager) is skipped and each decision is the family's
    unmeasured default, or Triton wherever it runs. What is not ``auto`` (a forced backend, a torch.func transform)
    decides as before."""
    from pydlx import _backend, _policy, registry

    def simulate(mode: str) -> None:
        assert mode in AUTO_AS_GPU, mode
        decide = _backend._decide

        def as_on_a_gpu(name, family, device, call, op):
            if name != "auto":
                return decide(name, family, device, call, op)
            if mode == "kernels" and registry.why_not("triton", family, device, call) is None:
                return "triton", "triton: measured faster", True
            return _backend._defaults(family, device, call, _policy.setting(), None)
        monkeypatch.setattr(_backend, "cpu_auto", lambda t: False)
        monkeypatch.setattr(_backend, "_decide", as_on_a_gpu)
        _backend.clear_caches()
    return simulate


@pytest.fixture(autouse=True)
def _auto_as_gpu_everywhere(request):
    mode = request.config.getoption("--auto-as-gpu")
    if mode is not None:
        request.getfixturevalue("auto_as_gpu")(mode)
    yield


@pytest.fixture(autouse=True)
def _fresh_decisions():
    """The dispatcher keeps one decision per call signature; tests that fake a GPU or a broken backend change what
    a decision depends on behind its back, so each test starts without kept decisions."""
    pydlx._backend.clear_caches()
    m = pydlx._measure
    if m._PROCESS or m._SHARED[0] is not None or m.BUDGET.measured or any(c.decisions for c in m._CACHES.values()):
        m.forget(cache=True)  # (and no test follows another's measured decisions)
    yield
