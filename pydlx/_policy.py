"""Measured dispatch policies: what ``auto`` runs on a GPU, from benchmark rows taken on that GPU.

A policy is a small JSON file (package data under pydlx/policies/, one per GPU, named by the device's name and
compute capability) written by ``python -m pydlx.bench --make-policy <csv>... --tests <junit.xml>`` from the
benchmark CSV rows (pydlx.bench.CSV_COLUMNS) of one GPU run:

    {"version": 1, "device": "NVIDIA H100 80GB HBM3", "capability": "9.0", "torch": ..., "triton": ...,
     "commit": ..., "min_ratio": 1.05,
     "rules": [{"family": "linear", "dtype": "bf16", "mode": "training", "size": 6.9e10, "shape": "4096x4096x4096",
                "backend": "triton", "ratio": 1.31}, ...]}

Each rule is one measured case: family x dtype x mode (inference = forward, training = forward + backward) x size
(the family's work measure, pydlx/registry.py ``Family.work``). Its backend is the implementation measured fastest,
or "reference" (eager PyTorch) when none beat eager beyond the measurement's spread: a candidate must have passed its
GPU tests in the same run, be at least ``min_ratio`` times faster than eager by the medians, and have its p80 below
eager's median.

A call between two measured sizes takes their backend when both agree, else eager (the safe choice); a call
outside the measured range takes the nearest rule when within a factor of 2 of its size, else no rule (the
family's unmeasured default, pydlx/_backend.py). ``PYDLX_POLICY=off`` ignores policies; ``PYDLX_POLICY=<path>``
uses that file on every GPU; ``pydlx.use_policy(...)`` does either for a block.
"""
from __future__ import annotations

import bisect
import contextlib
import csv
import itertools
import json
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch

from . import registry
from ._env import DYNAMO_READS_CONTEXTVARS, Scope, getenv

VERSION = 1
POLICY_DIR = Path(__file__).resolve().parent / "policies"
MIN_RATIO = 1.05
REACH = 2.0  # a rule speaks for sizes within this factor of its own beyond the measured range
# the dtypes measured policies are keyed by (the kernels' dtypes), by their names in benchmark rows
DTYPES = {registry.DTYPE_NAMES[d]: d for d in registry.KERNEL_DTYPES}


def size_from_shape(family: str, shape: str) -> Optional[float]:
    """The work measure (``registry.FAMILIES[family].work``) of a benchmark row's shape, or None."""
    fam = registry.FAMILIES.get(family)
    return fam.parse(shape) if fam is not None else None


# ----------------------------------------------------------------------------------------------- policies
@dataclass(frozen=True)
class Rule:
    family: str
    dtype: str
    mode: str
    size: float
    shape: str
    backend: str
    ratio: float
    device: str = ""
    capability: str = ""
    commit: str = ""

    def describe(self) -> str:
        what = "eager" if self.backend == "reference" else self.backend
        if self.backend == "reference":
            return (f"eager: no implementation measured faster on {self.device} (sm_{self.capability.replace('.', '')})"
                    f" at {self.commit} ({self.family} {self.shape} {self.dtype} {self.mode})")
        return (f"{what}: {self.ratio:.2f}x eager on {self.device} (sm_{self.capability.replace('.', '')}) at "
                f"{self.commit} ({self.family} {self.shape} {self.dtype} {self.mode})")


class Policy:
    def __init__(self, data: dict, path: Optional[Path] = None):
        if data.get("version") != VERSION:
            raise ValueError(f"pydlx policy {path or ''}: version {data.get('version')!r}, expected {VERSION}")
        self.data, self.path = data, path
        self.device, self.capability = data["device"], str(data["capability"])
        self._rules: Dict[Tuple[str, str, str], List[Rule]] = {}
        for r in data["rules"]:
            rule = Rule(r["family"], r["dtype"], r["mode"], float(r["size"]), r.get("shape", ""), r["backend"],
                        float(r["ratio"]), self.device, self.capability, data.get("commit", ""))
            self._rules.setdefault((rule.family, rule.dtype, rule.mode), []).append(rule)
        for rules in self._rules.values():
            rules.sort(key=lambda r: r.size)

    def __repr__(self):
        return f"Policy({self.device}, sm_{self.capability.replace('.', '')}, {self.path or 'in memory'})"

    def lookup(self, family: str, dtype: str, mode: str, size: float) -> Optional[Rule]:
        """The rule for a call: see the module docstring for sizes between and beyond the measured ones."""
        rules = self._rules.get((family, dtype, mode))
        if not rules or size <= 0:
            return None
        sizes = [r.size for r in rules]
        i = bisect.bisect_left(sizes, size)
        if i < len(rules) and rules[i].size == size:
            return rules[i]
        if i == 0:
            return rules[0] if rules[0].size / size <= REACH else None
        if i == len(rules):
            return rules[-1] if size / rules[-1].size <= REACH else None
        lo, hi = rules[i - 1], rules[i]
        if lo.backend == hi.backend:
            return lo if math.log(size / lo.size) <= math.log(hi.size / size) else hi
        safe = lo if lo.backend == "reference" else hi  # the neighbours disagree: eager, if either is
        if safe.backend != "reference":
            return Rule(family, dtype, mode, size, f"between {lo.shape} and {hi.shape}", "reference", 1.0,
                        self.device, self.capability, self.data.get("commit", ""))
        return safe


