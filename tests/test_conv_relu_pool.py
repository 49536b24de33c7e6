"""pydlx.ops.conv_relu_pool2d / pydlx.nn.ConvReLUPool2d against the float64 reference: the Triton kernel under the
interpreter (on GPU compiled), the op's autograd (backward through the saved int8 indices and the conv backward),
saved-tensor memory, modules, errors, opcheck, compile."""
import importlib

import oracle
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pydlx
from pydlx import reference as ref
from pydlx.bench import seed_models as S
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
    """fn (conv_relu_pool2d's positional form, ``args`` = (stride, padding, pool, pool_stride)) against float64."""
    s, p, P, Q = args
    kw = dict(stride=s, padding=p, activation="relu", pool_size=P, pool_stride=Q, pool_padding=0, ceil_mode=False)
    check_variant(x, w, b, kw, dtype, fn)


@pytest.mark.parametrize("case", CASES)
def test_op_reference_backend_float64(case):
    x, w, b, args = make(case, torch.float64)
    g = torch.randn(ref.conv_relu_pool.conv_relu_pool2d(x, w, b, *args).shape, dtype=torch.float64)
    with pydlx.use_backend("reference"):
        got = fwd_bwd(lambda *a: pydlx.ops.conv_relu_pool2d(*a, *args), x, w, b, g)
    want = fwd_bwd(lambda *a: ref.conv_relu_pool.conv_relu_pool2d(*a, *args), x, w, b, g)
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
        assert y1.shape == ref.conv_relu_pool.conv_relu_pool2d(x[0], w, None, *args).shape
        xc = x.detach().contiguous(memory_format=torch.channels_last)
        yc = pydlx.ops.conv_relu_pool2d(xc, w, None, *args)
        assert yc.is_contiguous(memory_format=torch.channels_last)
        xn = x.detach().clone()
        xn[0, 0, 3, 3] = float("nan")
        yn = pydlx.ops.conv_relu_pool2d(xn, w, None, *args)
    want = ref.conv_relu_pool.conv_relu_pool2d(xn, w.detach(), None, *args)
    assert torch.equal(torch.isnan(yn), torch.isnan(want)) and torch.isnan(yn).any()
    assert_close(yc, ref.conv_relu_pool.conv_relu_pool2d(xc, w.detach(), None, *args), dtype=torch.float32,
                 name="channels_last")


@pytest.mark.interpreter
def test_forced_triton_runs_the_kernel(monkeypatch):
    ops = importlib.import_module("pydlx.ops.conv_relu_pool")
    monkeypatch.setattr(ops.torch.nn.functional, "max_pool2d", lambda *a, **k: pytest.fail("the reference ran"))
    x, w, b, args = make(CASES[0].values[0], torch.float32)
    with pydlx.use_backend("triton"):
        y = pydlx.ops.conv_relu_pool2d(x, w, b, *args)
    assert y.shape == (2, 5, 5, 6)


@pytest.mark.interpreter
@pytest.mark.parametrize("layout", ["expanded", "transposed"])
def test_triton_backward_unpools_in_one_kernel_for_any_strides(layout, monkeypatch, poison):
    """With a pool the Triton backward takes dy to the conv output's gradient in its own kernel (not the shared
    backward's flat indices, zero fill and scatter), reading dy in its strides: expanded (y.sum()'s) or
    transposed; overlapping 3/2 windows."""
    crp = importlib.import_module("pydlx.reference.conv_relu_pool")
    monkeypatch.setattr(crp, "_flat_index", lambda *a: pytest.fail("the shared backward ran"))
    x, w, b, args = make(CASES[1].values[0], torch.float32)
    with pydlx.use_backend("triton"):
        y = pydlx.ops.conv_relu_pool2d(x, w, b, *args)
    g = (torch.ones(()).expand(y.shape) if layout == "expanded"
         else torch.randn(y.shape[:2] + y.shape[:1:-1]).transpose(2, 3))
    assert not g.is_contiguous()
    got = torch.autograd.grad(y, (x, w, b), g)
    up = [t.detach().double().requires_grad_() for t in (x, w, b)]
    want = torch.autograd.grad(ref.conv_relu_pool.conv_relu_pool2d(*up, *args), up, g.double())
    for a_, e_, name in zip(got, want, ["dx", "dw", "db"]):
        assert_close(a_, e_, dtype=torch.float32, name=name)


