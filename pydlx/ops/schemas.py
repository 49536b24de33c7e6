"""Every pydlx op's schema, in one place (torch.library's schema language). The implementations, fake (meta)
implementations and autograd formulas are registered by pydlx/ops/<family>.py; the C++/CUDA extension defines its
own ``*_cuda`` ops in csrc/.

Conventions: each op takes the backend that runs it last (``str backend``: chosen by the dispatcher, pydlx/_backend.py,
before the op is called, so that torch.compile sees one opaque op, and passed on to the backward op, which runs where
the forward ran); activations are canonical specs (pydlx/activations.py), "none" for none; a tensor a forward saves
only for its backward is a non-differentiable output; ``need_*`` flags name the gradients a backward must compute
(the others come back as empty tensors).
"""
from __future__ import annotations

import torch

LIB = torch.library.Library("pydlx", "FRAGMENT")

SCHEMAS = {
    # ---- linear: y = act(input @ weight.T + bias), any leading dims; z = the pre-activation when ``save_preact``
    # (for an activation whose derivative needs it), else empty.
    "linear_fwd": "(Tensor input, Tensor weight, Tensor? bias, str activation, bool save_preact, str backend) "
                  "-> (Tensor y, Tensor z)",
    # (dx, dw, db); ``saved`` is z or y (pydlx/activations.py ``saves_preact``), empty with no activation
    "linear_bwd": "(Tensor grad, Tensor input, Tensor weight, Tensor saved, str activation, bool has_bias, "
                  "bool need_dx, bool need_dw, str backend) -> (Tensor dx, Tensor dw, Tensor db)",

    # ---- mlp: Linear -> act -> ... -> Linear -> last_activation in one kernel; ``biases`` lists the layers that have
    # one (``has_bias`` says which); H = the hidden layers' outputs side by side, Z = every layer's pre-activation
    # (only when an activation's derivative needs it): saved for backward when ``save``, else empty. ``has_bias`` is
    # int[] (0 / 1), not bool[]: torch.jit.trace cannot record a list of bools.
    "mlp_fused": "(Tensor input, Tensor[] weights, Tensor[] biases, int[] has_bias, str activation, "
                 "str last_activation, bool save, str backend) -> (Tensor y, Tensor H, Tensor Z)",
    "mlp_fused_bwd": "(Tensor grad, Tensor input, Tensor[] weights, int[] has_bias, Tensor y, Tensor H, Tensor Z, "
                     "str activation, str last_activation, bool need_dx, str backend) "
                     "-> (Tensor dx, Tensor[] dweights, Tensor[] dbiases)",

    # ---- conv_relu_pool: y = MaxPool2d(act(Conv2d(input))) [N, K, HP, WP] (pool_size 1: no pool); idx: int8, each
    # max's position in its window (empty without a pool, and unless save_index: inference writes none); z: the
    # pre-activation (no pool, and an activation whose derivative needs it; else empty).
    "conv_relu_pool2d_fwd": "(Tensor input, Tensor weight, Tensor? bias, int stride, int padding, int pool_size, "
                            "int pool_stride, int pool_padding, bool ceil_mode, str activation, bool save_preact, "
                            "str backend, bool save_index=True) -> (Tensor y, Tensor idx, Tensor z)",
    "conv_relu_pool2d_bwd": "(Tensor grad, Tensor input, Tensor weight, Tensor y, Tensor idx, Tensor z, bool has_bias, "
                            "int stride, int padding, int pool_size, int pool_stride, int pool_padding, "
                            "str activation, bool need_input, bool need_weight, str backend) "
                            "-> (Tensor dx, Tensor dw, Tensor db)",

    # ---- a layer -> BatchNorm in training mode (batch statistics) -> act [-> MaxPool2d]: y, and the per-channel batch
    # mean and invstd = 1 / sqrt(biased variance + eps) (fp32 for 16-bit input; the caller moves the running
    # statistics). ``layer`` is "linear" (no layer_args) or "conv" (layer_args = [stride, padding, pool_size,
    # pool_stride, pool_padding, ceil_mode]); only the input is saved: backward recomputes the layer's output
    # (pydlx/ops/batchnorm.py).
    "layer_bn_train_fwd": "(Tensor input, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, float eps, "
                          "str layer, int[] layer_args, str activation, str backend) "
                          "-> (Tensor y, Tensor mean, Tensor invstd)",
    "layer_bn_train_bwd": "(Tensor grad, Tensor input, Tensor weight, Tensor? bias, Tensor? bn_weight, "
                          "Tensor? bn_bias, Tensor mean, Tensor invstd, float eps, str layer, int[] layer_args, "
                          "str activation, str backend, bool need_input, bool need_weight, bool need_bias) "
                          "-> (Tensor dx, Tensor dw, Tensor db, Tensor dbn_weight, Tensor dbn_bias)",

    # ---- lstm: one layer in one direction, time-major x [T, B, I]; bias = b_ih + b_hh; w_hr [P, H] a projection;
    # lengths int32 [B] (packed input); hs, cs [T+1, B, *], acts [T, B, 4H] (gate activations) and rs [T, B, H]
    # (with a projection, the unprojected o tanh(c)) are saved for backward (pydlx/triton/lstm.py has the layouts).
    "lstm_layer_fwd": "(Tensor x, Tensor w_ih, Tensor w_hh, Tensor? bias, Tensor? w_hr, Tensor h0, Tensor c0, "
                      "Tensor? lengths, bool reverse, bool save, str backend) "
                      "-> (Tensor y, Tensor h_n, Tensor c_n, Tensor hs, Tensor cs, Tensor acts, Tensor rs)",
    "lstm_layer_bwd": "(Tensor dy, Tensor dh_n, Tensor dc_n, Tensor x, Tensor w_ih, Tensor w_hh, Tensor? w_hr, "
                      "Tensor hs, Tensor cs, Tensor acts, Tensor rs, Tensor? lengths, bool reverse, bool has_bias, "
                      "bool need_input, bool need_weight, str backend) "
                      "-> (Tensor dx, Tensor dw_ih, Tensor dw_hh, Tensor dw_hr, Tensor db, Tensor dh0, Tensor dc0)",
}

for _name, _schema in SCHEMAS.items():
    LIB.define(_name + _schema)


def op(name: str) -> torch._ops.OpOverload:
    """The op ``pydlx::<name>`` (its one overload)."""
    return getattr(torch.ops.pydlx, name).default
