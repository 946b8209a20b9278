"""The correctness gate: every provider's result is compared with the fp32 reference before it
is timed; a provider outside tolerance is reported WRONG and not timed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .cases import Case

__all__ = ["Expected", "Verdict", "expected_result", "compare", "tolerance"]

# (max relative L1 error, max abs error relative to max(1, max|ref|)) per dtype / int8.
_TOLERANCES = {
    torch.float32: (1e-4, 2e-3),
    torch.float16: (5e-3, 3e-2),
    torch.bfloat16: (2e-2, 1e-1),
    "int8": (5e-2, 0.5),
}
# Score elements per (batch*head) up to which the dense reference is used.
_DENSE_LIMIT = 1 << 22


@dataclass
class Expected:
    """Reference outputs (fp32): out for forward cases, (dq, dk, dv) for backward ones, and the
    upstream gradient dout used for them."""
    tensors: Tuple[Tensor, ...]
    dout: Optional[Tensor] = None


@dataclass
class Verdict:
    ok: bool
    max_abs_err: float
    rel_l1: float
    reason: str = ""


def tolerance(case: Case) -> Tuple[float, float]:
    key = "int8" if case.pattern.quant == "int8" and case.mode == "fwd" else case.dtype
    return _TOLERANCES.get(key, _TOLERANCES[torch.float16])


def _reference_fwd(case: Case, q, k, v):
    from ..reference import blocked_reference, dense_reference
    kwargs = case.reference_kwargs()
    if case.n_q * case.n <= _DENSE_LIMIT:
        return dense_reference(q, k, v, **kwargs)
    return blocked_reference(q, k, v, **kwargs)


def expected_result(case: Case, q: Tensor, k: Tensor, v: Tensor, seed: int = 1) -> Expected:
    """fp32 reference outputs for ``case`` on these inputs (exact pattern, also for int8)."""
    with torch.no_grad():
        q0, k0, v0 = (t.detach() for t in (q, k, v))
        out, lse = _reference_fwd(case, q0, k0, v0)
        if case.mode == "fwd":
            return Expected((out,))
        from ..reference import blocked_reference_backward
        gen = torch.Generator(device="cpu").manual_seed(seed)
        dout = torch.randn(out.shape, generator=gen).to(device=q.device, dtype=q.dtype)
        grads = blocked_reference_backward(dout, q0, k0, v0, lse, **case.reference_kwargs())
        return Expected(tuple(grads), dout=dout)


def compare(case: Case, got: Sequence[Tensor], expected: Expected) -> Verdict:
    """Max abs error and relative L1 of ``got`` against ``expected``, judged by :func:`tolerance`."""
    l1_tol, max_tol = tolerance(case)
    worst_abs, worst_l1 = 0.0, 0.0
    for name, g, e in zip(("out",) if len(got) == 1 else ("dq", "dk", "dv"), got, expected.tensors):
        if tuple(g.shape) != tuple(e.shape):
            return Verdict(False, float("nan"), float("nan"),
                           f"{name} shape {tuple(g.shape)}, expected {tuple(e.shape)}")
        g = g.detach().float()
        if not bool(torch.isfinite(g).all()):
            return Verdict(False, float("nan"), float("nan"), f"{name} has NaN/inf")
        diff = (g - e).abs()
        abs_err = float(diff.max()) if diff.numel() else 0.0
        rel_l1 = float(diff.sum() / e.abs().sum().clamp_min(1e-30)) if diff.numel() else 0.0
        scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
        worst_abs, worst_l1 = max(worst_abs, abs_err), max(worst_l1, rel_l1)
        if rel_l1 > l1_tol or abs_err > max_tol * scale:
            return Verdict(False, worst_abs, worst_l1,
                           f"{name}: max abs err {abs_err:.3g}, rel L1 {rel_l1:.3g} "
                           f"(tolerance {max_tol * scale:.3g}, {l1_tol:.3g})")
    return Verdict(True, worst_abs, worst_l1)
