"""Plans are data: what ``pydlx.optimize`` fuses in a model and what it keeps, as records (``Block``, ``Note``) that
``optimize`` applies, ``explain`` renders as text and ``python -m pydlx.coverage`` reads; nothing parses the text
back."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .activations import parse_activation

_SHORT = {"Conv2d": "Conv", "BatchNorm2d": "BN", "BatchNorm1d": "BN", "MaxPool2d": "MaxPool"}
LAYERS = frozenset({"Linear", "Conv2d", "BatchNorm2d", "BatchNorm1d", "MaxPool2d", "MLP", "LSTM", "LSTMCell"})


@dataclass(frozen=True)
class Block:
    """One chain optimize fuses (``reason`` None) or keeps (``reason``: why).

    modules   the fqns of the modules it covers, from the model's root ("" is the model itself); the first is the
              layer whose weight the op reads (an MLP: each Linear, or the Sequential that becomes pydlx.nn.MLP)
    chain     the chain's pieces in order: "Linear", "Conv2d", "BatchNorm2d" / "BatchNorm1d", an activation spec,
              "MaxPool2d"; ("MLP",), ("LSTM",), ("LSTMCell",) for those swaps
    source    "module": a module swap (an nn.Sequential's children, an LSTM); "forward": a chain in forward code
              (torch.fx), run as pydlx op calls over the modules' own parameters
    op        what runs it: "pydlx.nn.MLP", "pydlx.ops.conv_bn_act_pool2d", ... (None: nothing, for a kept Linear)
    family    the registry family whose kernels run it (pydlx/registry.py), or None
    args      the op's arguments that define the block, as (name, value) pairs: sizes, activations, pool options
    bn        the BatchNorm's mode: "folded" (eval), "training" (batch statistics, the layer recomputed in backward),
              or None
    detail    a remark for the reader (how an MLP runs, a pool left eager and why)
    auto      what ``auto`` runs for it on this machine, and why (pydlx/_policy.py ``summary``)
    """
    modules: Tuple[str, ...]
    chain: Tuple[str, ...]
    source: str
    op: Optional[str] = None
    family: Optional[str] = None
    args: Tuple[Tuple[str, object], ...] = ()
    reason: Optional[str] = None
    bn: Optional[str] = None
    detail: Optional[str] = None
    auto: Optional[str] = None

    @property
    def fused(self) -> bool:
        return self.reason is None

    def arg(self, name: str, default=None):
        return dict(self.args).get(name, default)

    @property
    def kind(self) -> str:
        """A short name: "Conv+BN+ReLU+MaxPool", "Linear+gelu", "MLP(3 Linear)", "LSTM"."""
        if self.chain == ("MLP",):
            return f"MLP({len(self.arg('sizes', ())) - 1} Linear)"
        conv = self.chain[0] == "Conv2d"
        parts = []
        for p in self.chain:
            if p in LAYERS:
                parts.append(_SHORT.get(p, p))
            else:  # an activation spec: its name
                name = parse_activation(p)[0]
                parts.append("ReLU" if conv and name == "relu" else name)
        return "+".join(parts)

    def title(self) -> str:
        """The chain in words: "Conv2d + BatchNorm2d (folded) + ReLU + MaxPool2d (forward code)"."""
        if self.chain == ("MLP",):
            words = (f"Sequential of {len(self.arg('sizes')) - 1} Linear layers" if self.source == "module" else
                     "Linear chain")
        else:
            parts = []
            for p in self.chain:
                if p.startswith("BatchNorm"):
                    parts.append(f"{p} ({self.bn})" if self.bn else p)
                elif p == "relu" and self.chain[0] == "Conv2d":
                    parts.append("ReLU")
                else:
                    parts.append(p)
            words = " + ".join(parts)
        return words + (" (forward code)" if self.source == "forward" else "")

    def call(self) -> str:
        if self.op is None:
            return ""
        return f"{self.op}({', '.join(f'{k}={v!r}' for k, v in self.args)})"

    def text(self) -> str:
        """explain's line for this block."""
        where = ", ".join(m or "(model)" for m in self.modules)
        if self.fused:
            extra = "".join(f"; {s}" for s in (self.detail, self.auto) if s)
            return f"fuse   {where}: {self.title()} -> {self.call()}{extra}"
        target = f" -> {self.call()}" if self.source == "forward" and self.op else ""
        return f"keep   {where}: {self.title()}{target} ({self.reason})"


@dataclass(frozen=True)
class Note:
    """Something about a module (its fqn; "" is the model) that is no block: its forward code was not traced (and
    why), or reads attributes the fused forward is kept per value of, or makes tensors on the CPU only to copy them
    to a device (optimize makes them there), or has sharded parameters, or could not be analysed."""
    module: str
    what: str  # "not traced" | "guards" | "device" | "sharded" | "error"
    text: str

    def line(self) -> str:
        name = self.module or "the model"
        if self.what == "not traced":
            return (f"note   forward code of {name} not traced by torch.fx ({self.text}): it runs as written; its "
                    "submodules' forwards are traced one by one")
        if self.what == "device":
            of = f" of {self.module}" if self.module else ""
            return (f"note   the forward code{of} makes tensors on the CPU and copies them to a device at every call "
                    f"({self.text}): the optimized forward makes them on that device (no copy and wait per call; "
                    "capturable in a CUDA graph)")
        if self.what == "guards":
            of = f" of {self.module}" if self.module else ""
            return (f"note   the forward code{of} reads {self.text}: the fused forward is kept per value of these "
                    "(train and eval traced separately) and traced again when they change")
        return f"note   {self.text}"


@dataclass
class Plan:
    """What ``optimize`` would do to a model: its blocks (fused and kept) and notes, in the order explain prints
    them. ``str(plan)`` is explain's text."""
    blocks: List[Block] = field(default_factory=list)
    notes: List[Note] = field(default_factory=list)

    @property
    def fused(self) -> List[Block]:
        return [b for b in self.blocks if b.fused]

    @property
    def kept(self) -> List[Block]:
        return [b for b in self.blocks if not b.fused]

    def __str__(self) -> str:
        lines = [b.text() for b in self.blocks] + [n.line() for n in self.notes]
        return "\n".join(lines) if lines else ("nothing to fuse: no Linear or Conv2d+ReLU+MaxPool2d chain (in an "
                                               "nn.Sequential or in the forward code), no LSTM")
