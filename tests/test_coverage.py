"""python -m pydlx.coverage: the coverage measure on a model whose answer is known, that its checks
fail when the optimized model differs, and --check over a representative set of torchvision's classification zoo
(the whole zoo is the coverage command's, README "Coverage on the torchvision zoo": too slow for CI)."""
import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pydlx
from pydlx import coverage


class _Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)  # the BatchNorm folded: fused in eval mode only
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 8)  # fc1 -> relu -> fc2: one pydlx.ops.mlp call
        self.fc2 = nn.Linear(8, 6)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class _Toy(nn.Module):
    """Its own forward branches on a tensor's value (torch.fx cannot trace it): its children's forwards are fused
    one by one (install_tree), under their own names."""

    def __init__(self):
        super().__init__()
        self.stem = _Stem()
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))  # module swap
        self.plain = nn.Conv2d(4, 4, 1)  # no pattern: never fused
        self.drop = nn.Dropout(0.5)
        self.head = _Head()
        self.out = nn.Sequential(nn.Linear(6, 5))  # kept: no activation follows it

    def forward(self, x):
        x = self.block(self.stem(x))  # 16 -> 8 -> 4
        if x.sum() > 1e9:
            x = x * 2
        x = self.drop(torch.flatten(self.plain(x), 1))
        return self.out(self.head(x))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: at these small inputs a second one gains little, and on a CPU shared with other work two
    threads per process spin against each other (this file, on a loaded 2-core machine: ~1 min with one thread, over 6
    minutes with two)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _toy_row(check=True, seed=0, rtol=coverage.RTOL, rejudge=False):
    def build():
        torch.manual_seed(seed)
        return _Toy().eval()

    model = build()
    x, target = torch.randn(2, 3, 16, 16), torch.tensor([1, 3])
    row = coverage.Row("toy")
    coverage.analyse(row, model, x, target, check=check, rebuild=build if rejudge else None, rtol=rtol)
    return row


def test_coverage_of_a_model_with_known_answer():
    row = _toy_row()
    assert row.ok, row
    # FLOPs of each Conv2d / Linear call (2 x multiply-adds), counted on the original model
    flops = {"stem.conv": 2 * 2 * 4 * 16 * 16 * 3 * 9, "block.0": 2 * 2 * 4 * 8 * 8 * 4 * 9,
             "plain": 2 * 2 * 4 * 4 * 4 * 4, "head.fc1": 2 * 2 * 8 * 64, "head.fc2": 2 * 2 * 6 * 8,
             "out.0": 2 * 2 * 5 * 6}
    total = sum(flops.values())
    assert (row.calls, row.flops) == (6, total)
    in_eval = ["stem.conv", "block.0", "head.fc1", "head.fc2"]
    assert row.eval_covered == 4
    assert row.eval_share == pytest.approx(sum(flops[f] for f in in_eval) / total)
    # training mode: the BatchNorm uses batch statistics, and stem.conv's block becomes the op's training form
    assert row.train_share == pytest.approx(sum(flops[f] for f in in_eval) / total)
    assert row.kept_share == pytest.approx(flops["out.0"] / total)
    assert row.fused == collections.Counter({"Conv+BN+ReLU+MaxPool": 1, "Conv+ReLU+MaxPool": 1, "MLP(2 Linear)": 1})
    assert row.kept == collections.Counter({("Linear", "no activation follows it"): 1})
    assert len(row.notes) == 1 and row.notes[0].startswith("the model not traced (")
    assert set(row.checks) == {"eval", "train", "grad", "step", "eval2", "train2"}
    assert max(row.checks.values()) <= coverage.RTOL
    assert row.disagree == [] and row.failures == []


def test_flops_of_weights_used_functionally_and_of_multihead_attention():
    class Attn(nn.Module):  # Swin's way: the Linear modules' weights passed to F.linear, the modules never called
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.sep = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)

        def forward(self, x):
            y = F.linear(F.linear(x, self.qkv.weight, self.qkv.bias)[..., :8], self.proj.weight)
            y = self.mha(y, y, y, need_weights=False)[0]  # (in eval mode without grad: its fused inference path)
            return self.sep(y.transpose(0, 1), torch.randn(7, 3, 4), torch.randn(7, 3, 6))[0]

    for grad in (False, True):
        with torch.set_grad_enabled(grad), coverage.count_flops(Attn().eval()) as flops:
            Attn().eval()(torch.randn(3, 5, 8))  # (another instance: its weights count as nobody's)
        assert flops == {coverage.UNOWNED: 2 * 15 * 8 * 24 + 2 * 15 * 8 * 8 + 2 * 3 * 15 * 8 * 8 + 2 * 15 * 8 * 8
                         + 2 * 15 * 8 * 8 + 2 * 21 * 8 * 4 + 2 * 21 * 8 * 6 + 2 * 15 * 8 * 8}
        model = Attn().eval()
        with torch.set_grad_enabled(grad), coverage.count_flops(model) as flops:
            model(torch.randn(3, 5, 8))
        assert flops == {"qkv": 2 * 15 * 8 * 24, "proj": 2 * 15 * 8 * 8, "mha.in_proj_weight": 2 * 3 * 15 * 8 * 8,
                         "mha.out_proj": 2 * 15 * 8 * 8, "sep.q_proj_weight": 2 * 15 * 8 * 8,
                         "sep.k_proj_weight": 2 * 21 * 8 * 4, "sep.v_proj_weight": 2 * 21 * 8 * 6,
                         "sep.out_proj": 2 * 15 * 8 * 8}


