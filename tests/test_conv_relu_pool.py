"""pydlx.ops.conv_relu_pool2d / pydlx.nn.ConvReLUPool2d against the float64 reference: the Triton kernel under the
interpreter (on GPU compiled), the op's autograd (backward through the saved int8 indices and the conv backward),
saved-tensor memory, modules, errors, opcheck, compile."""
import importlib

import pytest
import torch
from torch import nn

import pydlx
from pydlx import reference as ref
from tolerance import assert_close

# (N, C, H, W, K, kernel, stride, padding, pool, pool_stride): odd sizes, 1x1 and 11x11 kernels, strides 1..4,
# paddings 0..3, 2/2 pools and overlapping 3/2 pools, batch 1
CASES = [
    pytest.param((2, 3, 11, 13, 5, 3, 1, 1, 2, 2), id="seed-like-3x3p1-pool2"),
    pytest.param((1, 4, 17, 15, 7, 5, 2, 2, 3, 2), id="5x5s2p2-pool3s2"),
    pytest.param((2, 3, 9, 9, 6, 1, 1, 0, 2, 2), id="1x1"),
    pytest.param((1, 2, 27, 27, 4, 11, 4, 2, 3, 2), id="alexnet-like-11x11s4p2-pool3s2"),
    pytest.param((3, 5, 8, 10, 3, 4, 1, 3, 2, 1), id="4x4p3-pool2s1"),
    pytest.param((1, 1, 7, 7, 1, 2, 3, 0, 2, 2), id="1ch-2x2s3"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]


def make(case, dtype, device="cpu", bias=True):
    N, C, H, W, K, R, s, p, P, Q = case
    x = torch.randn(N, C, H, W, dtype=dtype, device=device, requires_grad=True)
    w = (torch.randn(K, C, R, R, dtype=dtype, device=device) / (C * R * R) ** 0.5).requires_grad_()
    b = torch.randn(K, dtype=dtype, device=device, requires_grad=True) if bias else None
    return x, w, b, (s, p, P, Q)


def fwd_bwd(fn, x, w, b, g):
    y = fn(x, w, b)
    leaves = [t for t in (x, w, b) if t is not None]
    return [y, *torch.autograd.grad(y, leaves, g)]


def check(fn, x, w, b, args, dtype):
    g = torch.randn(fn(x, w, b).shape, dtype=dtype, device=x.device)
    got = fwd_bwd(fn, x, w, b, g)
    up = lambda t: t.detach().double().requires_grad_() if t is not None else None  # noqa: E731
    want = fwd_bwd(lambda *a: ref.conv_relu_pool2d(*a, *args), up(x), up(w), up(b), g.double())
    eager = fwd_bwd(lambda *a: ref.conv_relu_pool2d(*a, *args), x, w, b, g)
    for a_, e_, base, name in zip(got, want, eager, ["y", "dx", "dw", "db"]):
        assert a_.dtype == dtype
        assert_close(a_, e_, dtype=dtype, name=name, baseline=base)


@pytest.mark.parametrize("case", CASES)
def test_op_reference_backend_float64(case):
    x, w, b, args = make(case, torch.float64)
    g = torch.randn(ref.conv_relu_pool2d(x, w, b, *args).shape, dtype=torch.float64)
    with pydlx.use_backend("reference"):
        got = fwd_bwd(lambda *a: pydlx.ops.conv_relu_pool2d(*a, *args), x, w, b, g)
    want = fwd_bwd(lambda *a: ref.conv_relu_pool2d(*a, *args), x, w, b, g)
    for a_, e_ in zip(got, want):
        assert_close(a_, e_)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_triton_interpreter(case, dtype, poison):
    x, w, b, args = make(case, dtype)
    with pydlx.use_backend("triton"):
        check(lambda *a: pydlx.ops.conv_relu_pool2d(*a, *args), x, w, b, args, dtype)


@pytest.mark.interpreter
def test_triton_no_bias_unbatched_channels_last_and_nan(poison):
    x, w, _, args = make(CASES[0].values[0], torch.float32, bias=False)
    with pydlx.use_backend("triton"):
        check(lambda *a: pydlx.ops.conv_relu_pool2d(*a, *args), x, w, None, args, torch.float32)
        y1 = pydlx.ops.conv_relu_pool2d(x[0], w, None, *args)
        assert y1.shape == ref.conv_relu_pool2d(x[0], w, None, *args).shape
        xc = x.detach().contiguous(memory_format=torch.channels_last)
        yc = pydlx.ops.conv_relu_pool2d(xc, w, None, *args)
        assert yc.is_contiguous(memory_format=torch.channels_last)
        xn = x.detach().clone()
        xn[0, 0, 3, 3] = float("nan")
        yn = pydlx.ops.conv_relu_pool2d(xn, w, None, *args)
    want = ref.conv_relu_pool2d(xn, w.detach(), None, *args)
    assert torch.equal(torch.isnan(yn), torch.isnan(want)) and torch.isnan(yn).any()
    assert_close(yc, ref.conv_relu_pool2d(xc, w.detach(), None, *args), dtype=torch.float32, name="channels_last")


@pytest.mark.interpreter
def test_forced_triton_runs_the_kernel(monkeypatch):
    ops = importlib.import_module("pydlx.ops.conv_relu_pool")
    monkeypatch.setattr(ops.torch.nn.functional, "max_pool2d", lambda *a, **k: pytest.fail("the reference ran"))
    x, w, b, args = make(CASES[0].values[0], torch.float32)
    with pydlx.use_backend("triton"):
        y = pydlx.ops.conv_relu_pool2d(x, w, b, *args)
    assert y.shape == (2, 5, 5, 6)


def test_saved_tensors_at_most_half_of_eager():
    """Counted with saved_tensors_hooks: pydlx saves x, w, the pooled y and int8 indices."""
    conv, pool = nn.Conv2d(32, 64, 3, padding=1), nn.MaxPool2d(2, 2)
    fused = pydlx.nn.ConvReLUPool2d.from_modules(conv, pool)
    x = torch.randn(8, 32, 16, 16, requires_grad=True)

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x)
        return sum(seen.values())

    eager = saved_bytes(lambda t: pool(torch.relu(conv(t))))
    with pydlx.use_backend("reference"):  # the op with the eager forward inside: what auto runs on GPUs
        ours = saved_bytes(fused)
    assert ours <= eager / 2, f"pydlx saves {ours} bytes, eager {eager}"


