"""Sharded and data-parallel training of an optimized model, as of the original: FSDP2's ``fully_shard`` per block
or on the whole model, applied after or before ``optimize``, and DistributedDataParallel, over two CPU processes
(gloo), with the backend forced to ``reference`` so that pydlx's ops run (``auto`` on a CPU runs eager PyTorch).

Each case trains a few SGD steps in both processes, each on its half of the batch, once with the original model and
once optimized, sharded or wrapped the same way. The optimized parameters must equal the original's trained the
same way, and, for models without BatchNorm (whose statistics are per process), the original's trained in one
process on the whole batch. Sharding after ``optimize`` keeps the fused ops (counted); sharding first leaves the
sharded modules as written (``explain`` says so), since FSDP2 gathers parameters per module object."""
from __future__ import annotations

import os
import socket
import traceback
from collections import Counter

import pytest
import torch
from torch import nn

import pydlx
from pydlx.bench import seed_models as S

STEPS, BATCH, WORLD = 3, 8, 2
# also through the Triton kernels (the interpreter on a CPU: small enough to run there): the autoencoder's MLP kernels,
# FSDP2 on the whole model
TRITON_CASES = [("autoencoder", "whole", "after")]
WRAPS = [("ddp", "after"), ("blocks", "after"), ("whole", "after"), ("blocks", "before"), ("whole", "before")]
MODELS = ["cnn", "autoencoder", "rnn", "bn_blocks"]  # bn_blocks: Conv -> BatchNorm -> ReLU -> MaxPool blocks


def _bn_blocks() -> nn.Module:
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
    return nn.Sequential(block(3, 8), block(8, 16),
                         nn.Sequential(nn.Flatten(), nn.Linear(16 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 10)))


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return _bn_blocks() if kind == "bn_blocks" else S.make_model(kind, small=True)


def _data(kind: str):
    g = torch.Generator().manual_seed(1)
    shape = {"cnn": (BATCH, 3, 24, 24), "bn_blocks": (BATCH, 3, 24, 24), "rnn": (BATCH, 28, 28),
             "autoencoder": (BATCH, 784)}[kind]
    return torch.rand(shape, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def _train(kind: str, model: nn.Module, x, y) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(STEPS):
        opt.zero_grad()
        S.loss_fn("cnn" if kind == "bn_blocks" else kind, model, x, y).backward()
        opt.step()


def _wrap(model: nn.Module, wrap: str) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    if wrap == "ddp":
        return DDP(model)
    if wrap == "blocks":  # each top-level child with parameters is a unit, then the root
        for child in model.children():
            if any(True for _ in child.parameters()):
                fully_shard(child)
    fully_shard(model)
    return model


def _run_rank(rank: int, port: int, out, backend: str, body) -> None:
    """One rank: join the process group, run ``body()``, rank 0 puts its result (or the traceback) on ``out``."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=WORLD)
    try:
        result = body()
        if rank == 0:
            out.put(result)
    except BaseException:
        if rank == 0:
            out.put(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _worker(rank: int, port: int, out) -> None:
    _run_rank(rank, port, out, "gloo", lambda: _gloo_cases(rank))


def _gloo_cases(rank: int) -> dict:
    from pydlx.ops._common import _OPS

    ran = Counter()
    for op in _OPS.values():  # count the pydlx implementations that run
        op.impl = (lambda impl, name: lambda *a: ran.update([name]) or impl(*a))(op.impl, op.name)
    results = {}
    for kind in MODELS:
        x, y = _data(kind)
        half = BATCH // WORLD
        xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        for wrap, order, backend in [(w, o, b) for w, o in WRAPS for b in ("reference", "auto")] + [
                (w, o, "triton") for k, w, o in TRITON_CASES if k == kind and os.environ.get("TRITON_INTERPRET") == "1"]:
            got = {}
            with pydlx.use_backend(backend):
                for which in ("original", "optimized"):
                    model = _model(kind)
                    if which == "original":
                        model = _wrap(model, wrap)
                    elif order == "after":
                        model = _wrap(pydlx.optimize(model), wrap)
                    else:
                        model = pydlx.optimize(_wrap(model, wrap), inplace=True)
                    ran.clear()
                    _train(kind, model, xs, ys)
                    inner = model.module if wrap == "ddp" else model
                    got[which] = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().numpy().copy()
                                  for k, v in inner.state_dict().items()}  # (by value: the process ends)
                    got[which + " ops"] = sum(ran.values())
                got["explain"] = pydlx.explain(inner) if order == "before" else ""
            results[(kind, wrap, order, backend)] = got
    return results


def _spawn(worker, timeout: float):
    """Run ``worker(rank, port, queue)`` in WORLD spawned processes; what rank 0 put on the queue (a traceback
    string fails the test)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, out)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = out.get(timeout=timeout)
    for p in procs:
        p.join(timeout=120)
    assert not isinstance(results, str), results
    assert all(p.exitcode == 0 for p in procs)
    return results


