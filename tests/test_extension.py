"""The C++/CUDA extension pydlx._C builds in the test suite (against a CUDA build of torch), so a broken .cu file
fails CI, and its ops register with the right schemas and dispatch keys. On a GPU its kernels are checked
against the reference (tests/test_linear.py runs the `cuda` backend end to end)."""
import os
import re
import subprocess

import pytest
import torch

import pydlx
from pydlx import _ext
from pydlx.activations import ACTIVATIONS, forward as activation_forward, parse_activation, saves_preact
from pydlx.reference.linear import activation_backward
from tolerance import assert_close

pytestmark = pytest.mark.slow  # (the build: about a minute on 2 cores)

# the same folder as first-use builds when PYDLX_BUILD_DIR is set (scripts/gpu_check.sh): one build, not two
BUILD_DIR = os.environ.get("PYDLX_BUILD_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "jit-test")


@pytest.fixture(scope="module")
def built():
    if _ext.prebuilt():  # (the GPU check with a binary wheel: its library, not a second copy of the same ops)
        assert _ext.load(), _ext.status()
        return _ext.prebuilt()
    reason = _ext.why_cannot_build()
    assert reason is None, f"the test suite must build pydlx._C, but cannot: {reason}"
    path = _ext.jit_build(BUILD_DIR)
    assert os.path.exists(path)
    return path


def test_extension_builds_and_registers_ops(built):
    for name, schema in [("act_fwd_cuda", "pydlx::act_fwd_cuda(Tensor z, str activation, float alpha) -> Tensor"),
                         ("act_bwd_cuda", "pydlx::act_bwd_cuda(Tensor grad, Tensor saved, str activation, float alpha) "
                                          "-> Tensor")]:
        op = getattr(torch.ops.pydlx, name)
        assert str(op.default._schema) == schema
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CUDA")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CPU")
    op = torch.ops.pydlx.mlp_fwd_cuda.default
    assert str(op._schema) == ("pydlx::mlp_fwd_cuda(Tensor input, Tensor[] weights, Tensor[] biases, bool[] has_bias, "
                               "str activation, float alpha, str last_activation, float last_alpha) -> Tensor")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")
    op = torch.ops.pydlx.conv_relu_pool2d_fwd_cuda.default
    assert str(op._schema) == ("pydlx::conv_relu_pool2d_fwd_cuda(Tensor input, Tensor weight, Tensor? bias, "
                               "int stride, int padding, int pool_size, int pool_stride, int pool_padding, "
                               "bool ceil_mode, str activation, float alpha, bool save_z) -> (Tensor, Tensor, Tensor)")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")
    for name, schema in [
            ("lstm_seq_fwd_cuda", "pydlx::lstm_seq_fwd_cuda(Tensor G, Tensor w_hh, Tensor h0, Tensor c0, "
                                  "Tensor? lengths, bool reverse, bool save) -> (Tensor, Tensor, Tensor, Tensor)"),
            ("lstm_seq_bwd_cuda", "pydlx::lstm_seq_bwd_cuda(Tensor dy, Tensor dh_n, Tensor dc_n, Tensor acts, "
                                  "Tensor cs, Tensor w_hh, Tensor? lengths, bool reverse) -> (Tensor, Tensor, Tensor)")]:
        op = getattr(torch.ops.pydlx, name).default
        assert str(op._schema) == schema
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")
    assert pydlx.backends()["cuda"].startswith("available")


def test_lstm_shared_memory_has_one_home(built):
    """pydlx/cuda/lstm.py asks the extension for the persistent LSTM's shared memory (the launches size themselves by
    the same C++ function). H = 768 in bf16 on 132 SMs: 6 units a block; forward 2*4*6*768 + 4*8*768 = 61440 bytes,
    backward 2*6*3072 + 4*4*3072 = 86016: the larger."""
    from pydlx.cuda.lstm import smem_bytes

    assert torch.ops.pydlx.lstm_smem_bytes(768, 2, 132) == 86016 == smem_bytes(768, 2, 132)
    assert smem_bytes(1, 4, 132) == 4 * 4 * 4 + 4 * 8 * 4  # one unit: its 4 W_hh rows of 4 (H padded), 8 rows of h
    with pytest.raises(RuntimeError, match="sms > 0"):
        smem_bytes(8, 2, 0)


def test_the_extension_uses_only_the_stable_abi(built):
    """pydlx._C reaches torch only through PyTorch's stable C ABI (csrc/torch_stable.h: aoti_torch_* / torch_* C
    functions), never a C++ symbol of torch, c10 or ATen, which would tie the binary to the torch it was built with:
    so one build loads under every torch from its target on (tests/test_packaging.py: the binary wheel)."""
    out = subprocess.run(["nm", "-D", "--undefined-only", "-C", built], capture_output=True, text=True, check=True)
    cxx = [line for line in out.stdout.splitlines() if re.search(r"\b(c10|at|torch|caffe2)::", line)]
    assert not cxx, cxx[:10]
    assert any("aoti_torch_" in line for line in out.stdout.splitlines())


def test_extension_ops_reject_cpu_tensors(built):
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.pydlx.act_fwd_cuda(torch.randn(4), "relu", 0.0)


def test_sources_are_all_built():
    names = sorted(os.path.basename(s) for s in _ext.sources())
    assert names == ["conv_relu_pool.cu", "linear.cu", "lstm.cu", "mlp.cu"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("act", [a for a in ACTIVATIONS if a is not None] + ["leaky_relu(0.2)", "elu(0.5)"])
@pytest.mark.parametrize("n", [1, 7, 4099, 1 << 20])
def test_gpu_activation_kernels(act, dtype, n, built, poison):
    z = torch.randn(n, device="cuda", dtype=dtype) * 3
    name, alpha = parse_activation(act)
    y = torch.ops.pydlx.act_fwd_cuda(z, name, alpha)
    assert_close(y, activation_forward(z.double(), act), dtype=dtype, name="act_fwd_cuda",
                 baseline=activation_forward(z, act))
    g = torch.randn_like(z)
    saved = z if saves_preact(act) else activation_forward(z, act)
    dz = torch.ops.pydlx.act_bwd_cuda(g, saved, name, alpha)
    assert_close(dz, activation_backward(g.double(), saved.double(), act), dtype=dtype, name="act_bwd_cuda",
                 baseline=activation_backward(g, saved, act))
    # a misaligned view takes the scalar path
    if n > 1:
        assert_close(torch.ops.pydlx.act_fwd_cuda(z[1:], name, alpha), activation_forward(z[1:].double(), act),
                     dtype=dtype, name="act_fwd_cuda misaligned", baseline=activation_forward(z[1:], act))