BAD = [
    pytest.param(dict(groups=True), ValueError, "groups other than 1", id="groups"),
    pytest.param(dict(stride=5), ValueError, "stride must be an int in", id="stride"),
    pytest.param(dict(padding=4), ValueError, "padding must be an int in", id="padding"),
    pytest.param(dict(pool_size=4), ValueError, "pool_size must be an int in", id="pool"),
    pytest.param(dict(stride=(1, 2)), ValueError, "pair of equal ints", id="nonsquare-stride"),
    pytest.param(dict(rect=True), ValueError, "square kernel", id="nonsquare-kernel"),
    pytest.param(dict(intx=True), TypeError, "floating-point", id="int-input"),
    pytest.param(dict(small=True), ValueError, "smaller than the pool window", id="too-small"),
    pytest.param(dict(bias_shape=True), ValueError, "bias must be 1-D", id="bias-shape"),
]


@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
@pytest.mark.parametrize("bad,exc,msg", BAD)
def test_bad_input_raises_clear_error(bad, exc, msg, backend, monkeypatch):
    ops = importlib.import_module("pydlx.ops.conv_relu_pool")
    monkeypatch.setattr(ops, "conv_relu_pool2d_fwd", lambda *a, **k: pytest.fail("a kernel ran on bad input"))
    x = torch.randn(1, 4, 9, 9)
    w = torch.randn(6, 2 if bad.get("groups") else 4, 2 if bad.get("rect") else 3, 3)
    b = torch.randn(5 if bad.get("bias_shape") else 6)
    x = x.long() if bad.get("intx") else x[..., :2, :2] if bad.get("small") else x
    kw = {k: v for k, v in bad.items() if k in ("stride", "padding", "pool_size")}
    with pydlx.use_backend(backend), pytest.raises(exc, match=msg):
        pydlx.ops.conv_relu_pool2d(x, w, b, **kw)


