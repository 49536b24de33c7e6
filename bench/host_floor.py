"""What any implementation of the op path can reach on a CPU: the host cost of one training call (forward and
backward, tiny shapes) of Linear -> ReLU and of a 3-layer ReLU MLP, for the path pydlx takes and for the two ways of
moving it into C++, against the eager chain and against a floor that does no math at all.

Providers (each row's forward and backward compute the same tensors; checked before timing):
  * eager           the chain as written (nn.Linear / nn.Sequential and torch.relu);
  * pydlx           ``pydlx.ops.linear`` / ``pydlx.ops.mlp`` with the reference backend forced: the path a GPU call
                    takes (entry point, kept plan, the op's generated ``autograd.Function``), eager math inside;
  * c++ autograd, python impl   a ``TORCH_LIBRARY`` op whose Autograd kernel is a C++ ``torch::autograd::Function``
                    calling forward and backward implementations registered from Python (what moving only the
                    autograd into C++ gives: a GPU backend's implementations are Python, Triton launches);
  * python Function           a ``torch.autograd.Function`` written for this op alone, calling the same Python
                    implementations directly (what a per-op specialised Python path gives, without C++);
  * c++ all         the same op with the ATen math written in C++ too (the bound of moving everything into C++;
                    not what a Triton backend can do);
  * floor           (MLP) one C++ node that does no math: a fresh output forward, fresh gradients backward. What
                    is left is ``y.sum()``, ``backward()``, the autograd engine and the seven gradient
                    accumulations, which every provider pays.

    python bench/host_floor.py        # builds a small C++ library with ninja (g++, ~40 s on 2 cores; kept in
                                      # the temp directory for the next run)

100 calls a sample, providers interleaved over 25 rounds (pydlx._timing.measure), 1 thread; median (p20-p80) per
call in microseconds, and each provider's median over eager's.
"""
import os
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

import pydlx
from pydlx._ext import clear_stale_lock
from pydlx._timing import measure

CPP = r"""
#include <torch/torch.h>
#include <torch/library.h>
#include <ATen/core/dispatch/Dispatcher.h>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;

struct LinReluAll : public torch::autograd::Function<LinReluAll> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const Tensor& b) {
    auto y = at::relu(at::linear(x, w, b));
    ctx->save_for_backward({x, w, y});
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    auto s = ctx->get_saved_variables();
    auto dz = at::threshold_backward(g[0], s[2], 0);
    return {at::mm(dz, s[1]), at::mm(dz.t(), s[0]), dz.sum(0)};
  }
};

struct LinReluPy : public torch::autograd::Function<LinReluPy> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const Tensor& b) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("host_floor::lin_fwd", "")
        .typed<Tensor(const Tensor&, const Tensor&, const Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto y = op.call(x, w, b);
    ctx->save_for_backward({x, w, y});
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("host_floor::lin_bwd", "")
        .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>();
    auto s = ctx->get_saved_variables();
    auto r = op.call(g[0], s[0], s[1], s[2]);
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
  }
};

struct MlpAll : public torch::autograd::Function<MlpAll> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w0, const Tensor& b0,
                        const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2) {
    auto h1 = at::relu(at::linear(x, w0, b0));
    auto h2 = at::relu(at::linear(h1, w1, b1));
    ctx->save_for_backward({x, w0, w1, w2, h1, h2});
    return at::linear(h2, w2, b2);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    auto s = ctx->get_saved_variables();
    auto dz2 = g[0];
    auto dz1 = at::threshold_backward(at::mm(dz2, s[3]), s[5], 0);
    auto dz0 = at::threshold_backward(at::mm(dz1, s[2]), s[4], 0);
    return {at::mm(dz0, s[1]), at::mm(dz0.t(), s[0]), dz0.sum(0), at::mm(dz1.t(), s[4]), dz1.sum(0),
            at::mm(dz2.t(), s[5]), dz2.sum(0)};
  }
};

struct MlpNull : public torch::autograd::Function<MlpNull> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w0, const Tensor& b0,
                        const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2) {
    ctx->save_for_backward({x, w0, b0, w1, b1, w2, b2});
    return at::empty({x.size(0), w2.size(0)}, x.options());
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    variable_list out;
    for (auto& t : ctx->get_saved_variables()) out.push_back(at::empty_like(t));
    return out;
  }
};

TORCH_LIBRARY(host_floor, m) {
  m.def("lin_relu_all(Tensor x, Tensor w, Tensor b) -> Tensor");
  m.def("lin_relu_py(Tensor x, Tensor w, Tensor b) -> Tensor");
  m.def("lin_fwd(Tensor x, Tensor w, Tensor b) -> Tensor");
  m.def("lin_bwd(Tensor g, Tensor x, Tensor w, Tensor y) -> (Tensor, Tensor, Tensor)");
  m.def("mlp_all(Tensor x, Tensor w0, Tensor b0, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> Tensor");
  m.def("mlp_null(Tensor x, Tensor w0, Tensor b0, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> Tensor");
}

TORCH_LIBRARY_IMPL(host_floor, Autograd, m) {
  m.impl("lin_relu_all", [](const Tensor& x, const Tensor& w, const Tensor& b) { return LinReluAll::apply(x, w, b); });
  m.impl("lin_relu_py", [](const Tensor& x, const Tensor& w, const Tensor& b) { return LinReluPy::apply(x, w, b); });
  m.impl("mlp_all", [](const Tensor& x, const Tensor& w0, const Tensor& b0, const Tensor& w1, const Tensor& b1,
                       const Tensor& w2, const Tensor& b2) { return MlpAll::apply(x, w0, b0, w1, b1, w2, b2); });
  m.impl("mlp_null", [](const Tensor& x, const Tensor& w0, const Tensor& b0, const Tensor& w1, const Tensor& b1,
                        const Tensor& w2, const Tensor& b2) { return MlpNull::apply(x, w0, b0, w1, b1, w2, b2); });
}
"""