@pytest.mark.interpreter
def test_triton_keeps_the_weight_layout_until_the_weight_changes(monkeypatch, poison):
    """The kernel's copy of the weight ([R, R, C, K]) is made once and kept while the weight is unchanged; an
    in-place update, new data behind the parameter, or the weight's end drops it."""
    import gc

    tri = importlib.import_module("pydlx.triton.conv_relu_pool")
    common = importlib.import_module("pydlx.triton.common")
    made = []
    monkeypatch.setattr(tri, "_tap_major", lambda w: made.append(1) or w.permute(2, 3, 1, 0).contiguous())
    x, w, b, args = make(CASES[0].values[0], torch.float32)
    w = nn.Parameter(w.detach())

    def run():
        with pydlx.use_backend("triton"), torch.no_grad():
            y = pydlx.ops.conv_relu_pool2d(x, w, b, *args)
        assert_close(y, ref.conv_relu_pool.conv_relu_pool2d(x.detach(), w.detach(), b.detach(), *args),
                     dtype=torch.float32)
        return len(made)
    assert (run(), run()) == (1, 1)
    with torch.no_grad():
        w.mul_(0.5)  # (an optimizer step)
    assert (run(), run()) == (2, 2)
    w.data = w.data.clone() + 1
    assert run() == 3
    w.data.mul_(2)  # (no version counter sees it: the cache is cleared by hand, as documented)
    pydlx.clear_caches()
    assert run() == 4
    n = len(common._LAYOUTS)
    del w
    gc.collect()
    assert len(common._LAYOUTS) == n - 1


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_inference_writes_no_argmax(backend, monkeypatch, poison):
    """A call autograd does not record saves no pool argmax: the op's idx comes back empty (the Triton kernel
    stores none, the reference pools without indices), y as with it; a backward from such a forward raises
    torch's RuntimeError rather than route the gradient through nothing."""
    crp = importlib.import_module("pydlx.reference.conv_relu_pool")
    x, w, b, args = make(CASES[1].values[0], torch.float32)
    s, p, P, Q = args
    op = torch.ops.pydlx.conv_relu_pool2d_fwd.default
    want = ref.conv_relu_pool.conv_relu_pool2d(x.detach(), w.detach(), b.detach(), *args)
    with torch.no_grad():
        y, idx, z = op(x, w, b, s, p, P, Q, 0, False, "relu", False, backend, False)
        assert idx.numel() == 0 and z.numel() == 0
        assert_close(y, want, dtype=torch.float32)
        monkeypatch.setattr(crp, "_window_index", lambda *a: pytest.fail("an argmax was made for inference"))
        with pydlx.use_backend(backend):
            assert_close(pydlx.ops.conv_relu_pool2d(x, w, b, *args), want, dtype=torch.float32)
    y, _, _ = op(x, w, b, s, p, P, Q, 0, False, "relu", False, backend, False)
    with pytest.raises(RuntimeError, match="save_index=False"):
        y.sum().backward()


def test_saved_tensors_at_most_half_of_eager():
    """Counted with saved_tensors_hooks: pydlx saves x, w, the pooled y and int8 indices."""
    conv, pool = nn.Conv2d(32, 64, 3, padding=1), nn.MaxPool2d(2, 2)
    fused = pydlx.nn.ConvReLUPool2d.from_modules(conv, pool)
    x = torch.randn(8, 32, 16, 16, requires_grad=True)

    def saved_bytes(fn):
        return S.saved_bytes(lambda: fn(x))

    eager = saved_bytes(lambda t: pool(torch.relu(conv(t))))
    with pydlx.use_backend("reference"):  # the op with the eager forward inside: what auto runs on GPUs
        ours = saved_bytes(fused)
    assert ours <= eager / 2, f"pydlx saves {ours} bytes, eager {eager}"


