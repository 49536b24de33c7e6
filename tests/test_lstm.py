"""pydlx.nn.LSTM / LSTMCell and pydlx.ops.lstm against torch.nn.LSTM in float64: outputs, h_n, c_n and every
gradient (input, h0, c0, all weights and biases); the Triton kernels under the interpreter (compiled on a GPU),
both launch paths (one sequence launch, one launch a step), packed sequences of mixed lengths, multi-layer,
bidirectional, batch 1, sequences up to 150 steps (1000 on GPU); modules, errors, opcheck, compile."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence, pad_sequence

import pydlx
from pydlx.reference import lstm as ref
from tolerance import assert_close

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]

# (input_size, hidden_size, num_layers, bidirectional, batch_first, batch, lengths[, proj_size]): a one-entry
# lengths = padded input of that length; a list = a PackedSequence of those lengths (unsorted, repeats, a 1)
CASES = [
    pytest.param((5, 7, 1, False, False, 3, [13]), id="1layer-h7"),
    pytest.param((4, 9, 2, True, True, 1, [6]), id="2layer-bidir-batch1"),
    pytest.param((3, 70, 1, False, False, 5, [4]), id="h70-streamed-weights"),
    pytest.param((6, 8, 2, True, False, 5, [3, 7, 1, 7, 5]), id="packed-2layer-bidir"),
    pytest.param((3, 5, 1, False, True, 2, [150]), id="seq150"),
    pytest.param((2, 6, 1, False, False, 40, [2]), id="batch40-three-tiles"),
    pytest.param((3, 4, 2, True, False, 2, [1]), id="seq1-2layer-bidir"),
    pytest.param((6, 8, 2, True, False, 5, [3, 7, 1, 7, 5], 3), id="proj3-packed-2layer-bidir"),
    pytest.param((3, 70, 1, False, True, 2, [9], 20), id="proj20-h70"),
]


def twin(m, dtype=None):
    """The torch.nn.LSTM with m's configuration and parameters."""
    t = nn.LSTM(m.input_size, m.hidden_size, m.num_layers, m.bias, m.batch_first, m.dropout, m.bidirectional,
                m.proj_size)
    t.load_state_dict(m.state_dict())
    return t.to(dtype) if dtype else t


def make_input(case, dtype, device="cpu"):
    I, H, L, bidir, bf, B, lengths = case[:7]
    gen = torch.Generator().manual_seed(1)
    if len(lengths) > 1:
        seqs = [torch.randn(n, I, generator=gen).to(device, dtype) for n in lengths]
        return pack_sequence(seqs, enforce_sorted=False)
    T = lengths[0]
    shape = (B, T, I) if bf else (T, B, I)
    return torch.randn(shape, generator=gen).to(device, dtype)


def run(module, x, hx):
    """(output tensor, h_n, c_n) and the gradients of a loss touching all three, wrt x, h0, c0, parameters."""
    xs = x.data if hasattr(x, "batch_sizes") else x
    out, (h, c) = module(x, hx)
    y = out.data if hasattr(out, "batch_sizes") else out
    w = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape).to(y.device, y.dtype)
    loss = (y * w).sum() + (h * h.detach()).sum() + 0.5 * c.sum()
    grads = torch.autograd.grad(loss, [xs, *hx, *module.parameters()])
    return [y, h, c, *grads]


def _with_grad(x):
    if hasattr(x, "batch_sizes"):
        return x._replace(data=x.data.detach().requires_grad_())
    return x.detach().requires_grad_()


def check(case, dtype, backend, device="cpu", path=None, monkeypatch=None):
    I, H, L, bidir, bf, B, lengths = case[:7]
    proj = case[7] if len(case) > 7 else 0
    torch.manual_seed(0)
    base = nn.LSTM(I, H, num_layers=L, bidirectional=bidir, batch_first=bf, proj_size=proj).to(device)
    x = make_input(case, torch.float64, device)
    nb = x.batch_sizes[0].item() if hasattr(x, "batch_sizes") else B
    gen = torch.Generator().manual_seed(2)
    hx = [torch.randn(L * (1 + bidir), nb, width, generator=gen, dtype=torch.float64).to(device)
          for width in (proj or H, H)]
    names = ["output", "h_n", "c_n", "d_input", "d_h0", "d_c0"] + [f"d_{n}" for n, _ in base.named_parameters()]

    def runs(dt, module_cls, be):
        m = copy.deepcopy(base).to(dt)
        if module_cls is not None:
            m = module_cls.from_module(m)
        xx = _with_grad(x.to(dt) if not hasattr(x, "batch_sizes") else x._replace(data=x.data.to(dt)))
        h = [t.to(dt).requires_grad_() for t in hx]
        with pydlx.use_backend(be):
            return run(m, xx, h)

    if path is not None:
        monkeypatch.setenv("PYDLX_LSTM_PATH", path)
    got = runs(dtype, pydlx.nn.LSTM, backend)
    want = runs(torch.float64, None, "reference")
    # the same precision computed by pydlx's reference (fp32 math from 16-bit inputs: no oneDNN, any CPU)
    baseline = runs(dtype, pydlx.nn.LSTM, "reference") if dtype != torch.float64 else None
    for i, (a, e, n) in enumerate(zip(got, want, names)):
        assert a.dtype == dtype, n
        assert_close(a, e, dtype=dtype, name=n, baseline=baseline[i] if baseline else None)