def _lin_fwd(x, w, b):
    return torch.relu(F.linear(x, w, b))


def _lin_bwd(g, x, w, y):
    dz = torch.ops.aten.threshold_backward(g, y, 0)
    return torch.mm(dz, w), torch.mm(dz.t(), x), dz.sum(0)


class _LinReluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        y = _lin_fwd(x, w, b)
        ctx.save_for_backward(x, w, y)
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, y = ctx.saved_tensors
        return _lin_bwd(g, x, w, y)


def _build() -> None:
    from torch.utils.cpp_extension import load_inline

    # one build per torch (its headers and flags differ); a lock left by a build that died would make torch's build
    # wait for it forever: removed once older than any build of this library takes
    build_dir = os.path.join(tempfile.gettempdir(), f"pydlx_host_floor_torch{torch.__version__.split('+')[0]}")
    os.makedirs(build_dir, exist_ok=True)
    clear_stale_lock(build_dir, 600)
    load_inline("pydlx_host_floor", cpp_sources=[CPP], build_directory=build_dir, is_python_module=False,
                extra_cflags=["-O2"])
    lib = torch.library.Library("host_floor", "IMPL")  # the Python implementations the C++ autograd calls
    lib.impl("lin_fwd", _lin_fwd, "CPU")
    lib.impl("lin_bwd", _lin_bwd, "CPU")
    _build.lib = lib  # (kept alive: the registrations live as long as the Library object)


def _cases():
    ops = torch.ops.host_floor
    lin = nn.Linear(16, 8)
    seq = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    ws, bs = [seq[i].weight for i in (0, 2, 4)], [seq[i].bias for i in (0, 2, 4)]
    wb = [t for pair in zip(ws, bs) for t in pair]
    return {
        "Linear -> ReLU, 4x16->8": {
            "eager": lambda t: torch.relu(lin(t)),
            "pydlx": lambda t: pydlx.ops.linear(t, lin.weight, lin.bias, "relu"),
            "c++ autograd, python impl": lambda t: ops.lin_relu_py(t, lin.weight, lin.bias),
            "python Function": lambda t: _LinReluFunction.apply(t, lin.weight, lin.bias),
            "c++ all": lambda t: ops.lin_relu_all(t, lin.weight, lin.bias)},
        "3-layer MLP, 4x16-16-16-8": {
            "eager": seq,
            "pydlx": lambda t: pydlx.ops.mlp(t, ws, bs, "relu"),
            "c++ all": lambda t: ops.mlp_all(t, *wb),
            "floor (no math)": lambda t: ops.mlp_null(t, *wb)},
    }, [lin.weight, lin.bias, *wb]


def main(calls: int = 100, rounds: int = 25) -> None:
    torch.set_num_threads(1)
    _build()
    cases, params = _cases()
    x = torch.randn(4, 16)

    def step(f):
        xx = x.detach().requires_grad_()
        y = f(xx)
        y.sum().backward()
        return y, xx.grad

    fns = {}
    with pydlx.use_backend("reference"):
        for case, providers in cases.items():
            want = step(providers["eager"])
            for name, f in providers.items():
                if not name.startswith("floor"):
                    got = step(f)
                    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want)), (case, name)

                def run(f=f):
                    for _ in range(calls):
                        step(f)
                fns[(case, name)] = run
        for p in params:
            p.grad = None
        timed = measure(fns, torch.device("cpu"), rep=rounds)
    for case in cases:
        eager = timed[(case, "eager")][0]
        print(case)
        for (c, name), (med, p20, p80) in timed.items():
            if c == case:
                f = 1e3 / calls
                print(f"  {name:28s} {med * f:7.1f} us ({p20 * f:.1f}-{p80 * f:.1f})  {med / eager:.2f}x")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100, help="calls a sample (default 100)")
    parser.add_argument("--rounds", type=int, default=25, help="interleaved rounds (default 25)")
    args = parser.parse_args()
    main(args.calls, args.rounds)