BAD = [
    pytest.param(dict(groups=True), ValueError, "groups other than 1", id="groups"),
    pytest.param(dict(stride=5), ValueError, "stride must be an int in", id="stride"),
    pytest.param(dict(padding=6), ValueError, "padding must be an int in", id="padding"),
    pytest.param(dict(pool_size=4), ValueError, "pool_size must be an int in", id="pool"),
    pytest.param(dict(stride=(1, 2)), ValueError, "pair of equal ints", id="nonsquare-stride"),
    pytest.param(dict(rect=True), ValueError, "square kernel", id="nonsquare-kernel"),
    pytest.param(dict(intx=True), TypeError, "floating-point", id="int-input"),
    pytest.param(dict(small=True), ValueError, "larger than the padded input", id="too-small"),
    pytest.param(dict(pool_padding=2), ValueError, "pool_padding must be an int in", id="pool-padding"),
    pytest.param(dict(activation="silu"), ValueError, "non-decreasing activation", id="pool-after-silu"),
    pytest.param(dict(activation="swish"), ValueError, "activation", id="unknown-activation"),
    pytest.param(dict(pool_size=1, ceil_mode=True), ValueError, "no pool", id="no-pool-ceil"),
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
    kw = {k: v for k, v in bad.items() if k in ("stride", "padding", "pool_size", "pool_padding", "ceil_mode")}
    with pydlx.use_backend(backend), pytest.raises(exc, match=msg):
        pydlx.ops.conv_act_pool2d(x, w, b, activation=bad.get("activation", "relu"), **{"pool_size": 2, **kw})


@pytest.mark.parametrize("conv,pool,msg", [
    (nn.Conv2d(4, 4, 3, groups=2), nn.MaxPool2d(2), "groups"),
    (nn.Conv2d(4, 4, 3, dilation=2), nn.MaxPool2d(2), "dilation"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.MaxPool2d(2), "padding_mode"),
    (nn.Conv2d(4, 4, 3), nn.MaxPool2d(4), "pool 4"),
    (nn.Conv2d(4, 4, 3), nn.MaxPool2d(2, return_indices=True), "return_indices"),
    (nn.Conv2d(4, 4, (1, 7), padding=(0, 3)), nn.MaxPool2d(2), "non-square"),
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
        for bb in (b, None):
            torch.library.opcheck(torch.ops.pydlx.conv_relu_pool2d_fwd.default,
                                  (x, w, bb, *args, 0, False, "relu", False, "reference"))
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
        want = ref.conv_relu_pool.conv_relu_pool2d(xc.double(), w.detach().double(), None, *args)
        assert_close(y, want, dtype=dtype, name="channels_last nan",
                     baseline=ref.conv_relu_pool.conv_relu_pool2d(xc, w.detach(), None, *args))


@pytest.mark.gpu
def test_gpu_cuda_backend_refuses_wide_inputs():
    x = torch.randn(1, 9, 8, 8, device="cuda")
    with pydlx.use_backend("cuda"), pytest.raises(pydlx.BackendUnavailableError, match="at most 8 input channels"):
        pydlx.ops.conv_relu_pool2d(x, torch.randn(4, 9, 3, 3, device="cuda"))


# Conv2d -> activation [-> MaxPool2d with padding / ceil mode] (pydlx.ops.conv_act_pool2d): the zoo's blocks.
# (N, C, H, W, K, kernel, stride, padding, activation, pool, pool_stride, pool_padding, ceil_mode)
VARIANTS = [
    pytest.param((1, 3, 15, 17, 8, 7, 2, 3, "relu", 3, 2, 1, False), id="resnet-stem-7x7s2p3-pool3s2p1"),
    pytest.param((2, 4, 13, 11, 6, 3, 1, 1, "relu", 3, 2, 0, True), id="googlenet-3x3-pool3s2-ceil"),
    pytest.param((1, 3, 19, 21, 5, 7, 2, 0, "relu", 3, 2, 0, True), id="squeezenet-7x7s2-pool3s2-ceil"),
    pytest.param((1, 3, 10, 9, 5, 3, 1, 1, "sigmoid", 2, 2, 1, True), id="sigmoid-pool2p1-ceil"),
    pytest.param((1, 2, 8, 8, 3, 3, 1, 1, "tanh", 3, 1, 1, False), id="tanh-pool3s1p1"),
    pytest.param((2, 6, 7, 9, 5, 1, 1, 0, "relu", 1, 1, 0, False), id="nopool-1x1-relu"),
    pytest.param((2, 3, 9, 8, 7, 3, 2, 1, "silu", 1, 1, 0, False), id="nopool-3x3s2-silu-preact"),
    pytest.param((1, 5, 8, 8, 4, 3, 1, 1, None, 1, 1, 0, False), id="nopool-none"),
    pytest.param((2, 3, 12, 10, 6, 4, 2, 1, "leaky_relu(0.2)", 2, 2, 0, False), id="dcgan-4x4s2-leaky0.2-pool2"),
    pytest.param((1, 6, 7, 7, 9, 1, 1, 0, "hardswish", 1, 1, 0, False), id="mobilenet-1x1-hardswish"),
    pytest.param((1, 4, 9, 9, 5, 3, 1, 1, "mish", 1, 1, 0, False), id="nopool-mish"),
    pytest.param((1, 3, 11, 9, 4, 3, 2, 1, "relu6", 3, 2, 1, False), id="relu6-pool3s2p1"),
    pytest.param((1, 3, 9, 9, 4, 3, 1, 0, "elu(0.5)", 2, 2, 0, True), id="elu0.5-pool2-ceil"),
    pytest.param((1, 3, 8, 8, 4, 3, 1, 1, "hardsigmoid", 1, 1, 0, False), id="nopool-hardsigmoid"),
]


def make_variant(case, dtype, device="cpu", bias=True):
    N, C, H, W, K, R, s, p, act, P, Q, PP, ceil = case
    x, w, b, _ = make((N, C, H, W, K, R, s, p, 2, 2), dtype, device, bias)
    return x, w, b, dict(stride=s, padding=p, activation=act, pool_size=P, pool_stride=Q, pool_padding=PP,
                         ceil_mode=ceil)


def float64_chain(x, w, b, kw, dtype):
    """The float64 oracle: F.conv2d, tests/oracle.py's activation (for a kernel computing in ``dtype``: written
    independently of torch, whose own float64 hardsigmoid backward uses a float32 1/6), F.max_pool2d."""
    z = F.conv2d(x, w, b, stride=kw["stride"], padding=kw["padding"])
    y = oracle.activation(z, kw["activation"], dtype)
    if kw["pool_size"] == 1:
        return y
    return F.max_pool2d(y, kw["pool_size"], kw["pool_stride"], kw["pool_padding"], ceil_mode=kw["ceil_mode"])


def check_variant(x, w, b, kw, dtype, fn=None):
    fn = fn or (lambda *a: pydlx.ops.conv_act_pool2d(*a, **kw))
    eager_chain = lambda *a: ref.conv_relu_pool.conv_act_pool2d(*a, **kw)  # noqa: E731  (conv2d, act, max_pool2d)
    y = fn(x, w, b)
    assert y.shape == eager_chain(x, w, b).shape
    g = torch.randn(y.shape, dtype=dtype, device=x.device)
    got = fwd_bwd(fn, x, w, b, g)
    up = lambda t: t.detach().double().requires_grad_() if t is not None else None  # noqa: E731
    want = fwd_bwd(lambda *a: float64_chain(*a, kw, dtype), up(x), up(w), up(b), g.double())
    eager = fwd_bwd(eager_chain, x, w, b, g)
    for a_, e_, base, name in zip(got, want, eager, ["y", "dx", "dw", "db"]):
        assert a_.dtype == dtype
        assert_close(a_, e_, dtype=dtype, name=name, baseline=base)


@pytest.mark.parametrize("case", VARIANTS)
def test_variant_reference_backend_float64(case):
    x, w, b, kw = make_variant(case, torch.float64)
    with pydlx.use_backend("reference"):
        check_variant(x, w, b, kw, torch.float64)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[2]])
@pytest.mark.parametrize("case", VARIANTS)
def test_variant_triton_interpreter(case, dtype, poison):
    x, w, b, kw = make_variant(case, dtype)
    with pydlx.use_backend("triton"):
        check_variant(x, w, b, kw, dtype)


@pytest.mark.interpreter
def test_pool_window_of_minus_inf_takes_its_first_position_inside(poison):
    """A pool window whose every conv output is -inf (padded, ceil mode) routes its gradient to the first position
    inside the conv output, as max_pool2d does -- never to a padding position."""
    x = torch.full((1, 1, 5, 5), float("-inf"))
    w = torch.ones(2, 1, 1, 1)
    kw = dict(activation=None, pool_size=3, pool_stride=2, pool_padding=1, ceil_mode=True)
    want = ref.conv_relu_pool.conv_act_pool2d(x, w, None, **kw)
    for backend in ("reference", "triton"):
        xg = x.clone().requires_grad_()
        with pydlx.use_backend(backend):
            y = pydlx.ops.conv_act_pool2d(xg, w, None, **kw)
        assert torch.equal(y, want)
        xe = x.clone().requires_grad_()
        ref.conv_relu_pool.conv_act_pool2d(xe, w, None, **kw).sum().backward()
        y.sum().backward()
        assert torch.equal(torch.nan_to_num(xg.grad), torch.nan_to_num(xe.grad)), backend


def test_variant_saves_no_more_than_eager_without_a_pool():
    """Conv -> act without a pool: pydlx saves x, w and y (relu: the derivative from y) or z (silu), exactly what
    eager keeps (conv2d keeps x and w, relu its output, silu its input): no saving, and no more than eager --
    without a pool the gain is the conv output's round trip through memory, not saved bytes. With a pool the op
    saves the pooled map and int8 indices instead of the full maps and int64 indices."""
    x = torch.randn(4, 8, 12, 12, requires_grad=True)
    w = torch.randn(16, 8, 3, 3, requires_grad=True)

    def saved(fn):
        return S.saved_bytes(fn)

    act_map = 4 * 16 * 12 * 12 * 4
    for act, pool in (("relu", 1), ("silu", 1), ("relu", 3)):
        kw = dict(padding=1, activation=act, pool_size=pool, pool_stride=2 if pool > 1 else 1,
                  pool_padding=pool // 2, ceil_mode=pool > 1)
        eager = saved(lambda: ref.conv_relu_pool.conv_act_pool2d(x, w, None, **kw))
        with pydlx.use_backend("reference"):
            ours = saved(lambda: pydlx.ops.conv_act_pool2d(x, w, None, **kw))
        assert ours <= (eager if pool == 1 else eager - act_map), (act, pool, ours, eager)


def test_variant_opcheck_and_compile():
    x, w, b, kw = make_variant(VARIANTS[6].values[0], torch.float32)
    args = (kw["stride"], kw["padding"], kw["pool_size"], kw["pool_stride"], kw["pool_padding"], kw["ceil_mode"])
    for act, save, bb in (("silu", True, b), ("relu", False, None), ("none", False, b)):
        torch.library.opcheck(torch.ops.pydlx.conv_relu_pool2d_fwd.default, (x, w, bb, *args, act, save, "reference"))
    kw3 = dict(make_variant(VARIANTS[0].values[0], torch.float32)[3])
    x3 = torch.randn(2, 3, 15, 17)
    torch.library.opcheck(torch.ops.pydlx.conv_relu_pool2d_fwd.default,
                          (x3, torch.randn(8, 3, 7, 7), None, 2, 3, 3, 2, 1, False, "relu", False, "reference"))
    torch.library.opcheck(torch.ops.pydlx.conv_relu_pool2d_fwd.default,  # (inference: no argmax saved)
                          (x3, torch.randn(8, 3, 7, 7), None, 2, 3, 3, 2, 1, False, "relu", False, "reference", False))
    torch._dynamo.reset()
    with pydlx.use_backend("reference"):
        fn = lambda x, w, b: pydlx.ops.conv_act_pool2d(x, w, b, **kw)  # noqa: E731
        assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(x, w, b), fn(x, w, b), name="compiled")
        fn3 = lambda x, w: pydlx.ops.conv_act_pool2d(x, w, None, **kw3)  # noqa: E731
        w3 = torch.randn(8, 3, 7, 7)
        assert_close(torch.compile(fn3, fullgraph=True, backend="aot_eager")(x3, w3), fn3(x3, w3), name="compiled3")


def test_variant_under_autocast_casts_like_conv2d():
    x, w, b, kw = make_variant(VARIANTS[0].values[0], torch.float32)
    with pydlx.use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):
        y = pydlx.ops.conv_act_pool2d(x, w, b, **kw)
        want = ref.conv_relu_pool.conv_act_pool2d(x, w, b, **kw)
    assert y.dtype == want.dtype == torch.bfloat16
    assert_close(y, want, dtype=torch.bfloat16, name="autocast")


