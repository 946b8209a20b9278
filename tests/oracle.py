"""Tolerances derived from the reference, shared by the kernel tests.

A kernel's error against the float64 oracle may be at most twice the error of the same-precision
torch computation (the dense reference run in the input dtype) plus fp32 rounding of the result.
"""
from __future__ import annotations

import torch

from hybrid_kernels.reference import dense_reference

FP32_EPS = torch.finfo(torch.float32).eps


def max_err(actual: torch.Tensor, oracle: torch.Tensor) -> float:
    diff = (actual.double() - oracle.double()).abs()
    both_inf = torch.isinf(actual.double()) & torch.isinf(oracle.double()) & (
        torch.sign(actual.double()) == torch.sign(oracle.double()))
    diff = torch.where(both_inf, torch.zeros_like(diff), diff)
    return float(diff.max()) if diff.numel() else 0.0


def tolerance(baseline_err: float, oracle: torch.Tensor, depth: int = 1) -> float:
    """2x the same-precision torch error, plus fp32 rounding of a length-``depth`` dot product
    (which covers baselines that happen to cancel exactly, e.g. a row seeing a single key)."""
    finite = oracle[torch.isfinite(oracle)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    return 2.0 * baseline_err + 2.0 * depth * FP32_EPS * max(1.0, scale)


def assert_matches_oracle(name: str, actual, oracle, baseline, depth: int = 1) -> None:
    """actual/baseline vs the float64 oracle, with the derived tolerance."""
    assert not torch.isnan(actual).any(), f"{name}: NaN in the kernel output (unwritten elements?)"
    err, base = max_err(actual, oracle), max_err(baseline, oracle)
    tol = tolerance(base, oracle, depth)
    assert err <= tol, f"{name}: max error {err:.3e} > tolerance {tol:.3e} (torch same-precision error {base:.3e})"


def reference_pair(q, k, v, **pattern):
    """(oracle float64, baseline in the input dtype) forward results: ((out, lse), (out, lse))."""
    oracle = dense_reference(q.double(), k.double(), v.double(), compute_dtype=torch.float64, **pattern)
    baseline = dense_reference(q, k, v, compute_dtype=q.dtype, **pattern)
    return oracle, baseline


def reference_grads(q, k, v, dout, compute_dtype, **pattern):
    """Autograd gradients (dq, dk, dv) of the dense reference in ``compute_dtype``."""
    qs, ks, vs = (t.detach().to(compute_dtype).requires_grad_(True) for t in (q, k, v))
    out, _ = dense_reference(qs, ks, vs, compute_dtype=compute_dtype, **pattern)
    return torch.autograd.grad(out, (qs, ks, vs), dout.to(compute_dtype))
