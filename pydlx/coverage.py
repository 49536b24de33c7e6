"""``python -m pydlx.coverage``: what ``pydlx.optimize`` fuses in torchvision's classification models, and whether
the optimized models compute what the originals do.

    python -m pydlx.coverage [--models resnet18,vgg11_bn,...] [--size 64] [--check] [--markdown]
                             [--backend reference] [--threads 1] [--update-readme README.md]

For each model of ``torchvision.models.list_models(module=torchvision.models)`` (random weights, 10 classes, a fixed
seed, CPU, a batch of 2 small images — ``--size``, raised where a model needs more: see ``input_size``) it runs
``pydlx.plan`` (what ``explain`` prints, as records) and ``pydlx.optimize`` and prints one row:

* the fused blocks, by kind (the plan's fused ``Block``s);
* the share of the model's conv2d/linear FLOPs that run inside a pydlx op, in eval and in training mode. The FLOPs
  of every conv2d / linear the original model computes at that input are counted (a TorchFunctionMode,
  ``count_flops``) by the module owning the weight — a Conv2d/Linear module called, or its weight used
  functionally (Swin's attention calls ``F.linear(x, self.qkv.weight, ...)``; nn.MultiheadAttention's projections);
  a module counts as inside a pydlx op when, in the same forward of the optimized model, it ran as a pydlx module
  (``pydlx.nn.Linear``/``ConvReLUPool2d``/``MLP``, which call one op over the module's parameters) or the fused
  forward code that ran (the specialisation ``_fx_fuse.current`` selects for that call) passes its weight to a
  ``pydlx.ops`` call (``covered_by_graph``: the fused call reads the module's own weight, a BatchNorm folded
  into it included);
* what the plan keeps, and why (its kept blocks, grouped by kind and reason; its notes for forwards that
  torch.fx cannot trace);
* whether the plan and optimize agree (every block the plan fuses runs in a pydlx op, and nothing else).

``--check`` verifies per model: the state_dict (keys, order, values) unchanged by optimize; eval outputs equal
to the original's within fp32 tolerance; training-mode outputs equal (``torch.manual_seed`` before each forward,
for dropout and stochastic depth); one SGD step (cross-entropy, same input and target) gives the same gradients
and parameters, and the BatchNorm statistics that training forwards update stay equal (both models see the same
sequence of forwards); eval and then training again after the step still equal. Every error is relative: the
largest difference over the largest magnitude of the reference tensor (at most ``RTOL``; for gradients and state_dict
entries, that magnitude is at least ``FLOOR`` times the largest of their kind). Where an fp32 check fails, the
model is built again and every check runs in float64 (``RTOL64``): passing there, the row says "ok in float64" with
both figures (the fp32 difference is rounding the model amplifies); failing there, it fails. A failed check, an
error, or a disagreement between the plan and optimize makes the exit status 1.

The README's "Coverage on the torchvision zoo" table is this command's ``--check --markdown`` output (between the
``coverage-table`` markers; ``--update-readme README.md`` rewrites it in place).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import inspect
import math
import os
import platform
import re
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from . import _fx_fuse
from ._backend import choices, use_backend
from .nn.conv_relu_pool import ConvReLUPool2d
from .nn.linear import Linear as PydlxLinear
from .nn.mlp import MLP
from ._plan import Plan
from .optimize import optimize, plan

RTOL = 1e-4  # fp32: the largest difference allowed, relative to the reference tensor's largest magnitude
# A model whose fp32 check fails is run again in float64 (both the original and the optimized, from a fresh build with
# the same seed): rounding differences that the model amplifies (BatchNorm over 2 values a channel on 1x1 maps in
# training mode, outputs grown to 1e4 after an SGD step on random weights) shrink by float64's 1e-9 smaller epsilon,
# a wrong result does not. The amplification grows along the check sequence: resnet18 at 32x32 in training mode with
# the reference backend forced differs by 3e-15 in eval, 8e-11 in the first training forward, 6e-10 in the gradients
# and 5e-7 in the training forward after the step (fp32: up to 0.64); its fp32 error is the model's, not pydlx's.
RTOL64 = 1e-6
SENSITIVITY_PERTURB = 1e-15  # the float64 input perturbation that measures a model's own sensitivity to rounding
SENSITIVITY_FACTOR = 10.0  # a float64 difference up to this many times that perturbation's effect is rounding
BATCH = 2  # (BatchNorm in training mode needs more than one value per channel, and some maps reach 1x1)
NUM_CLASSES = 10
LR = 0.01

# builder arguments beyond weights=None, num_classes: the auxiliary heads off (they change the model's return type in
# training mode), and init_weights=False (torch's default initialisation rather than their truncated normals: faster,
# random either way, and no warning about the default changing)
MODEL_KWARGS: Dict[str, dict] = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}
# by name prefix: an input side the family's models accept (their strides and pools leave a map to pool), where the
# smallest is above 16 (measured on torchvision 0.29: smaller inputs fail in the original model's forward)
MIN_SIZE: Dict[str, int] = {"alexnet": 63, "inception_v3": 75, "convnext": 32, "densenet": 32, "vgg": 32,
                            "squeezenet": 24}
# MaxViT's partition size 7 must divide the map at each of its 4 stages (stride 2 each, after a stride-2 stem)
FIXED_SIZE: Dict[str, int] = {"maxvit_t": 224}

README_BEGIN = "<!-- coverage-table: begin (generated by python -m pydlx.coverage --check --markdown) -->"
README_END = "<!-- coverage-table: end -->"


def zoo() -> List[str]:
    import torchvision
    return list(torchvision.models.list_models(module=torchvision.models))


def input_size(name: str, size: int) -> int:
    """The input side used for ``name`` when ``size`` is asked for: at least what the model accepts; ViTs take a
    multiple of their patch size (built with that ``image_size``); MaxViT its fixed size."""
    if name in FIXED_SIZE:
        return FIXED_SIZE[name]
    size = max([size] + [v for k, v in MIN_SIZE.items() if name.startswith(k)])
    m = re.fullmatch(r"vit_[a-z]_(\d+)", name)
    if m:
        patch = int(m.group(1))
        size = patch * max(1, math.ceil(size / patch))
    return size


def build(name: str, size: int, seed: int = 0) -> Tuple[nn.Module, int]:
    """(model, input side): torchvision's ``name`` with random weights (seeded), 10 classes, in eval mode."""
    import torchvision
    side = input_size(name, size)
    kwargs = dict(weights=None, num_classes=NUM_CLASSES, **MODEL_KWARGS.get(name, {}))
    if name.startswith("vit_"):
        kwargs["image_size"] = side
    if name in FIXED_SIZE and name.startswith("maxvit"):
        kwargs["input_size"] = (side, side)
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, **kwargs)
    return model.eval(), side