def test_relu_module_takes_pool_padding_and_ceil_mode():
    conv, pool = nn.Conv2d(3, 6, 7, 2, 3, dtype=torch.float64), nn.MaxPool2d(3, 2, 1, ceil_mode=True)
    fused = pydlx.nn.ConvReLUPool2d.from_modules(conv, pool)
    x = torch.randn(2, 3, 23, 19, dtype=torch.float64)
    with pydlx.use_backend("reference"):
        assert_close(fused(x), pool(torch.relu(conv(x))), name="module")
    assert "ceil_mode=True" in repr(fused) and "pool_padding=1" in repr(fused)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", VARIANTS)
def test_gpu_variant_against_reference(case, dtype, backend, poison):
    x, w, b, kw = make_variant(case, dtype, device="cuda")
    with pydlx.use_backend(backend):
        check_variant(x, w, b, kw, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", VARIANTS)
def test_gpu_cuda_variant_against_reference(case, dtype, poison):
    x, w, b, kw = make_variant(case, dtype, device="cuda")
    with pydlx.use_backend("cuda"):
        check_variant(x, w, b, kw, dtype)


def test_errors_name_the_op_the_user_called():
    """Regression: every conv entry point's argument errors named pydlx.ops.conv_relu_pool2d."""
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    bn = nn.BatchNorm2d(4).eval().requires_grad_(False)  # (nothing saved for backward: the fold runs)
    calls = {"pydlx.ops.conv_relu_pool2d": lambda: pydlx.ops.conv_relu_pool2d(x, w, stride=9),
             "pydlx.ops.conv_act_pool2d": lambda: pydlx.ops.conv_act_pool2d(x, w, stride=9),
             "pydlx.ops.conv_bn_act_pool2d": lambda: pydlx.ops.conv_bn_act_pool2d(
                 x, w, None, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, stride=9),
             "pydlx.nn.ConvReLUPool2d": lambda: pydlx.nn.ConvReLUPool2d(3, 4, 3, stride=9)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"^{name}: stride must be an int in \[1, 4\], got 9"):
            call()