@pytest.mark.parametrize("conv,pool,msg", [
    (nn.Conv2d(4, 4, 3, groups=2), nn.MaxPool2d(2), "groups"),
    (nn.Conv2d(4, 4, 3, dilation=2), nn.MaxPool2d(2), "dilation"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.MaxPool2d(2), "padding_mode"),
    (nn.Conv2d(4, 4, 3), nn.MaxPool2d(2, ceil_mode=True), "ceil_mode"),
])
def test_from_modules_rejects_unsupported(conv, pool, msg):
    with pytest.raises(ValueError, match=msg):
        pydlx.nn.ConvReLUPool2d.from_modules(conv, pool)


def test_module_matches_torch_and_state_dict():
    m = pydlx.nn.ConvReLUPool2d(3, 8, 3, padding=1, dtype=torch.float64)
    conv = nn.Conv2d(3, 8, 3, padding=1, dtype=torch.float64)
    conv.load_state_dict(m.state_dict())
    m.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    assert_close(m(x), nn.MaxPool2d(2)(torch.relu(conv(x))), name="module")


def test_opcheck_and_compile():
    x, w, b, args = make(CASES[0].values[0], torch.float32)
    with pydlx.use_backend("reference"):
        torch.library.opcheck(torch.ops.pydlx.conv_relu_pool2d_fwd.default, (x, w, b, *args, "reference"))
        torch.library.opcheck(torch.ops.pydlx.conv_relu_pool2d_fwd.default, (x, w, None, *args, "reference"))
        torch._dynamo.reset()
        m = pydlx.nn.ConvReLUPool2d(3, 5, 3, padding=1)
        y = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
        assert_close(y, m(x), name="compiled")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES + [pytest.param((16, 32, 16, 16, 64, 3, 1, 1, 2, 2), id="seed-conv2")])
def test_gpu_against_reference(case, dtype, backend, poison):
    x, w, b, args = make(case, dtype, device="cuda")
    with pydlx.use_backend(backend):
        check(lambda *a: pydlx.ops.conv_relu_pool2d(*a, *args), x, w, b, args, dtype)


FIRST_LAYERS = CASES + [pytest.param((4, 3, 32, 32, 32, 3, 1, 1, 2, 2), id="seed-conv1"),
                        pytest.param((2, 3, 67, 61, 20, 11, 4, 2, 3, 2), id="alexnet-conv1"),
                        pytest.param((1, 8, 23, 19, 17, 7, 2, 3, 3, 2), id="8ch-7x7s2p3")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FIRST_LAYERS)
def test_gpu_cuda_direct_conv_against_reference(case, dtype, poison):
    """csrc/conv_relu_pool.cu (forced `cuda` backend): first layers, at most 8 input channels."""
    x, w, b, args = make(case, dtype, device="cuda")
    with pydlx.use_backend("cuda"):
        check(lambda *a: pydlx.ops.conv_relu_pool2d(*a, *args), x, w, b, args, dtype)
        # no bias, channels_last input (output keeps it), NaN propagation
        xc = x.detach().clone().contiguous(memory_format=torch.channels_last)
        xc[0, 0, 1, 1] = float("nan")
        y = pydlx.ops.conv_relu_pool2d(xc, w.detach(), None, *args)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert_close(y, ref.conv_relu_pool2d(xc.double(), w.detach().double(), None, *args), dtype=dtype,
                     name="channels_last nan", baseline=ref.conv_relu_pool2d(xc, w.detach(), None, *args))


@pytest.mark.gpu
def test_gpu_cuda_backend_refuses_wide_inputs():
    x = torch.randn(1, 9, 8, 8, device="cuda")
    with pydlx.use_backend("cuda"), pytest.raises(pydlx.BackendUnavailableError, match="at most 8 input channels"):
        pydlx.ops.conv_relu_pool2d(x, torch.randn(4, 9, 3, 3, device="cuda"))