def device_key(device: Union[torch.device, int, None] = None) -> Tuple[str, str]:
    """(name, "major.minor") of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def file_name(name: str, capability: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + f"_sm{capability.replace('.', '')}.json"


def load(path: Union[str, Path]) -> Policy:
    path = Path(path)
    return Policy(json.loads(path.read_text()), path)


_POLICIES = Scope("policies")  # use_policy's stack in this thread and task (settings: "off", "measure", "policy:<n>")


def _overrides() -> tuple:
    return _POLICIES.get()


_cache: Dict[Tuple[str, str], Optional[Policy]] = {}
MEASURE = "measure"
SETTINGS = ("off", MEASURE)  # the named settings use_policy and PYDLX_POLICY take besides a policy file
_HELD: Dict[str, Policy] = {}  # "policy:<n>" -> a Policy given to use_policy (or optimize): settings are strings
_NAMES = itertools.count()


@contextlib.contextmanager
def use_policy(policy: Union[Policy, str, Path, None]) -> Iterator[None]:
    """Within the block, ``auto`` follows ``policy`` on every GPU: a Policy or a policy file's path; "off" (or None):
    no measured decision at all, the unmeasured defaults; "measure": measured on first use (pydlx/_measure.py)."""
    value = _setting_value(policy)
    try:
        with _POLICIES.push(value):
            yield
    finally:
        _HELD.pop(value, None)  # (decisions kept under its name are never found again: names are not reused)


def _setting_value(policy) -> str:
    """The setting (a string) ``use_policy(policy)`` pushes: a Policy object, or a file (loaded now), is held under
    a name of its own, never reused, until the block ends."""
    if policy is None:
        return "off"
    if not isinstance(policy, Policy):
        if str(policy).strip().lower() in SETTINGS:
            return str(policy).strip().lower()
        policy = load(policy)
    name = f"policy:{next(_NAMES)}"
    _HELD[name] = policy
    return name


def setting() -> str:
    """The policy setting in force, a string: the innermost ``use_policy``, else PYDLX_POLICY: "off", "measure", a
    policy file ("policy:<n>" from use_policy, "file:<path>" from PYDLX_POLICY: ``explicit`` resolves them), or
    "default" (recorded decisions: the user cache of pydlx/_measure.py, then the policy shipped for the GPU)."""
    override = _overrides()
    if override:
        return override[-1]
    env = (getenv("PYDLX_POLICY") or "").strip()
    if env.lower() in SETTINGS:
        return env.lower()
    return f"file:{env}" if env else "default"


def explicit(current: str) -> Optional[Policy]:
    """The Policy a setting names ("policy:<n>", "file:<path>"), or None for the named settings."""
    if current.startswith("policy:"):
        return _HELD[current]
    if current.startswith("file:"):
        key = ("path", current[len("file:"):])
        if key not in _cache:
            _cache[key] = load(key[1])
        return _cache[key]
    return None


def for_device(device: Union[torch.device, int, None] = None, current: Optional[str] = None) -> Optional[Policy]:
    """The policy file in force for a CUDA device under ``current`` (default: the setting in force): the one it
    names, None when it is "off", else (default, measure) the shipped file for the device's name and capability."""
    current = setting() if current is None else current
    named = explicit(current)
    if named is not None:
        return named
    if current == "off":
        return None
    key = device_key(device)
    if key not in _cache:
        path = POLICY_DIR / file_name(*key)
        _cache[key] = load(path) if path.exists() else None
    return _cache[key]


def in_force() -> tuple:
    """What decides the policy in force (the innermost ``use_policy``, PYDLX_POLICY): part of every kept dispatch
    decision's key, so that a change of policy is seen by the next call (a policy object's setting is a name never
    reused: a later object cannot be taken for it)."""
    override = _POLICIES.var.get() if DYNAMO_READS_CONTEXTVARS or not torch.compiler.is_compiling() else \
        getattr(_POLICIES.mirror, "stack", ())  # (_overrides, written out: this runs on every op call)
    return (override[-1] if override else None, getenv("PYDLX_POLICY"))