# ---------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_reference_layer_math_matches_nn_lstm_with_lengths(reverse):
    """The per-layer decomposition the kernels implement (masks per step, reverse from each sequence's end)."""
    torch.manual_seed(0)
    m = nn.LSTM(4, 6, bidirectional=True).double()
    lengths = [5, 2, 5, 1]
    seqs = [torch.randn(n, 4, dtype=torch.float64) for n in lengths]
    out, (h, c) = m(pack_sequence(seqs, enforce_sorted=False))
    padded_out, _ = torch.nn.utils.rnn.pad_packed_sequence(out)
    d = 1 if reverse else 0
    sfx = "_reverse" if reverse else ""
    w_ih, w_hh = getattr(m, "weight_ih_l0" + sfx), getattr(m, "weight_hh_l0" + sfx)
    b = getattr(m, "bias_ih_l0" + sfx) + getattr(m, "bias_hh_l0" + sfx)
    zeros = torch.zeros(4, 6, dtype=torch.float64)
    y, hn, cn = ref.lstm_layer(pad_sequence(seqs), w_ih, w_hh, b, zeros, zeros, torch.tensor(lengths), reverse)
    assert_close(y, padded_out[..., d * 6:(d + 1) * 6], name="y")
    assert_close(hn, h[d], name="h_n")
    assert_close(cn, c[d], name="c_n")


@pytest.mark.parametrize("case", CASES)
def test_reference_backend_float64(case):
    check(case, torch.float64, "reference")