def test_covered_by_graph_reads_the_fused_calls_weights():
    model = pydlx.optimize(_Toy().eval())
    assert pydlx._fx_fuse.current(model, torch.randn(1, 3, 16, 16)) is None  # (not traced: its children are)
    stem = pydlx._fx_fuse.current(model.stem, torch.randn(1, 3, 16, 16))
    assert coverage.covered_by_graph(stem.graph, model.stem) == {"conv"}  # (bn.weight is read too: not a conv's)
    head = pydlx._fx_fuse.current(model.head, torch.randn(1, 64))
    assert coverage.covered_by_graph(head.graph, model.head) == {"fc1", "fc2"}
    model.train()  # training mode: the BatchNorm uses batch statistics, in the op's training form
    stem = pydlx._fx_fuse.current(model.stem, torch.randn(2, 3, 16, 16))
    assert coverage.covered_by_graph(stem.graph, model.stem) == {"conv"}
    assert coverage.covered_by_graph(pydlx._fx_fuse.current(model.head, torch.randn(2, 64)).graph,
                                     model.head) == {"fc1", "fc2"}


def test_check_fails_when_the_optimized_model_differs(monkeypatch):
    def off_by_a_bit(model, **kw):
        fast = pydlx.optimize(model, **kw)
        with torch.no_grad():
            fast.head.fc2.weight.mul_(1.01)
        return fast

    monkeypatch.setattr(coverage, "optimize", off_by_a_bit)
    row = _toy_row()
    assert not row.ok
    failed = {f.split(" ")[0] for f in row.failures}
    assert {"state_dict", "eval", "train", "step", "eval2", "train2"} <= failed, row.failures


def _no_grad_to_fc1(model, **kw):
    """A wrong optimize: no gradient reaches head.fc1 (outputs unchanged)."""
    fast = pydlx.optimize(model, **kw)
    fast.head.fc1.weight.register_hook(lambda g: g * 0)
    return fast


def test_check_fails_when_only_the_training_step_differs(monkeypatch):
    monkeypatch.setattr(coverage, "optimize", _no_grad_to_fc1)
    row = _toy_row()
    assert not row.ok
    assert row.checks["eval"] <= coverage.RTOL and row.checks["train"] <= coverage.RTOL
    assert any(f.startswith("grad differs") and "head.fc1.weight" in f for f in row.failures), row.failures
    assert any(f.startswith("step differs") for f in row.failures), row.failures


def test_float64_rejudge_accepts_rounding_and_still_fails_a_wrong_model(monkeypatch):
    """An fp32 check that fails is run again in float64: fp32 rounding (here made to fail with a limit of 1e-12:
    folding the BatchNorm rounds differently) passes there and the row says so with both figures; a model that is
    wrong (no gradient reaches fc1) fails in float64 too."""
    row = _toy_row(rtol=1e-12, rejudge=True)
    assert row.ok, row.failures
    assert row.checks["eval"] > 1e-12 and max(row.checks64.values()) <= coverage.RTOL64, (row.checks, row.checks64)
    assert coverage._check_text(row, True).startswith("ok in float64")
    monkeypatch.setattr(coverage, "optimize", _no_grad_to_fc1)
    row = _toy_row(rejudge=True)
    assert not row.ok
    assert any(f.startswith("float64: grad differs") for f in row.failures), row.failures


