"""An optimized model served without pydlx: ``torch.onnx.export(..., dynamo=True)`` gives a model of standard ONNX
ops that onnxruntime runs with the original's results, and ``run_decompositions(pydlx.decompositions())`` lowers an
exported program to plain ATen ops that a process which never imports pydlx loads and runs.

Both hold for a program exported under a kernel backend (``triton``: the graph names it, as one exported on a GPU
does; the Triton kernels are not run by export) and under the reference; each ``pydlx::`` op becomes its unfused
equivalent (Gemm + Relu, Conv + Relu + MaxPool, the LSTM's steps)."""
from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.export import Dim

import pydlx
from pydlx.bench.seed_models import CNN, RNN, Autoencoder



def _torchvision(name):
    def make():
        import torchvision
        return getattr(torchvision.models, name)(num_classes=10)
    return make


MODELS = {
    "cnn": (CNN, (4, 3, 24, 24)),
    "rnn": (lambda: RNN(28, 16, 2, 10), (4, 28, 28)),
    "autoencoder": (lambda: Autoencoder(784, 32, 3), (4, 784)),
    "resnet18": (_torchvision("resnet18"), (2, 3, 32, 32)),
    "mobilenet_v3_small": (_torchvision("mobilenet_v3_small"), (2, 3, 32, 32)),
}
BACKENDS = ["auto", "reference", pytest.param("triton", marks=pytest.mark.interpreter)]
STANDARD_DOMAINS = ("", "ai.onnx")
TOL = dict(rtol=1e-4, atol=1e-5)


def _exported_pair(name):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    fast = pydlx.optimize(copy.deepcopy(model))
    return model, fast, torch.randn(shape)


def _pydlx_ops(graph) -> set:
    return {str(n.target) for n in graph.nodes if str(n.target).startswith("pydlx.")}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_export_runs_in_onnxruntime(name, backend):
    model, fast, x = _exported_pair(name)
    with pydlx.use_backend(backend):
        if backend == "triton" or (backend == "reference" and name in ("cnn", "autoencoder")):  # (what the export
            # below has to translate; auto on a CPU runs plain eager PyTorch: no op)
            assert _pydlx_ops(torch.export.export(fast, (x,)).graph)
        program = torch.onnx.export(fast, (x,), dynamo=True, verbose=False,
                                    dynamic_shapes=({0: Dim("batch", min=2, max=1024)},))
    proto = program.model_proto
    domains = {n.domain for n in proto.graph.node} | {f.domain for f in proto.functions}
    assert domains <= set(STANDARD_DOMAINS), domains
    if name == "rnn":  # the LSTM as ONNX's LSTM op (as torch exports nn.LSTM), not unrolled
        assert "LSTM" in {n.op_type for n in proto.graph.node}
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (feed,) = session.get_inputs()
    for batch in (x.shape[0], 3):
        xb = torch.randn(batch, *x.shape[1:])
        (got,) = session.run(None, {feed.name: xb.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(xb), **TOL)


_SERVE = textwrap.dedent("""
    import sys, torch
    program = torch.export.load(sys.argv[1])
    x = torch.load(sys.argv[2])
    torch.save(program.module()(x), sys.argv[3])
    assert not any(m == "pydlx" or m.startswith("pydlx.") for m in sys.modules), "pydlx was imported"
""")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["cnn", "rnn", "autoencoder", "resnet18"])
def test_lowered_program_runs_without_pydlx(name, backend, tmp_path):
    model, fast, x = _exported_pair(name)
    with pydlx.use_backend(backend):
        exported = torch.export.export(fast, (x,), dynamic_shapes=({0: Dim("batch", min=2, max=1024)},))
    lowered = exported.run_decompositions(pydlx.decompositions())
    assert not _pydlx_ops(lowered.graph)
    torch.export.save(lowered, tmp_path / "model.pt2")
    xb = torch.randn(5, *x.shape[1:])
    torch.save(xb, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", _SERVE, str(tmp_path / "model.pt2"), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, cwd=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), model(xb), **TOL)


def test_decompositions_cover_every_op():
    """Every ``pydlx::`` op the entry points call (what a traced graph can hold; the C++ extension's kernels are
    called inside the implementations) has its decomposition, in the table pydlx gives and in torch's (what the ONNX
    exporter lowers with), and the table is a copy the caller may change."""
    from torch._decomp import decomposition_table

    from pydlx.ops import schemas
    from pydlx.ops._common import _OPS

    ops = {op.overload for op in _OPS.values()}
    assert {schemas.op(name) for name in schemas.SCHEMAS} <= ops
    table = pydlx.decompositions()
    assert ops and set(table) == ops
    assert all(decomposition_table[op] is table[op] for op in ops)
    table.clear()
    assert set(pydlx.decompositions()) == ops


def test_a_decomposition_computes_the_ops_reference():
    """A decomposition runs the op's math on the reference whatever backend the call names: its outputs equal the
    op's on the reference, for a forward op and a backward op, with arguments given by keyword too."""
    x, w, b = torch.randn(5, 7), torch.randn(4, 7), torch.randn(4)
    table = pydlx.decompositions()
    fwd, bwd = torch.ops.pydlx.linear_fwd.default, torch.ops.pydlx.linear_bwd.default
    want = fwd(x, w, b, "relu", True, "reference")
    got = table[fwd](x, w, b, activation="relu", save_preact=True, backend="triton")
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    torch.testing.assert_close(want[0], torch.relu(x @ w.t() + b))
    g = torch.randn(5, 4)
    want_b = bwd(g, x, w, want[0], "relu", True, True, True, "reference")
    got_b = table[bwd](g, x, w, want[0], "relu", True, True, True, "triton")
    for gb, e in zip(got_b, want_b):
        torch.testing.assert_close(gb, e, rtol=0, atol=0)
    dz = g * (want[0] > 0)
    torch.testing.assert_close(got_b[0], dz @ w)
    torch.testing.assert_close(got_b[1], dz.t() @ x)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias,proj,lengths,save", [(True, False, False, False), (False, False, False, True),
                                                     (True, True, False, False), (True, False, True, True)])
def test_the_lstm_layer_lowers_to_its_reference(reverse, bias, proj, lengths, save):
    """The LSTM layer's decomposition (ATen's LSTM for y, h_n, c_n without lengths; the reference's steps for
    what backward saves) gives every output of the op on the reference: with and without a bias, a projection,
    lengths, in both directions."""
    T, B, I, H, P = 5, 3, 4, 6, 4
    op = torch.ops.pydlx.lstm_layer_fwd.default
    out = P if proj else H
    args = (torch.randn(T, B, I), torch.randn(4 * H, I) / 3, torch.randn(4 * H, out) / 3,
            torch.randn(4 * H) if bias else None, torch.randn(P, H) / 3 if proj else None, torch.randn(B, out),
            torch.randn(B, H), torch.tensor([5, 2, 4], dtype=torch.int32) if lengths else None, reverse, save)
    want = op(*args, "reference")
    got = pydlx.decompositions()[op](*args, "triton")
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