def lookup(family: str, device, call, policy: Optional[Policy] = None) -> Optional[Rule]:
    """The rule of ``policy`` (default: the policy file in force on ``device``) for ``call`` (a
    ``registry.FAMILIES[family].call``), or None."""
    policy = for_device(device) if policy is None else policy
    if policy is None or call.dtype not in registry.KERNEL_DTYPES:
        return None
    return policy.lookup(family, registry.DTYPE_NAMES[call.dtype], mode_name(call.training),
                         registry.FAMILIES[family].work(call))


def mode_name(training: bool) -> str:
    """A measured decision's mode: "training" (forward + backward) or "inference" (forward)."""
    return "training" if training else "inference"


def faster(eager: Sequence[float], candidate: Sequence[float], min_ratio: float = MIN_RATIO) -> Optional[float]:
    """The one rule by which a measured candidate beats eager (policy files and measured decisions alike), from the
    two timings' (median, p20, p80): its speedup (eager's median over its median) when that is at least
    ``min_ratio`` and its p80 is below eager's median (faster beyond the measurement's spread), else None."""
    ratio = eager[0] / candidate[0] if candidate[0] > 0 else 0.0
    return ratio if ratio >= min_ratio and candidate[2] < eager[0] else None


def status(device=None) -> str:
    """backends()' line: the policy in force on the current GPU, or why there is none."""
    if not torch.cuda.is_available():
        return "no GPU: auto runs the reference on CPU tensors"
    current = setting()
    if current == "off":
        return "off: auto runs the unmeasured defaults"
    policy = for_device(device)
    name, cc = device_key(device)
    shipped = (f"{policy.device} (sm_{policy.capability.replace('.', '')}), {policy.path or 'in memory'}"
               if policy is not None else None)
    if current == MEASURE:
        return (f"measure: each new shape measured on first use on {name} (sm_{cc.replace('.', '')}), then "
                + (f"the policy {shipped}" if shipped else "recorded decisions only") + " where it cannot be")
    if policy is None:
        return (f"none for {name} (sm_{cc.replace('.', '')}): auto runs the unmeasured defaults (eager where a kernel "
                "is not measured) where no decision is recorded")
    return shipped


def summary(family: str, dtype: torch.dtype, device=None) -> str:
    """What ``auto`` runs for a family's calls in ``dtype`` on this machine, and why (explain() shows it)."""
    if not torch.cuda.is_available():
        return "auto here: eager PyTorch (no GPU)"
    name, cc = device_key(device)
    where = f"{name} (sm_{cc.replace('.', '')})"
    default = registry.FAMILIES[family].auto
    policy = for_device(device)
    rules = [] if policy is None else [r for (f, d, _), rs in policy._rules.items() if f == family
                                       and d == registry.DTYPE_NAMES.get(dtype) for r in rs]
    if not rules:
        what = f"{default[0]} (the unmeasured default)" if default else "eager"
        why = "no measured policy for this GPU" if policy is None else f"the policy has no {family} rule in {dtype}"
        return f"auto on {where}: {what}: not measured on this GPU ({why})"
    wins = [r for r in rules if r.backend != "reference"]
    if not wins:
        return f"auto on {where}: eager: no implementation measured faster at {policy.data.get('commit', '')}"
    best = max(wins, key=lambda r: r.ratio)
    return (f"auto on {where}: {best.backend} at {len(wins)} of {len(rules)} measured sizes (up to {best.ratio:.2f}x "
            f"eager at {best.shape}, commit {policy.data.get('commit', '')}), eager at the others")


# ----------------------------------------------------------------------------------------------- generation
def passed_backends(junit_paths: Sequence[Union[str, Path]]) -> Dict[str, Set[str]]:
    """{family: backends whose GPU tests all passed (and ran)} from pytest junit XML files. A GPU test of a family
    is a test in tests/test_<family>.py whose name has "gpu"; its backend is the junit property ``pydlx_backend``
    (tests/conftest.py records it), else the backend's name in the test's name (test_gpu[...-triton-...])."""
    seen: Dict[Tuple[str, str], bool] = {}
    for path in junit_paths:
        for case in ET.parse(path).iter("testcase"):
            cls, name = case.get("classname", ""), case.get("name", "")
            m = re.search(rf"test_({'|'.join(registry.FAMILIES)})\b", cls)
            if not m or "gpu" not in name.lower() or any(child.tag == "skipped" for child in case):
                continue
            ok = not any(child.tag in ("failure", "error") for child in case)
            props = {p.get("name"): p.get("value") for p in case.iter("property")}
            named = [b for b in registry.candidates() if re.search(rf"\b{b}\b|[-_\[]{b}[-_\]]", name)]
            for backend in ([props["pydlx_backend"]] if "pydlx_backend" in props else named):
                key = (m.group(1), backend)
                seen[key] = seen.get(key, True) and ok
    out: Dict[str, Set[str]] = {}
    for (family, backend), ok in seen.items():
        if ok:
            out.setdefault(family, set()).add(backend)
    return out


