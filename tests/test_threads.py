"""``use_backend`` and ``use_policy`` are per thread; a backward runs on its forward's backend whatever thread
autograd runs it on."""
from __future__ import annotations

import threading

import torch

import pydlx
from pydlx import _backend, _policy, registry


def _linear_backend(y: torch.Tensor) -> str:
    """Which path made ``y``: pydlx's op (a forced backend) or plain eager PyTorch (``auto`` on a CPU)."""
    return "op" if "pydlx" in y.grad_fn.name() else "eager"


def _auto_path(request) -> str:
    """The path ``auto`` takes for a CPU tensor: plain eager, or the op where the run makes it decide as on a GPU
    (pytest --auto-as-gpu)."""
    return "eager" if request.config.getoption("--auto-as-gpu") is None else "op"


def test_two_threads_two_backends(request):
    """While one thread is inside ``use_backend("reference")`` another one's calls stay on ``auto``, and each sees
    its own backend and policy."""
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    inside, done = threading.Barrier(2), threading.Barrier(2)
    seen = {}

    def forced():
        with pydlx.use_backend("reference"), pydlx.use_policy("off"):
            inside.wait()  # the other thread calls while this one is inside the block
            seen["forced"] = (pydlx.current_backend(), _policy.in_force()[0],
                              _linear_backend(pydlx.ops.linear(x, w, None, "relu")))
            done.wait()

    def plain():
        inside.wait()
        seen["plain"] = (pydlx.current_backend(), _policy.in_force()[0],
                         _linear_backend(pydlx.ops.linear(x, w, None, "relu")))
        done.wait()

    threads = [threading.Thread(target=forced), threading.Thread(target=plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert seen == {"forced": ("reference", "off", "op"), "plain": ("auto", None, _auto_path(request))}, seen
    assert pydlx.current_backend() == "auto"


def test_backward_on_another_thread_runs_on_the_forward_backend(monkeypatch):
    """The forward under a forced backend in one thread; its backward run from a thread that forced nothing (as
    autograd's CUDA worker threads do): the backward implementation called is the forward's backend's."""
    calls = []
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    with pydlx.use_backend("reference"):
        y = pydlx.ops.linear(x, w, None, "relu")
    for name in registry.backend_names():  # each backend's Linear backward that is loaded, counted by its name
        impl = registry.found("linear").get(name)
        if impl is not None:
            monkeypatch.setattr(impl, "linear_bwd", (lambda real, name: lambda *a: calls.append(
                ("linear", name)) or real(*a))(impl.linear_bwd, name))
    t = threading.Thread(target=lambda: y.sum().backward())
    t.start()
    t.join(timeout=60)
    assert calls == [("linear", "reference")], calls
    torch.testing.assert_close(w.grad, (torch.relu(x @ w.t()) > 0).float().t() @ x)



def test_two_asyncio_tasks_two_backends(request):
    """Two tasks of one event loop, interleaving inside their blocks: each sees its own backend and policy (the
    other task's block is still open at each of its calls), and the loop's own code outside both sees neither."""
    import asyncio

    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    seen = {}

    async def task(name, backend, policy):
        with pydlx.use_backend(backend), pydlx.use_policy(policy):
            for step in range(3):
                await asyncio.sleep(0)  # the other task runs, inside its own block
                seen[(name, step)] = (pydlx.current_backend(), _policy.in_force()[0],
                                      _linear_backend(pydlx.ops.linear(x, w, None, "relu")))

    async def main():
        await asyncio.gather(task("forced", "reference", "off"), task("auto", "auto", None))
        return pydlx.current_backend(), _policy.in_force()[0]

    outside = asyncio.run(main())
    for step in range(3):
        assert seen[("forced", step)] == ("reference", "off", "op")
        assert seen[("auto", step)] == ("auto", "off", _auto_path(request))  # (use_policy(None): "off" as well)
    assert outside == (pydlx.current_backend(), None) and outside[0] == "auto"
    # the per-thread mirror (what torch.compile reads where Dynamo cannot read a context variable) is left clean
    assert getattr(_backend._BACKENDS.mirror, "stack", ()) == () == getattr(_policy._POLICIES.mirror, "stack", ())


def test_compiled_code_reads_and_guards_the_backend_in_force():
    """torch.compile reads the backend in force (the context variable, or its per-thread mirror where Dynamo cannot
    read one) with no graph break, and a change of it between calls makes a new graph, not a stale answer."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="eager")
    def which(x):
        return x + (1 if pydlx.current_backend() == "reference" else 2)

    x = torch.zeros(2)
    assert which(x).tolist() == [2, 2]
    with pydlx.use_backend("reference"):
        assert which(x).tolist() == [1, 1]
    assert which(x).tolist() == [2, 2]