def test_float64_differences_within_the_models_own_sensitivity_pass(monkeypatch):
    """A float64 difference above RTOL64 (made so here: a limit of 0) is judged against the original's own float64
    sensitivity, check by check (a copy of it fed the input scaled by 1 + 1e-15): rounding passes, and the row keeps
    those figures; a wrong model fails with them in its failures."""
    monkeypatch.setattr(coverage, "RTOL64", 0.0)
    row = _toy_row(rtol=1e-12, rejudge=True)
    assert row.ok, row.failures
    assert set(row.sensitivity64) == set(row.checks64) and max(row.sensitivity64.values()) > 0, row.sensitivity64
    assert all(v <= coverage.SENSITIVITY_FACTOR * row.sensitivity64[k] for k, v in row.checks64.items())
    monkeypatch.setattr(coverage, "optimize", _no_grad_to_fc1)
    row = _toy_row(rejudge=True)
    assert not row.ok
    assert any(f.startswith("(the original alone, float64") for f in row.failures), row.failures
    assert row.checks64["grad"] > 1e6 * coverage.SENSITIVITY_FACTOR * row.sensitivity64["grad"]


def test_check_fails_when_a_gradient_is_missing(monkeypatch):
    real = pydlx.optimize

    def frozen_fc2(model, **kw):
        fast = real(model, **kw)
        fast.head.fc2.weight.requires_grad_(False)
        return fast

    monkeypatch.setattr(coverage, "optimize", frozen_fc2)
    row = _toy_row()
    assert not row.ok and row.checks["grad"] == float("inf") and row.where["grad"] == "head.fc2.weight.grad"


def test_plan_and_optimize_disagreeing_is_a_failure(monkeypatch):
    from pydlx._plan import Block

    planned = pydlx.plan

    def says_more(model):
        p = planned(model)
        p.blocks.append(Block(("plain",), ("Conv2d", "relu", "MaxPool2d"), "forward", "pydlx.ops.conv_relu_pool2d",
                              "conv_relu_pool"))
        return p

    monkeypatch.setattr(coverage, "plan", says_more)
    row = _toy_row(check=False)
    assert not row.ok and row.disagree == ["the plan fuses plain (Conv+ReLU+MaxPool) but it did not run in a pydlx op"]
    monkeypatch.setattr(coverage, "plan", lambda model: pydlx._plan.Plan())
    row = _toy_row(check=False)
    assert not row.ok and row.disagree == ["ran in pydlx ops without a fused block in the plan: block.0, "
                                           "head.fc1, head.fc2, stem.conv"]


def test_kinds_and_reasons_from_the_plan():
    from pydlx._plan import Block, Note, Plan

    p = Plan([Block(("features.0",), ("Conv2d", "relu", "MaxPool2d"), "module", "pydlx.nn.ConvReLUPool2d"),
              Block(("a.fc",), ("Linear", "gelu"), "forward", "pydlx.ops.linear"),
              Block(("f1", "f2", "f3"), ("MLP",), "forward", "pydlx.ops.mlp", args=(("sizes", [4, 5, 6, 7]),)),
              Block(("enc",), ("MLP",), "module", "pydlx.nn.MLP", args=(("sizes", [4, 5, 6]),)),
              Block(("c",), ("Conv2d", "leaky_relu(0.2)"), "forward", "pydlx.ops.conv_act_pool2d"),
              Block(("conv1",), ("Conv2d", "BatchNorm2d", "relu", "MaxPool2d"), "forward", bn="folded",
                    reason="pool padding=1 (only 0)"),
              Block(("head.1",), ("Linear",), "module", reason="Hardswish is not a fusable activation")],
             [Note("blocks.3", "not traced", "TraceError: symbolically traced variables cannot be used"),
              Note("", "guards", "self.training")])
    ex = coverage.explained(p)
    assert ex.fused == [(["features.0"], "Conv+ReLU+MaxPool"), (["a.fc"], "Linear+gelu"),
                        (["f1", "f2", "f3"], "MLP(3 Linear)"), (["enc"], "MLP(2 Linear)"), (["c"], "Conv+leaky_relu")]
    assert ex.kept == [(["conv1"], "Conv+BN+ReLU+MaxPool", "pool padding=1 (only 0)"),
                       (["head.1"], "Linear", "Hardswish is not a fusable activation")]
    assert ex.notes == ["blocks.3 not traced (TraceError: symbolically traced variables cannot be used)"]
    text = str(p)  # explain's rendering of the same records
    assert "keep   conv1: Conv2d + BatchNorm2d (folded) + ReLU + MaxPool2d (forward code) (pool padding=1" in text
    assert "fuse   f1, f2, f3: Linear chain (forward code) -> pydlx.ops.mlp(sizes=[4, 5, 6, 7])" in text


