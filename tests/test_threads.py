"""``use_backend`` and ``use_policy`` are per thread; a backward runs on its forward's backend whatever thread
autograd runs it on."""
from __future__ import annotations

import threading

import torch

import pydlx
from pydlx import _policy, registry


def _linear_backend(y: torch.Tensor) -> str:
    """Which path made ``y``: pydlx's op (a forced backend) or plain eager PyTorch (``auto`` on a CPU)."""
    return "op" if "pydlx" in y.grad_fn.name() else "eager"


def test_two_threads_two_backends():
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
    assert seen == {"forced": ("reference", "off", "op"), "plain": ("auto", None, "eager")}, seen
    assert pydlx.current_backend() == "auto"


def test_backward_on_another_thread_runs_on_the_forward_backend(monkeypatch):
    """The forward under a forced backend in one thread; its backward run from a thread that forced nothing (as
    autograd's CUDA worker threads do): the backward implementation called is the forward's backend's."""
    calls = []
    real = registry.implementation

    def counting(family, backend):
        calls.append((family, backend))
        return real(family, backend)
    monkeypatch.setattr(registry, "implementation", counting)
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    with pydlx.use_backend("reference"):
        y = pydlx.ops.linear(x, w, None, "relu")
    calls.clear()
    t = threading.Thread(target=lambda: y.sum().backward())
    t.start()
    t.join(timeout=60)
    assert calls == [("linear", "reference")], calls
    torch.testing.assert_close(w.grad, (torch.relu(x @ w.t()) > 0).float().t() @ x)

