"""32-bit offsets: every Triton launcher either addresses tensors past 2^31 elements correctly or refuses before
launching, with a reason (BackendUnavailableError under a forced backend; ``auto`` then runs another backend).

The rules are checked at the launchers' decisions, on shapes far past 2^31 elements, without allocating them
(expanded zero-stride tensors stand in for the big ones).
"""
import pytest
import torch

import pydlx
from pydlx.triton import conv_relu_pool as tri_conv
from pydlx.triton import linear as tri_linear
from pydlx.triton import lstm as tri_lstm
from pydlx.triton import mlp as tri_mlp

LIMIT = 2**31


def test_lstm_step_offsets_are_64_bit_and_one_step_must_fit():
    # the case: T=4096, B=256, H=1024 puts t * 4BH at 4.3e9: the step offset is 64-bit, so it runs
    assert tri_lstm.why_too_large(256, 1024, 1024) is None
    assert 4096 * 4 * 256 * 1024 > LIMIT
    why = tri_lstm.why_too_large(600_000, 1024, 1024)  # one step alone is 2.5e9 elements
    assert why is not None and "32-bit" in why


@pytest.mark.interpreter
def test_forced_triton_lstm_refuses_a_step_past_2_31_before_launching():
    B, H = 600_000, 1024
    x = torch.zeros(1, 1, 1).expand(1, B, 1)
    state = torch.zeros(1, 1, H).expand(1, B, H)  # no 2.4e9-element buffers: zero strides
    weights = [torch.zeros(4 * H, 1), torch.zeros(4 * H, H)]
    with pydlx.use_backend("triton"), pytest.raises(pydlx.BackendUnavailableError, match="32-bit offsets"):
        pydlx.ops.lstm(x, weights, (state, state), bias=False)


def test_conv_rule():
    assert tri_conv.why_too_large((8, 64, 224, 224), (64 * 224 * 224, 224 * 224, 224, 1), 64, 3, 112, 112) is None
    # one 3 x 30000 x 30000 image in, 64 x 15000 x 15000 out: 1.4e10 elements in one image
    why = tri_conv.why_too_large((1, 3, 30000, 30000), (3 * 30000 * 30000, 30000 * 30000, 30000, 1), 64, 3,
                                 15000, 15000)
    assert why is not None and "32-bit" in why


@pytest.mark.interpreter
def test_forced_triton_conv_refuses_an_image_past_2_31_before_launching():
    x = torch.zeros(1, 1, 1, 1).expand(1, 3, 30000, 30000)
    w, b = torch.zeros(64, 3, 3, 3), torch.zeros(64)
    with pydlx.use_backend("triton"), pytest.raises(pydlx.BackendUnavailableError, match="32-bit offsets"):
        pydlx.ops.conv_relu_pool2d(x, w, b, stride=1, padding=1)


@pytest.mark.parametrize("n", [1, 7, 256, 4096, 65536, tri_linear.MAX_STRIDE])
def test_linear_dw_split_keeps_its_32_bit_offset_in_range(n):
    """The dw GEMM walks its split's rows with a 32-bit offset into dy (rows n elements apart)."""
    rows = tri_linear.max_split_rows(n)
    assert rows % 64 == 0 and (rows + 64) * n + 256 < LIMIT
    for m in (10**6, 2**31, 2**40):
        assert tri_linear.split_rows(n, 256, m, torch.device("cpu")) <= rows
    assert tri_linear.supports(pydlx.registry.LinearCall(torch.float32, False, 2, 8, tri_linear.MAX_STRIDE + 1),
                               None) is not None


def test_mlp_rule():
    assert tri_mlp.why_cannot([784, 128, 64]) is None
    why = tri_mlp.why_cannot([tri_mlp.MAX_STRIDE + 1, 64, 10])
    assert why is not None and "32-bit" in why


@pytest.mark.interpreter
def test_mlp_input_with_a_row_stride_past_the_limit_is_read_correctly():
    """A view whose rows are further apart than 32-bit tile offsets reach is made contiguous first."""
    base = torch.randn(2, tri_mlp.MAX_STRIDE + 64)
    x = base[:, :5]
    ws, bs = [torch.randn(6, 5), torch.randn(3, 6)], [torch.randn(6), None]
    with pydlx.use_backend("triton"):
        got = pydlx.ops.mlp(x, ws, bs, activation="tanh")
    want = torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, ws[0], bs[0])), ws[1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