@pytest.mark.parametrize("proj", [0, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_module_options_match_nn_lstm(proj, bias):
    """Projections, no bias, unbatched input, default (zero) state: the module against torch.nn.LSTM."""
    torch.manual_seed(0)
    kw = dict(num_layers=2, bias=bias, proj_size=proj, bidirectional=True, dtype=torch.float64)
    a = nn.LSTM(4, 5, **kw)
    torch.manual_seed(0)
    b = pydlx.nn.LSTM(4, 5, **kw)  # same constructor, same initialisation, same state_dict
    assert list(a.state_dict()) == list(b.state_dict())
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    for x in (torch.randn(7, 3, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)):
        ya, (ha, ca) = a(x)
        yb, (hb, cb) = b(x)
        for u, v in ((ya, yb), (ha, hb), (ca, cb)):
            assert u.shape == v.shape
            assert_close(v, u)


# ---------------------------------------------------------------------------------------------- triton
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_triton_interpreter(case, dtype, poison):
    check(case, dtype, "triton")


@pytest.mark.interpreter
@pytest.mark.parametrize("case", [CASES[2], CASES[3]], ids=["h70", "packed-bidir"])
def test_triton_interpreter_step_launches(case, monkeypatch, poison):
    check(case, torch.float32, "triton", path="step", monkeypatch=monkeypatch)


@pytest.mark.interpreter
def test_triton_kernels_really_run(monkeypatch):
    from pydlx.triton import lstm as tri

    calls = []
    real = tri.lstm_fwd
    monkeypatch.setattr(tri, "lstm_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = pydlx.nn.LSTM(3, 4, num_layers=2)
    with pydlx.use_backend("triton"):
        m(torch.randn(2, 1, 3))
    assert len(calls) == 2


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_lstm_cell_triton(dtype, poison):
    torch.manual_seed(0)
    cell = nn.LSTMCell(5, 7)
    x = torch.randn(3, 5, dtype=torch.float64)
    hx = [torch.randn(3, 7, dtype=torch.float64) for _ in range(2)]

    def go(dt, be, cls):
        m = copy.deepcopy(cell).to(dt)
        m = cls.from_module(m) if cls else m
        xx, h = x.to(dt).requires_grad_(), [t.to(dt).requires_grad_() for t in hx]
        with pydlx.use_backend(be):
            h1, c1 = m(xx, h)
        loss = (h1 * torch.linspace(-1, 1, h1.numel()).view(h1.shape).to(dt)).sum() + c1.sum()
        return [h1, c1, *torch.autograd.grad(loss, [xx, *h, *m.parameters()])]

    got, want, base = go(dtype, "triton", pydlx.nn.LSTMCell), go(torch.float64, "reference", None), \
        go(dtype, "reference", pydlx.nn.LSTMCell)
    for a, e, b in zip(got, want, base):
        assert_close(a, e, dtype=dtype, baseline=b)
    with pydlx.use_backend("triton"):  # unbatched, no state
        h1, c1 = pydlx.nn.LSTMCell.from_module(cell)(x[0].float())
    assert h1.shape == (7,) and c1.shape == (7,)
    assert_close(h1, cell(x[0].float())[0].double(), dtype=torch.float32)


@pytest.mark.interpreter
def test_dropout_between_layers():
    torch.manual_seed(0)
    m = pydlx.nn.LSTM(3, 6, num_layers=3, dropout=0.5)
    x = torch.randn(4, 2, 3)
    with pydlx.use_backend("triton"):
        m.eval()
        y_eval = m(x)[0]
        m.train()
        torch.manual_seed(1)
        y1 = m(x)[0]
        torch.manual_seed(1)
        y2 = m(x)[0]
        torch.manual_seed(2)
        y3 = m(x)[0]
    assert_close(y_eval, twin(m, torch.float64).eval()(x.double())[0], dtype=torch.float32, name="eval: no dropout")
    assert torch.equal(y1, y2) and not torch.allclose(y1, y3) and not torch.allclose(y1, y_eval)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_autocast_bf16_on_cpu(backend):
    """torch's own nn.LSTM fails under CPU autocast bf16 on CPUs without AVX-512 (oneDNN); pydlx's runs anywhere.
    The oracle: float64 math from the bf16-rounded input and weights (what autocast computes from)."""
    torch.manual_seed(0)
    m = pydlx.nn.LSTM(3, 5, num_layers=2, bidirectional=True)
    x = torch.randn(4, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16), pydlx.use_backend(backend):
        out, (h, c) = m(x)
    want = twin(m).to(torch.bfloat16).double()(x.to(torch.bfloat16).double())
    for got, exp, name in ((out, want[0], "output"), (h, want[1][0], "h_n"), (c, want[1][1], "c_n")):
        assert got.dtype == torch.bfloat16, name
        assert_close(got, exp, dtype=torch.bfloat16, name=name)


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=["2layer-bidir-batch1", "proj3-packed-2layer-bidir"])
def test_cpu_16bit_reference_runs_on_any_cpu(case, dtype):
    """16-bit weights on the CPU (auto = reference): pydlx runs its own per-layer math in fp32, not oneDNN's RNN
    (which needs AVX-512 for bf16), forward and every gradient, against float64 from the same rounded values."""
    I, H, L, bidir, bf, B, lengths = case[:7]
    proj = case[7] if len(case) > 7 else 0
    torch.manual_seed(0)
    base = nn.LSTM(I, H, num_layers=L, bidirectional=bidir, batch_first=bf, proj_size=proj).to(dtype)
    x = make_input(case, dtype)
    nb = x.batch_sizes[0].item() if hasattr(x, "batch_sizes") else B
    hx = [torch.randn(L * (1 + bidir), nb, w).to(dtype) for w in (proj or H, H)]

    def go(dt, module):
        m = copy.deepcopy(base).to(dt)
        m = pydlx.nn.LSTM.from_module(m) if module else m
        xx = _with_grad(x.to(dt) if not hasattr(x, "batch_sizes") else x._replace(data=x.data.to(dt)))
        return run(m, xx, [t.to(dt).requires_grad_() for t in hx])

    got, want = go(dtype, True), go(torch.float64, False)
    for a, e in zip(got, want):
        assert a.dtype == dtype
        assert_close(a, e, dtype=dtype)
    cell = nn.LSTMCell(I, H).to(dtype)
    xc, hc = torch.randn(3, I).to(dtype), [torch.randn(3, H).to(dtype) for _ in range(2)]
    h1, c1 = pydlx.nn.LSTMCell.from_module(cell)(xc, hc)
    h64, c64 = copy.deepcopy(cell).double()(xc.double(), [t.double() for t in hc])
    assert h1.dtype == dtype
    assert_close(h1, h64, dtype=dtype, name="cell h")
    assert_close(c1, c64, dtype=dtype, name="cell c")


def test_cpu_16bit_paths_pass_without_avx512():
    """The CPU 16-bit tests again with oneDNN held to AVX2 (what a CPU without AVX-512 gives): none of them may
    depend on the host's instruction set."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                        os.path.join(here, "test_seed_models.py"), "-k",
                        "cpu_16bit_reference or autocast_bf16_on_cpu"], env=env, capture_output=True, text=True,
                       cwd=here, timeout=600)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


@pytest.mark.interpreter
def test_opcheck_and_compile():
    from pydlx.ops import lstm as ops_lstm  # noqa: F401  (registers the ops)

    T, B, I, H = 3, 2, 4, 5
    x = torch.randn(T, B, I, requires_grad=True)
    w_ih = torch.randn(4 * H, I, requires_grad=True)
    w_hh = torch.randn(4 * H, H, requires_grad=True)
    b = torch.randn(4 * H, requires_grad=True)
    h0, c0 = torch.randn(B, H, requires_grad=True), torch.randn(B, H, requires_grad=True)
    for lengths, reverse in ((None, False), (torch.tensor([3, 1], dtype=torch.int32), True)):
        torch.library.opcheck(torch.ops.pydlx.lstm_layer_fwd.default,
                              (x, w_ih, w_hh, b, None, h0, c0, lengths, reverse, True, "triton"))
    m = pydlx.nn.LSTM(I, H, num_layers=2)
    xin = torch.randn(T, B, I)
    with pydlx.use_backend("triton"):
        y = torch.compile(m, fullgraph=True, backend="aot_eager")(xin)[0]
    assert_close(y, twin(m, torch.float64)(xin.double())[0], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- module, errors
def test_from_module_shares_parameters_and_keeps_state_dict():
    base = nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    m = pydlx.nn.LSTM.from_module(base)
    assert isinstance(m, nn.RNNBase) and m.mode == "LSTM" and m.weight_ih_l0 is base.weight_ih_l0 and m.batch_first
    assert not isinstance(m, nn.LSTM)  # torch.compile refuses to trace nn.LSTM instances
    assert repr(m) == "LSTM(3, 4, num_layers=2, batch_first=True, bidirectional=True)"
    assert list(m.state_dict()) == list(base.state_dict())
    cell = nn.LSTMCell(3, 4)
    c = pydlx.nn.LSTMCell.from_module(cell)
    assert c.weight_hh is cell.weight_hh and list(c.state_dict()) == list(cell.state_dict())
    with pytest.raises(TypeError, match="expected an nn.LSTM"):
        pydlx.nn.LSTM.from_module(nn.GRU(3, 4))


@pytest.mark.parametrize("backend", ["reference", "auto", "triton"])
def test_bad_inputs_raise_clear_errors(backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    m = pydlx.nn.LSTM(3, 4, num_layers=2)
    with pydlx.use_backend(backend):
        with pytest.raises(ValueError, match="input_size. Expected 3, got 5"):
            m(torch.randn(2, 1, 5))
        with pytest.raises(ValueError, match=r"expected h0 of shape \(2, 1, 4\), got \(1, 1, 4\)"):
            m(torch.randn(2, 1, 3), (torch.zeros(1, 1, 4), torch.zeros(2, 1, 4)))
        with pytest.raises(ValueError, match=r"expected c0 of shape \(2, 1, 4\), got \(2, 1, 5\)"):
            m(torch.randn(2, 1, 3), (torch.zeros(2, 1, 4), torch.zeros(2, 1, 5)))
        with pytest.raises(ValueError, match="must be 3-D"):
            m(torch.randn(2, 1, 1, 3))
        with pytest.raises(TypeError, match="must be a floating-point tensor"):
            m(torch.ones(2, 1, 3, dtype=torch.int64))
        with pytest.raises(TypeError, match="h0 has dtype torch.float64"):
            m(torch.randn(2, 1, 3), (torch.zeros(2, 1, 4, dtype=torch.float64), torch.zeros(2, 1, 4)))
        with pytest.raises(ValueError, match="expected 8 weight tensors"):
            pydlx.ops.lstm(torch.randn(2, 1, 3), m._flat_weights[:-1], num_layers=2)
        with pytest.raises(ValueError, match=r"expected h0 of shape \(1, 4\)"):
            pydlx.nn.LSTMCell(3, 4)(torch.randn(1, 3), (torch.zeros(1, 5), torch.zeros(1, 4)))
        with pytest.raises(ValueError, match="input has 2 features, expected input_size=3"):
            pydlx.nn.LSTMCell(3, 4)(torch.randn(1, 2))


def test_forced_triton_refuses_float64_with_the_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pydlx.use_backend("triton"), pytest.raises(pydlx.BackendUnavailableError, match="float64"):
        pydlx.nn.LSTM(3, 4).double()(torch.randn(2, 1, 3, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- GPU
GPU_CASES = CASES + [
    pytest.param((32, 256, 1, False, False, 16, [1000]), id="h256-seq1000-drift"),
    pytest.param((16, 512, 2, True, True, 7, [50]), id="h512-2layer-bidir"),
    pytest.param((8, 128, 1, False, False, 64, [100, 3, 57, 100, 1] * 4), id="packed-mixed-h128"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["sequence", "step"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_triton_against_reference(case, dtype, path, monkeypatch, poison):
    check(case, dtype, "triton", device="cuda", path=path, monkeypatch=monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=["padded", "packed"])
def test_gpu_auto_and_reference_run_cudnn(case):
    check(case, torch.float32, "auto", device="cuda")


@pytest.mark.interpreter
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_layer_op_with_lengths_matches_the_reference_layer(reverse, poison):
    """The layer op's own contract: rows past their length keep h and c and output 0 (pydlx.reference.lstm)."""
    from pydlx.ops import lstm as ops_lstm  # noqa: F401  (registers the ops)

    T, B, I, H = 6, 5, 3, 10
    x, h0, c0 = torch.randn(T, B, I), torch.randn(B, H), torch.randn(B, H)
    w_ih, w_hh, b = torch.randn(4 * H, I) / 2, torch.randn(4 * H, H) / 3, torch.randn(4 * H)
    lengths = torch.tensor([6, 2, 1, 6, 4], dtype=torch.int32)
    y, h, c, hs, cs, acts, rs = torch.ops.pydlx.lstm_layer_fwd(x, w_ih, w_hh, b, None, h0, c0, lengths, reverse, True,
                                                               "triton")
    d = lambda t: t.double()  # noqa: E731
    want = ref.lstm_layer(d(x), d(w_ih), d(w_hh), d(b), d(h0), d(c0), lengths, reverse)
    for a, e, n in zip((y, h, c), want, ("y", "h_n", "c_n")):
        assert_close(a, e, dtype=torch.float32, name=n)
    assert (y[1:, 2] == 0).all()  # the length-1 row


@pytest.mark.gpu
def test_gpu_forward_is_cuda_graph_capturable():
    """No host syncs in the kernels' forward: a CUDA graph captures every launch (the step launches included), so
    replaying it takes the host off the critical path."""
    torch.manual_seed(0)
    for path in ("sequence", "step"):
        m = pydlx.nn.LSTM(64, 96, num_layers=2).cuda().to(torch.bfloat16)
        x = torch.randn(30, 8, 64, device="cuda", dtype=torch.bfloat16)
        with pydlx.use_backend("triton"), torch.no_grad():
            import os

            os.environ["PYDLX_LSTM_PATH"] = path
            try:
                want = m(x)[0].clone()  # warm-up: compiles the kernels outside the capture
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    m(x)
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    y = m(x)[0]
                x.copy_(torch.randn_like(x))
                g.replay()
                torch.cuda.synchronize()
                assert_close(y, m(x)[0], dtype=torch.bfloat16, name=f"replay {path}")
                assert not torch.equal(y, want)
            finally:
                del os.environ["PYDLX_LSTM_PATH"]


# ---------------------------------------------------------------------------------------------- C++/CUDA (GPU)
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [c for c in GPU_CASES if len(c.values[0]) == 7]  # no projections in CUDA
                         + [pytest.param((16, 768, 1, False, False, 16, [1024]), id="h768-b16-seq1024")])
def test_gpu_cuda_persistent_against_reference(case, dtype, poison):
    """csrc/lstm.cu (forced `cuda` backend): the persistent kernels, forward and backward, incl. 1000+ steps."""
    check(case, dtype, "cuda", device="cuda")


@pytest.mark.gpu
def test_gpu_cuda_refuses_what_does_not_fit():
    from pydlx.cuda.lstm import smem_bytes as cuda_smem_bytes

    props = torch.cuda.get_device_properties(0)
    H = 256
    while cuda_smem_bytes(H, 4, props.multi_processor_count) <= props.shared_memory_per_block_optin:
        H *= 2
    m = pydlx.nn.LSTM(8, H).cuda()
    with pydlx.use_backend("cuda"), pytest.raises(pydlx.BackendUnavailableError, match="does not fit"):
        m(torch.randn(3, 2, 8, device="cuda"))