def _implementation(row: dict) -> Optional[str]:
    """The implementation a benchmark row measured: "pydlx-<backend>" providers, or "eager"; else None (auto and
    compile rows describe no single implementation)."""
    p = row["provider"]
    if p == "eager":
        return "reference"
    if p.startswith("pydlx-") and p[len("pydlx-"):] in registry.candidates():
        return p[len("pydlx-"):]
    return None


def make_policy(rows: Iterable[dict], passed: Dict[str, Set[str]], min_ratio: float = MIN_RATIO) -> dict:
    """The policy (a dict, as written to JSON) from one GPU run's benchmark rows and its GPU test results."""
    groups: Dict[Tuple[str, str, str, str, str], Dict[str, dict]] = {}
    meta: Dict[str, str] = {}
    for r in rows:
        impl = _implementation(r)
        if impl is None or r["family"] not in registry.FAMILIES or r["dtype"] not in DTYPES:
            continue
        if r["gpu"] == "cpu":
            raise ValueError("make_policy: CPU rows; a policy is made from one GPU's rows")
        meta.setdefault("gpu", r["gpu"])
        if r["gpu"] != meta["gpu"]:
            raise ValueError(f"make_policy: rows from two GPUs ({meta['gpu']!r}, {r['gpu']!r})")
        for k in ("torch", "triton", "commit"):
            meta.setdefault(k, r[k])
        key = (r["family"], r["op"], r["shape"], r["dtype"], "training" if r["mode"] == "fwdbwd" else "inference")
        groups.setdefault(key, {})[impl] = r
    if not meta:
        raise ValueError("make_policy: no GPU rows of eager and pydlx-<backend> providers")
    m = re.match(r"(.*) \(sm_(\d)(\d+)\)$", meta["gpu"])
    if not m:
        raise ValueError(f"make_policy: the gpu column {meta['gpu']!r} does not name a compute capability")
    device, capability = m.group(1), f"{m.group(2)}.{m.group(3)}"
    rules = []
    for (family, op, shape, dtype, mode), by_impl in sorted(groups.items()):
        eager = by_impl.get("reference")
        size = size_from_shape(family, shape)
        if eager is None or size is None:
            continue
        e_times = _times(eager)
        best, best_ratio = "reference", 1.0
        for backend in registry.candidates():
            row = by_impl.get(backend)
            if row is None or backend not in passed.get(family, set()):
                continue
            ratio = faster(e_times, _times(row), min_ratio)
            if ratio is not None and ratio > best_ratio:
                best, best_ratio = backend, ratio
        rules.append({"family": family, "op": op, "dtype": dtype, "mode": mode, "size": size, "shape": shape,
                      "backend": best, "ratio": round(best_ratio, 3)})
    # two ops of a family at one size (linear_relu, linear_gelu): one rule, eager unless both agree
    merged: Dict[Tuple[str, str, str, float], dict] = {}
    for r in rules:
        k = (r["family"], r["dtype"], r["mode"], r["size"])
        if k not in merged:
            merged[k] = r
        elif merged[k]["backend"] != r["backend"]:
            merged[k] = dict(merged[k], backend="reference", ratio=1.0)
        else:
            merged[k] = dict(merged[k], ratio=min(merged[k]["ratio"], r["ratio"]))
    return {"version": VERSION, "device": device, "capability": capability, "torch": meta["torch"],
            "triton": meta["triton"], "commit": meta["commit"], "min_ratio": min_ratio,
            "rules": [{k: v for k, v in r.items() if k != "op"} for r in merged.values()]}


def _times(row: dict) -> Tuple[float, float, float]:
    """A benchmark CSV row's (median, p20, p80)."""
    return float(row["median_ms"]), float(row["p20_ms"]), float(row["p80_ms"])


def read_rows(paths: Sequence[Union[str, Path]]) -> List[dict]:
    rows = []
    for p in paths:
        with open(p, newline="") as f:
            rows.extend(csv.DictReader(f))
    return rows


def write(policy: dict, out_dir: Union[str, Path] = POLICY_DIR) -> Path:
    path = Path(out_dir) / file_name(policy["device"], policy["capability"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(policy, indent=1) + "\n")
    return path
