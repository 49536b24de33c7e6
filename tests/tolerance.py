"""The one tolerance helper of the test suite.

``assert_close(actual, expected, dtype=..., name=...)`` compares against a float64 reference with a tolerance
keyed by the dtype the computation ran in, and on failure prints where and how much the tensors differ.
``baseline=`` (eager PyTorch in the same low precision against the same reference) switches to
flash-attention's rule for fp16/bf16/tf32: the fused op's max error is at most 2x eager's max error, plus two
ulps of the output's largest magnitude.
"""
from __future__ import annotations

from typing import Optional

import torch

# (rtol, atol) by the dtype the kernel computed in; atol is for tensors of O(1) magnitude and scales with larger ones.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    "tf32": (5e-3, 5e-3),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def _where(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor) -> str:
    idx = bad.nonzero()
    first = [tuple(i.tolist()) for i in idx[:5]]
    diff = (actual - expected).abs()
    flat = diff.nan_to_num(float("inf")).flatten().argmax().item()
    worst = tuple(torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    worst = tuple(int(w) for w in worst)
    return (f"{bad.sum().item()} of {bad.numel()} elements out of tolerance; first at {first}; worst at {worst}: "
            f"actual {actual[worst].item() if diff.dim() else actual.item():.6g} vs expected "
            f"{expected[worst].item() if diff.dim() else expected.item():.6g}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, name: str = "output",
                 baseline: Optional[torch.Tensor] = None, abs_sum: Optional[torch.Tensor] = None) -> None:
    """``abs_sum`` (optional): per element, the sum of the absolute values of the terms that a reduction added up
    (e.g. |dZ|^T |X| for a weight gradient). Where the terms cancel, a few roundings of each term are bounded by a
    few ulp of that sum, not of the result: 4 ulp of it (in the dtype the computation ran in) are allowed on top."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        raise AssertionError(f"{name}: NaN pattern differs ({int(nan_a.sum())} NaN in actual, "
                             f"{int(nan_e.sum())} in expected); first mismatch at "
                             f"{tuple((nan_a != nan_e).nonzero()[0].tolist())}")
    a, e = a.masked_fill(nan_a, 0), e.masked_fill(nan_e, 0)
    key = dtype if dtype is not None else actual.dtype
    rtol, atol = TOL[key]
    if baseline is not None and key in (torch.float16, torch.bfloat16, "tf32"):
        b = baseline.detach().to(torch.float64).cpu().nan_to_num(0)
        base_err = (b - e).abs().max().item()
        err = (a - e).abs().max().item()
        scale = e.abs().max().item()
        # two units in the last place at the largest magnitude: with one or a few elements, eager's error can be
        # zero by luck, and the fused op's single rounding of a differently ordered fp32 sum is one ulp away
        floor = 2 * torch.finfo(torch.float16 if key == "tf32" else key).eps * scale
        allow = 2 * base_err + floor
        if abs_sum is not None:
            allow = allow + 4 * torch.finfo(torch.float16 if key == "tf32" else key).eps * abs_sum.double().cpu()
        bad = (a - e).abs() > allow
        if bad.any():
            raise AssertionError(f"{name}: max error {err:.3g} > 2 x eager's {base_err:.3g} + {floor:.2g}; "
                                 + _where(a, e, bad))
        return
    # atol scales with the tensor's largest magnitude (when above 1): a sum of O(scale) terms rounds at that scale
    atol = atol * max(1.0, e.abs().max().item() if e.numel() else 1.0)
    allow = atol + rtol * e.abs()
    if abs_sum is not None:
        allow = allow + 4 * torch.finfo(key).eps * abs_sum.double().cpu()
    bad = (a - e).abs() > allow
    if bad.any():
        raise AssertionError(f"{name} ({key}): rtol={rtol}, atol={atol:.3g}; " + _where(a, e, bad))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()