@pytest.fixture(scope="module")
def trained():
    """Every case, trained in two processes (spawned once for all of them)."""
    return _spawn(_worker, 900)


@pytest.mark.parametrize("wrap,order", WRAPS)
@pytest.mark.parametrize("kind", MODELS)
def test_sharded_training_matches_the_original(trained, kind, wrap, order, backend="reference"):
    got = trained[(kind, wrap, order, backend)]
    original, optimized = got["original"], got["optimized"]
    assert set(optimized) == set(original)
    tol = dict(rtol=1e-4, atol=1e-5)
    for k in original:
        torch.testing.assert_close(torch.from_numpy(optimized[k]), torch.from_numpy(original[k]), **tol, msg=k)
    if kind != "bn_blocks":  # no per-process statistics: the same as one process on the whole batch
        single = _model(kind)
        _train(kind, single, *_data(kind))
        for k, v in single.state_dict().items():
            torch.testing.assert_close(torch.from_numpy(optimized[k]), v, **tol, msg=k)
    assert got["original ops"] == 0
    if order == "after" and (kind, wrap) not in NOTHING_FUSED_AFTER and kind not in NO_OP_ON_REFERENCE:
        assert got["optimized ops"] > 0  # fused before sharding: pydlx's ops ran in the sharded training
    if order == "before":  # sharded first: the sharded modules run as written, and explain says why
        assert got["optimized ops"] == 0
        assert "DTensor: sharded" in got["explain"], got["explain"]


@pytest.mark.parametrize("wrap,order", WRAPS)
@pytest.mark.parametrize("kind", MODELS)
def test_sharded_training_under_auto(trained, kind, wrap, order):
    """The same under ``auto`` (on a CPU the fused modules and forwards call plain eager PyTorch: no op runs)."""
    got = trained[(kind, wrap, order, "auto")]
    for k in got["original"]:
        torch.testing.assert_close(torch.from_numpy(got["optimized"][k]), torch.from_numpy(got["original"][k]),
                                   rtol=1e-4, atol=1e-5, msg=k)
    assert got["optimized ops"] == 0


@pytest.mark.interpreter
@pytest.mark.parametrize("kind,wrap,order", TRITON_CASES)
def test_sharded_training_through_the_triton_kernels(trained, kind, wrap, order):
    test_sharded_training_matches_the_original(trained, kind, wrap, order, "triton")


# where no pydlx op runs after optimize-then-shard, and why
NOTHING_FUSED_AFTER = {("cnn", "blocks"): "every layer is its own sharded unit (its hooks): each runs as written"}
NO_OP_ON_REFERENCE = {"rnn": "the reference backend's LSTM is ATen's LSTM itself (no pydlx op)"}


def _nccl_worker(rank: int, port: int, out) -> None:
    torch.cuda.set_device(rank)
    _run_rank(rank, port, out, "nccl", lambda: _nccl_case(rank))


def _nccl_case(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    got = {}
    x, y = (t.cuda() for t in _data("cnn"))
    half = BATCH // WORLD
    for which in ("original", "optimized"):
        model = _model("cnn").cuda()
        if which == "optimized":
            model = pydlx.optimize(model)
        fully_shard(model)
        _train("cnn", model, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
        got[which] = {k: v.full_tensor().cpu().numpy().copy() for k, v in model.state_dict().items()}
    return got


@pytest.mark.gpu
def test_fsdp2_over_nccl_matches_the_original():
    """On two GPUs: the seed CNN optimized then sharded with fully_shard over NCCL, under ``auto`` (the GPU's
    kernels), trains as the original sharded the same way (TF32-level tolerance)."""
    if torch.cuda.device_count() < WORLD:
        pytest.skip(f"needs {WORLD} GPUs (NCCL runs one process per GPU); this machine has "
                    f"{torch.cuda.device_count()}")
    got = _spawn(_nccl_worker, 600)
    for k in got["original"]:
        torch.testing.assert_close(torch.from_numpy(got["optimized"][k]), torch.from_numpy(got["original"][k]),
                                   rtol=2e-3, atol=2e-4, msg=k)