# ----------------------------------------------------------------------------------------------- the plan
@dataclass
class Explained:
    fused: List[Tuple[List[str], str]] = field(default_factory=list)  # (module fqns, kind)
    kept: List[Tuple[List[str], str, str]] = field(default_factory=list)  # (module fqns, kind, reason)
    notes: List[str] = field(default_factory=list)


def explained(p: Plan) -> Explained:
    """What a row needs of ``pydlx.plan``'s records: fused blocks and kept ones by kind (with the reason), and the
    forwards that were not traced (or could not be analysed)."""
    out = Explained()
    for b in p.blocks:
        if b.fused:
            out.fused.append((list(b.modules), b.kind))
        else:
            out.kept.append((list(b.modules), b.kind, b.reason))
    for n in p.notes:
        if n.what == "not traced":
            out.notes.append(f"{n.module or 'the model'} not traced ({n.text})")
        elif n.what == "error":
            out.notes.append(n.text)
    return out


# ----------------------------------------------------------------------------------------------- coverage
UNOWNED = "(weights no module owns)"


class _ConvLinearFlops(TorchFunctionMode):
    """Counts the FLOPs (2 x multiply-adds, bias not counted) of every conv2d / linear computed while active, by the
    module owning the weight: calls of Conv2d/Linear modules, and the modules' weights used functionally
    (``F.linear(x, self.qkv.weight)`` in Swin's attention, nn.MultiheadAttention's projections). A torch function
    mode does not see the calls inside a function it handles, so ``F.multi_head_attention_forward`` is counted from
    its arguments; while the mode is active nn.MultiheadAttention takes that path rather than its fused inference
    one (the same arithmetic)."""

    def __init__(self, owners: Dict[int, str]):
        super().__init__()
        self.owners, self.flops = owners, Counter()

    def _add(self, weight, flops: int) -> None:
        self.flops[self.owners.get(id(weight), UNOWNED)] += int(flops)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.conv2d or func is F.linear:
            w = args[1] if len(args) > 1 else kwargs["weight"]
            # conv: each output element sums (in_channels / groups) x kh x kw products = w[0].numel()
            self._add(w, 2 * out.numel() * (w.shape[-1] if func is F.linear else w[0].numel()))
        elif func is F.multi_head_attention_forward:
            a = _MHA_SIGNATURE.bind(*args, **kwargs).arguments
            q, k, v, embed = a["query"], a["key"], a["value"], a["embed_dim_to_check"]
            if a.get("use_separate_proj_weight"):
                for t, w in ((q, a["q_proj_weight"]), (k, a["k_proj_weight"]), (v, a["v_proj_weight"])):
                    self._add(w, 2 * (t.numel() // t.shape[-1]) * w.numel())
            else:
                self._add(a["in_proj_weight"], 2 * sum(t.numel() // t.shape[-1] for t in (q, k, v)) * embed * embed)
            self._add(a["out_proj_weight"], 2 * (q.numel() // q.shape[-1]) * embed * embed)
        return out


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


@contextlib.contextmanager
def count_flops(model: nn.Module):
    """Yields {fqn: FLOPs} of the conv2d / linear computed meanwhile (``_ConvLinearFlops``), by owning module: its
    fqn when the weight is a module's ``weight`` (Conv2d, Linear), else ``fqn.parameter`` (a MultiheadAttention's
    ``in_proj_weight``)."""
    owners = {}
    for fqn, mod in model.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), fqn if name == "weight" else f"{fqn}.{name}" if fqn else name)
    mode = _ConvLinearFlops(owners)
    with mode:
        yield mode.flops


def covered_by_graph(graph: fx.Graph, owner: nn.Module) -> Set[str]:
    """The Conv2d/Linear modules (fqns under ``owner``) whose weight a ``pydlx.ops`` call in ``graph`` reads."""
    found: Set[str] = set()
    for node in graph.nodes:
        if node.op != "call_function" or not getattr(node.target, "__module__", "").startswith("pydlx.ops"):
            continue
        reads: List[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: reads.append(n) or n)
        for n in reads:
            if n.op != "get_attr":
                continue
            fqn, _, attr = n.target.rpartition(".")
            try:
                mod = owner.get_submodule(fqn)
            except AttributeError:
                continue
            if attr == "weight" and isinstance(mod, (nn.Conv2d, nn.Linear)):
                found.add(fqn)
    return found


@contextlib.contextmanager
def record_pydlx(model: nn.Module):
    """Pre-hooks on ``model``'s pydlx modules and on its modules with fused forward code: yields the set of
    Conv2d/Linear fqns that ran inside a pydlx op during the forwards run meanwhile."""
    covered: Set[str] = set()
    handles = []

    def join(prefix, fqn):
        return f"{prefix}.{fqn}" if prefix and fqn else prefix or fqn

    for prefix, mod in model.named_modules():
        if isinstance(mod, (PydlxLinear, ConvReLUPool2d)):
            handles.append(mod.register_forward_pre_hook(lambda m, args, p=prefix: covered.add(p)))
        elif isinstance(mod, MLP):
            names = [join(prefix, n) for n, c in mod.named_children() if isinstance(c, nn.Linear)]
            handles.append(mod.register_forward_pre_hook(lambda m, args, names=names: covered.update(names)))
        elif isinstance(mod, _fx_fuse.FusedForward):
            def hook(m, args, kwargs, prefix=prefix):
                spec = _fx_fuse.current(m, *args, **kwargs)  # what this call runs (made now if it is new)
                if spec is not None and spec.graph is not None:
                    covered.update(join(prefix, f) for f in covered_by_graph(spec.graph, m))
            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield covered
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------- comparisons
def _tensors(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def rel_err(actual, expected, floor: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, floor) over the tensors of two outputs (inf if their structure
    or NaN pattern differs; integer tensors must be equal)."""
    a, e = _tensors(actual), _tensors(expected)
    if len(a) != len(e) or any(x.shape != y.shape or x.dtype != y.dtype for x, y in zip(a, e)):
        return math.inf
    worst = 0.0
    for x, y in zip(a, e):
        x, y = x.detach(), y.detach()
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return math.inf
            continue
        if x.numel() == 0:
            continue
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):  # (rare: the careful path)
            if not torch.equal(x.isnan(), y.isnan()) or not torch.equal(x.isinf(), y.isinf()) \
                    or not torch.equal(x[x.isinf()], y[y.isinf()]):
                return math.inf
            keep = torch.isfinite(y)
            x, y = x[keep], y[keep]
            if x.numel() == 0:
                continue
        diff = (x - y).abs().max().item()  # (in the tensors' own dtype: fp32 rounding is far below RTOL)
        scale = max(y.abs().max().item(), floor)
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))
    return worst


# A tensor of a state_dict or a gradient is compared relative to its own largest magnitude, or to FLOOR times the
# largest magnitude among its kind (parameters, buffers, gradients) where that is more: a gradient that is zero in
# exact arithmetic (a BatchNorm's bias before another BatchNorm in training mode: MaxViT's MBConv pre_norm) is
# rounding noise in both models, up to ~1e-7 of the largest gradient, and different noise when an op sums in
# another order (maxvit_t with --backend reference: 1e-4 of the largest gradient at FLOOR 1e-3, 1e-5 at 1e-2).
FLOOR = 1e-2


def _scale(tensors) -> float:
    return max((t.detach().abs().max().item() for t in tensors if t is not None and t.is_floating_point()
                and t.numel()), default=0.0)


def _worst(pairs, floor: float) -> Tuple[float, str]:
    worst, where = 0.0, ""
    for k, a, b in pairs:
        if (a is None) != (b is None):
            return math.inf, f"{k} is None in one model only"
        err = rel_err(a, b, floor) if a is not None else 0.0
        if err > worst:
            worst, where = err, k
    return worst, where


def _state_err(a: nn.Module, b: nn.Module) -> Tuple[float, str]:
    """(worst rel_err over the state_dict entries, the worst entry's name); inf if the keys differ."""
    sa, sb = a.state_dict(), b.state_dict()
    if list(sa) != list(sb):
        return math.inf, "state_dict keys differ"
    params = {k for k, _ in b.named_parameters()}
    out = []
    for group in (params, set(sb) - params):
        floor = FLOOR * _scale(sb[k] for k in group)
        out.append(_worst([(k, sa[k], sb[k]) for k in sb if k in group], floor))
    return max(out)


def _sgd_steps(model: nn.Module, fast: nn.Module, ref, out, target) -> Tuple[float, str]:
    """One SGD step (lr LR, cross-entropy on the first output) on each model; returns the worst relative error of
    ``fast``'s gradients against ``model``'s and where. ``fast``'s gradients are compared, applied (p -= lr * grad,
    what torch.optim.SGD does) and freed one by one as backward completes them, with ``model``'s: two copies of the
    parameters' size fewer at the peak (vit_h_14, regnet_y_128gf: 2.5 GB each)."""
    nn.functional.cross_entropy(_tensors(ref)[0], target).backward()
    want = {k: p.grad for k, p in model.named_parameters()}
    floor = FLOOR * _scale(want.values())
    torch.optim.SGD(model.parameters(), lr=LR).step()
    for p in model.parameters():
        p.grad = None  # (held in ``want`` until compared)
    errs: Dict[str, float] = {}
    names = {id(p): k for k, p in fast.named_parameters()}

    def compare_and_step(p):
        k = names[id(p)]
        errs[k] = rel_err(p.grad, want[k], floor) if want.get(k) is not None else math.inf
        want[k] = None
        with torch.no_grad():
            p.add_(p.grad, alpha=-LR)
        p.grad = None

    handles = [p.register_post_accumulate_grad_hook(compare_and_step) for p in fast.parameters() if p.requires_grad]
    try:
        nn.functional.cross_entropy(_tensors(out)[0], target).backward()
    finally:
        for h in handles:
            h.remove()
    for k, g in want.items():  # a gradient the original has and the optimized model did not produce
        if g is not None:
            errs[k] = math.inf
    worst = max(errs.items(), key=lambda kv: kv[1], default=("", 0.0))
    return worst[1], f"{worst[0]}.grad" if worst[1] > 0 else ""


# ----------------------------------------------------------------------------------------------- one model
@dataclass
class Row:
    name: str
    size: int = 0
    fused: Counter = field(default_factory=Counter)
    calls: int = 0  # Conv2d/Linear modules called in the eval forward (each counted once)
    flops: int = 0  # their FLOPs (eval forward, batch BATCH)
    eval_share: float = 0.0
    train_share: Optional[float] = None  # (None: training mode not run)
    eval_covered: int = 0
    kept_share: float = 0.0  # FLOPs of the modules the plan keeps
    kept: Counter = field(default_factory=Counter)  # (kind, reason) -> count
    notes: List[str] = field(default_factory=list)
    disagree: List[str] = field(default_factory=list)  # the plan vs optimize
    checks: Dict[str, float] = field(default_factory=dict)  # check -> worst relative error
    where: Dict[str, str] = field(default_factory=dict)  # check -> the state_dict entry of its worst error
    checks64: Dict[str, float] = field(default_factory=dict)  # the float64 re-run's (after an fp32 failure)
    sensitivity64: Dict[str, float] = field(default_factory=dict)  # the original's own, float64 (after that fails)
    failures: List[str] = field(default_factory=list)
    error: Optional[str] = None
    stage: str = "build"  # what was running (for an error)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failures and not self.disagree


def _share(flops: Dict[str, int], covered: Iterable[str]) -> float:
    total = sum(flops.values())
    return sum(flops[f] for f in set(covered) if f in flops) / total if total else 0.0


def _agreement(ex: Explained, covered: Set[str]) -> List[str]:
    """The plan's fused fqns against the modules optimize ran in pydlx ops (eval): each side's extras."""
    said: Set[str] = set()
    out = []
    for fqns, kind in ex.fused:
        for f in fqns:
            inside = {c for c in covered if not f or c == f or c.startswith(f + ".")}  # (a Sequential: its Linears)
            if not inside:
                out.append(f"the plan fuses {f} ({kind}) but it did not run in a pydlx op")
            said |= inside
    extra = sorted(covered - said)
    if extra:
        out.append(f"ran in pydlx ops without a fused block in the plan: {', '.join(extra)}")
    return out


def run_model(name: str, size: int, check: bool, seed: int = 0, training: bool = True,
              backend: Optional[str] = None, batch: int = BATCH) -> Row:
    """One model's row; ``training=False`` stops after the eval forward (no training-mode coverage or checks);
    ``backend`` forces a pydlx backend for the whole run (``reference``: the ops' own forward and backward, where
    ``auto`` on a CPU runs plain eager PyTorch for some); ``batch`` the input's (BATCH: the smallest BatchNorm
    trains on, where some models amplify rounding past any fp32 tolerance; 8 keeps every zoo model's check
    informative)."""
    row = Row(name)
    start = time.perf_counter()
    try:
        with use_backend(backend) if backend else contextlib.nullcontext():
            _run(row, name, size, check, seed, training, batch)
    except Exception as e:  # noqa: BLE001  (reported in the row; the exit status says it)
        frames = traceback.extract_tb(e.__traceback__)
        ours = [f for f in frames if "/pydlx/" in f.filename and not f.filename.endswith("coverage.py")]
        at = (ours or frames)[-1]
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        row.error = f"in {row.stage}: {type(e).__name__}: {msg} ({at.filename.rsplit('/', 1)[-1]}:{at.lineno})"
    row.seconds = time.perf_counter() - start
    return row


def _run(row: Row, name: str, size: int, check: bool, seed: int, training: bool, batch: int) -> None:
    model, row.size = build(name, size, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, row.size, row.size, generator=gen)
    target = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    analyse(row, model, x, target, check, seed, training, rebuild=lambda: build(name, size, seed)[0])


def analyse(row: Row, model: nn.Module, x: torch.Tensor, target: torch.Tensor, check: bool, seed: int = 0,
            training: bool = True, rebuild: Optional[Callable[[], nn.Module]] = None, rtol: float = RTOL,
            fast_of: Optional[Callable[[nn.Module], nn.Module]] = None, perturb: float = 0.0) -> None:
    """Fill ``row`` for ``model`` (in eval mode; it is trained one step with --check) at input ``x``: explain,
    optimize, coverage in eval and training mode, and with ``check`` the comparisons (errors up to ``rtol``).
    ``rebuild()`` makes the model afresh: with it, an fp32 check that fails is judged again in float64 (``RTOL64``)
    and the row keeps both. ``fast_of`` makes the model compared with ``model`` (None: ``optimize``; a copy measures the
    model's own sensitivity), fed ``x`` scaled by ``1 + perturb``."""
    row.stage = "explain"
    ex = explained(plan(model))  # (in eval mode: what inference fuses)
    row.fused = Counter(kind for _, kind in ex.fused)
    row.kept = Counter((kind, why) for _, kind, why in ex.kept)
    row.notes = ex.notes
    gc.collect()  # (explain's copy of the model: module graphs hold reference cycles; 2.5 GB for vit_h_14)
    row.stage = "optimize"
    fast = (fast_of or optimize)(model)
    xf = x * (1 + perturb) if perturb else x
    if check:
        err, where = _state_err(fast, model)
        if err != 0.0:
            row.failures.append(f"state_dict changed by optimize ({where})")

    # eval: coverage and outputs
    row.stage = "eval forward"
    with torch.no_grad():
        with count_flops(model) as flops:
            ref = model(x)
        with record_pydlx(fast) as covered:
            out = fast(xf)
    row.calls, row.flops = len(flops), sum(flops.values())
    row.eval_share, row.eval_covered = _share(flops, covered), len(covered & set(flops))
    row.kept_share = _share(flops, [f for fqns, _, _ in ex.kept for f in fqns])
    row.disagree = _agreement(ex, covered)
    if check:
        row.checks["eval"] = rel_err(out, ref)
    del ref, out
    if not training:
        _judge(row, rtol)
        _float64_rejudge(row, model, fast, rebuild, x, target, seed, training)
        return

    # training mode: coverage, outputs and (with check) one SGD step
    row.stage = "training forward"
    model.train()
    fast.train()
    with torch.set_grad_enabled(check):
        with count_flops(model) as flops:
            torch.manual_seed(seed + 1)
            ref = model(x)
        with record_pydlx(fast) as covered:
            torch.manual_seed(seed + 1)
            out = fast(xf)
        row.train_share = _share(flops, covered)
        if check:
            row.checks["train"] = rel_err(out, ref)
            row.stage = "SGD step"
            row.checks["grad"], where = _sgd_steps(model, fast, ref, out, target)
            del ref, out
            row.checks["step"], where2 = _state_err(fast, model)  # parameters and BatchNorm statistics
            # train -> eval -> train again, after the step (BatchNorm statistics moved: the folding follows)
            row.stage = "eval and training forwards after the step"
            model.eval()
            fast.eval()
            with torch.no_grad():
                row.checks["eval2"] = rel_err(fast(xf), model(x))
                model.train()
                fast.train()
                torch.manual_seed(seed + 2)
                ref = model(x)
                torch.manual_seed(seed + 2)
                row.checks["train2"] = rel_err(fast(xf), ref)
            row.where = {"grad": where, "step": where2}
    _judge(row, rtol)
    _float64_rejudge(row, model, fast, rebuild, x, target, seed, training)


def _judge(row: Row, rtol: float = RTOL) -> None:
    for what, err in row.checks.items():
        if not err <= rtol:
            at = f" at {row.where[what]}" if row.where.get(what) else ""
            row.failures.append(f"{what} differs: {err:.3g}{at}")


def _float64_rejudge(row: Row, model, fast, rebuild, x, target, seed: int, training: bool) -> None:
    """After fp32 check failures that are all finite differences (no structural mismatch, no NaN pattern, state_dict
    unchanged): the same checks on float64 copies, freshly built. Passing there at RTOL64 means the fp32 differences
    are the model's amplified rounding (the row says so, with both figures); failing there, the row keeps the fp32
    failures and the float64 ones."""
    numeric = [f for f in row.failures if " differs: " in f and not f.startswith("state_dict")]
    if rebuild is None or not row.failures or len(numeric) != len(row.failures) or row.disagree or \
            not all(math.isfinite(v) for v in row.checks.values()):
        return
    sub = Row(row.name)
    row.stage = "float64 re-run of the checks"
    model64 = rebuild().double()
    analyse(sub, model64, x.double(), target, True, seed, training, rebuild=None, rtol=RTOL64)
    row.checks64 = dict(sub.checks)
    if sub.error is None and not sub.failures and not sub.disagree:
        row.failures = []
        return
    if sub.error is None and not sub.disagree and training:
        # the original's own sensitivity, check by check: the same steps in float64 against a copy of itself fed
        # the input scaled by 1 + SENSITIVITY_PERTURB (a few units in the last place). A BatchNorm that normalises
        # 2 values a channel (the late layers at this batch) amplifies any rounding by orders of magnitude; a
        # difference within SENSITIVITY_FACTOR times what that perturbation causes is rounding, not a wrong result.
        sens = Row(row.name)
        analyse(sens, rebuild().double(), x.double(), target, True, seed, training, rebuild=None, rtol=math.inf,
                fast_of=copy.deepcopy, perturb=SENSITIVITY_PERTURB)
        row.sensitivity64 = dict(sens.checks)
        if sens.error is None and all(v <= max(RTOL64, SENSITIVITY_FACTOR * sens.checks.get(k, 0.0))
                                      for k, v in sub.checks.items()):
            row.failures = []
            return
    row.failures += [f"float64: {f}" for f in sub.failures + sub.disagree] + (
        [f"float64: {sub.error}"] if sub.error else [])
    if row.sensitivity64:
        row.failures.append("(the original alone, float64, input scaled by 1+1e-15: " + ", ".join(
            f"{k} moves {v:.1e}" for k, v in row.sensitivity64.items()) + ")")


# ----------------------------------------------------------------------------------------------- report
def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _fused_text(row: Row) -> str:
    if not row.fused:
        return "-"
    return f"{sum(row.fused.values())}: " + ", ".join(f"{n} {k}" for k, n in sorted(row.fused.items(),
                                                                                  key=lambda kv: -kv[1]))


def _kept_text(row: Row, limit: Optional[int] = None) -> str:
    items = [f"{n} {k} ({why})" if why else f"{n} {k}" for (k, why), n in sorted(
        row.kept.items(), key=lambda kv: (-kv[1], kv[0]))] + row.notes
    if limit is not None and len(items) > limit:
        items = items[:limit] + [f"+{len(items) - limit} more"]
    return "; ".join(items) or "-"


def _check_text(row: Row, check: bool) -> str:
    if row.error:
        return f"ERROR {row.error}"
    parts = list(row.failures) + [f"explain/optimize: {d}" for d in row.disagree]
    if parts:
        return "FAIL " + "; ".join(parts)
    if not check:
        return "ok (not checked)"
    worst = max(row.checks.values()) if row.checks else 0.0
    if row.sensitivity64:
        return (f"ok within the model's own float64 sensitivity (max rel err {max(row.checks64.values()):.1e}; the "
                f"original fed its input scaled by 1+1e-15 moves up to {max(row.sensitivity64.values()):.1e}); fp32 "
                f"max rel err {worst:.1e}: rounding the model amplifies")
    if row.checks64:
        return (f"ok in float64 (max rel err {max(row.checks64.values()):.1e}); fp32 max rel err {worst:.1e}: "
                "rounding the model amplifies")
    return f"ok (max rel err {worst:.1e})"


COLUMNS = ["model", "input", "fused blocks", "conv/linear modules", "MFLOPs", "in pydlx ops (eval)",
           "in pydlx ops (train)", "kept by explain", "kept: what and why", "check", "s"]


def cells(row: Row, check: bool, limit: Optional[int] = None) -> List[str]:
    if row.error:
        return [row.name, str(row.size or "-"), "-", "-", "-", "-", "-", "-", "-", _check_text(row, check),
                f"{row.seconds:.0f}"]
    return [row.name, f"{row.size}x{row.size}", _fused_text(row), str(row.calls), f"{row.flops / 1e6:.0f}",
            f"{_pct(row.eval_share)} ({row.eval_covered} modules)",
            "-" if row.train_share is None else _pct(row.train_share), _pct(row.kept_share),
            _kept_text(row, limit), _check_text(row, check), f"{row.seconds:.0f}"]


def markdown(rows: List[Row], check: bool) -> str:
    """The table (without the seconds column: it measures the machine's load more than the model)."""
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(COLUMNS[:-1]) + " |", "|" + "---|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(esc(c) for c in cells(r, check, limit=4)[:-1]) + " |" for r in rows]
    return "\n".join(lines)


def summary(rows: List[Row], check: bool) -> str:
    done = [r for r in rows if not r.error]
    fused = [r for r in done if r.fused]
    bad = [r.name for r in rows if not r.ok]
    text = (f"{len(rows)} models: {len(done)} optimized without error, {len(fused)} with at least one fused block; "
            f"{'checked: ' if check else ''}{len(rows) - len(bad)} ok, {len(bad)} not ok"
            + (f" ({', '.join(bad)})" if bad else ""))
    kinds = Counter()
    for r in done:
        kinds.update(r.fused)
    if kinds:
        text += "\nfused blocks over the zoo: " + ", ".join(f"{n} {k}" for k, n in kinds.most_common())
    reasons = Counter()
    for r in done:
        for (k, why), n in r.kept.items():
            why = re.sub(r"groups=\d+ \(only 1\)", "groups > 1 (only 1)", why or "")  # one reason, not 130
            reasons[f"{k} ({why})" if why else k] += n
    if reasons:
        text += "\nkept over the zoo: " + "; ".join(f"{n} {k}" for k, n in reasons.most_common())
    return text


def header(size: int, check: bool, backend: Optional[str] = None) -> str:
    import torchvision
    return (f"pydlx.coverage: torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"python {platform.python_version()}, CPU {_cpu_name()} ({_threads()}), "
            f"{datetime.date.today().isoformat()}\n"
            f"batch {BATCH}, --size {size} (raised where a model needs more), random weights (seeded), "
            f"{NUM_CLASSES} classes, pydlx backend {backend or 'auto'}; "
            f"{'--check: rtol ' + str(RTOL) + ', SGD lr ' + str(LR) if check else 'no --check'}")


def _threads() -> str:
    n = torch.get_num_threads()
    return f"{n} thread{'s' if n != 1 else ''} of {os.cpu_count()} CPUs"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def update_readme(path: str, table: str, head: str, text: str) -> None:
    """Replace what lies between the coverage-table markers of ``path`` with the header, table and summary."""
    with open(path) as f:
        readme = f.read()
    if README_BEGIN not in readme or README_END not in readme:
        raise SystemExit(f"{path}: the markers {README_BEGIN!r} and {README_END!r} are missing")
    before, rest = readme.split(README_BEGIN, 1)
    _, after = rest.split(README_END, 1)
    block = "\n".join(["", "```", head, "```", "", table, "", text.replace("\n", "  \n"), ""])
    with open(path, "w") as f:
        f.write(before + README_BEGIN + "\n" + block + README_END + after)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pydlx.coverage", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="", help="comma-separated torchvision model names (default: the whole "
                                                "classification zoo)")
    p.add_argument("--size", type=int, default=64, help="input height and width (default 64; raised where a model "
                                                        "needs more)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="verify state_dict, eval/train outputs, one SGD step and "
                                                        "mode switches against the original model")
    p.add_argument("--backend", choices=list(choices()), default=None,
                   help="force a pydlx backend (default: auto; reference runs every pydlx op's own forward and "
                        "backward on a CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch's intra-op threads (default: torch's own; 1 is "
                                                          "faster on a CPU shared with other work)")
    p.add_argument("--markdown", action="store_true", help="print the markdown table at the end")
    p.add_argument("--update-readme", metavar="README", help="write header, table and summary between the "
                                                             "coverage-table markers of this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()] or zoo()
    unknown = sorted(set(names) - set(zoo()))
    if unknown:
        p.error(f"not torchvision classification models: {', '.join(unknown)}")
    head = header(args.size, args.check, args.backend)
    print(head, flush=True)
    rows = []
    for name in names:
        row = run_model(name, args.size, args.check, args.seed, backend=args.backend)
        rows.append(row)
        print("  ".join(f"{c}: {v}" if c != "model" else v for c, v in zip(COLUMNS, cells(row, args.check))),
              flush=True)
        gc.collect()
    text = summary(rows, args.check)
    print(text)
    if args.markdown or args.update_readme:
        table = markdown(rows, args.check)
        if args.markdown:
            print()
            print(table)
        if args.update_readme:
            update_readme(args.update_readme, table, head, text)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