def test_relative_errors_and_the_floor_for_gradients_that_are_zero_in_exact_arithmetic():
    assert coverage.rel_err(torch.tensor([1.0, -2.0]), torch.tensor([1.0, -2.0])) == 0.0
    assert coverage.rel_err((torch.tensor([1.0, 2.002]),), [torch.tensor([1.0, 2.0])]) == pytest.approx(1e-3, rel=1e-3)
    assert coverage.rel_err(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 0.0])) == float("inf")
    assert coverage.rel_err(torch.tensor([3, 4]), torch.tensor([3, 5])) == float("inf")  # integers: equal or not
    assert coverage.rel_err(torch.ones(2), torch.ones(3)) == float("inf")
    noise = torch.tensor([1e-9, -3e-9])  # (a BatchNorm bias before another BatchNorm: zero up to rounding)
    assert coverage.rel_err(-noise, noise) == pytest.approx(2.0)
    assert coverage.rel_err(-noise, noise, floor=1e-2 * 0.5) == pytest.approx(6e-9 / 5e-3, rel=1e-3)


def test_input_sizes():
    assert coverage.input_size("resnet18", 32) == 32 and coverage.input_size("vgg11_bn", 16) == 32
    assert coverage.input_size("alexnet", 32) == 63 and coverage.input_size("inception_v3", 64) == 75
    assert coverage.input_size("vit_h_14", 32) == 42 and coverage.input_size("vit_b_32", 32) == 32
    assert coverage.input_size("maxvit_t", 32) == 224


def test_readme_table_is_replaced_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{coverage.README_BEGIN}\nold table\n{coverage.README_END}\nafter\n")
    coverage.update_readme(str(readme), "| new |", "head line", "summary")
    text = readme.read_text()
    assert "old table" not in text and "| new |" in text and "head line" in text
    assert text.startswith("# x\n\nbefore\n" + coverage.README_BEGIN) and text.endswith(coverage.README_END + "\nafter\n")


# One model of each architecture in the zoo (its smallest variant; the others differ in width and depth only):
# every family the issue names (resnet, vgg, googlenet, squeezenet, mobilenet_v3, alexnet) and the rest, each at
# the smallest input it takes from 32 up, --check as the coverage command runs it. The whole zoo (80 models) takes
# ~6 minutes here at this size (README): too long for CI, it is the coverage command's job.
ZOO_IN_CI = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
             "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
             "regnet_y_400mf", "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_0", "squeezenet1_1",
             "swin_t", "swin_v2_t", "vgg11", "vgg11_bn", "vit_b_32"]


def test_every_architecture_of_the_zoo_is_in_ci():
    """Each torchvision module that builds classification models (resnet.py: resnet, resnext, wide_resnet; ...) has
    a model in ZOO_IN_CI: a family added to torchvision's zoo is not left out of CI unnoticed."""
    import torchvision

    def family(name):
        return torchvision.models.get_model_builder(name).__module__

    assert {family(n) for n in coverage.zoo()} == {family(n) for n in ZOO_IN_CI}
    assert set(ZOO_IN_CI) <= set(coverage.zoo())


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_IN_CI)
def test_zoo_model_checks(name):
    row = coverage.run_model(name, 32, check=True)
    assert row.ok, coverage.cells(row, True)
    assert set(row.checks) == {"eval", "train", "grad", "step", "eval2", "train2"}
    if name in ("alexnet", "vgg11", "vgg11_bn", "inception_v3", "swin_v2_t", "vit_b_32"):  # blocks fused today
        assert row.fused and row.eval_share > 0.02, coverage.cells(row, True)


# On a CPU, auto runs plain eager PyTorch in place of each pydlx op; the reference backend, forced, runs the ops
# themselves (their autograd, the int8 pool indices, in-place ops on their outputs): every architecture trains a step
# through them. At batch 8 (at 2, BatchNorm over 1x1 maps makes some originals diverge or amplify a 1e-15 change of
# their input past any tolerance, and the check could not tell a wrong result).
@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_IN_CI)
def test_zoo_model_trains_a_step_through_the_pydlx_ops(name):
    row = coverage.run_model(name, 32, check=True, backend="reference", batch=8)
    assert row.ok, coverage.cells(row, True)
    assert set(row.checks) == {"eval", "train", "grad", "step", "eval2", "train2"}
    if name in ("alexnet", "inception_v3", "swin_v2_t"):
        assert row.eval_share > 0.02, coverage.cells(row, True)


def test_summary_groups_the_groups_reasons():
    """Each grouped conv's reason names its groups; the zoo-wide summary counts them as one reason."""
    rows = [coverage.Row("a", fused=collections.Counter({"Conv+BN+ReLU": 1})),
            coverage.Row("b", fused=collections.Counter({"Conv+BN+ReLU": 2}))]
    rows[0].kept = collections.Counter({("Conv+BN+ReLU", "groups=32 (only 1)"): 3, ("Linear", None): 1})
    rows[1].kept = collections.Counter({("Conv+BN+ReLU", "groups=4 (only 1)"): 2})
    text = coverage.summary(rows, check=False)
    assert "kept over the zoo: 5 Conv+BN+ReLU (groups > 1 (only 1)); 1 Linear" in text, text
