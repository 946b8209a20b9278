"""What a backend is: the :class:`Backend` base class, the :class:`Problem` it accepts or
rejects, and :class:`NoBackendError`.

The bottom of the core layer: it depends only on :mod:`hybrid_kernels.pattern`, so the backends
(hybrid_kernels/backends) build on it without importing the dispatcher that registers them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .pattern import Pattern

__all__ = ["NoBackendError", "Problem", "Backend", "SCORE_MODS", "score_mods_of"]


class NoBackendError(ValueError):
    """No backend (or not the requested one) can run these inputs; the message says why."""


@dataclass(frozen=True)
class Problem:
    """What a backend needs to know to accept or reject a call."""
    device_type: str
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    quant: Optional[str]
    needs_grad: bool
    causal: bool = False
    num_landmarks: int = 0
    has_padding: bool = False
    score_mods: frozenset = frozenset()  # subset of SCORE_MODS the call uses

    @staticmethod
    def from_inputs(q: Tensor, v: Tensor, pattern: Pattern, quant: Optional[str],
                    needs_grad: bool) -> "Problem":
        return Problem(device_type=q.device.type, dtype=q.dtype, head_dim=q.shape[-1],
                       head_dim_v=v.shape[-1], quant=quant, needs_grad=needs_grad,
                       causal=pattern.causal, num_landmarks=pattern.num_landmarks,
                       has_padding=pattern.key_padding_mask is not None,
                       score_mods=score_mods_of(pattern))


SCORE_MODS = ("softcap", "bias")


def score_mods_of(pattern: Pattern) -> frozenset:
    """The score modifiers ``pattern`` uses (sinks are applied above every backend)."""
    mods = set()
    if pattern.softcap > 0:
        mods.add("softcap")
    if pattern.bias is not None:
        mods.add("bias")
    return frozenset(mods)


class Backend:
    """Base class: subclasses set the declarations and implement forward/backward.

    forward(q, k, v, pattern, quant) -> (out (B, Hq, Nq, Dv) in q.dtype, lse (B, Hq, Nq) fp32)
    backward(dout, q, k, v, out, lse, pattern, *, bias_grad=False)
        -> (dq, dk, dv) in the inputs' dtypes, and dbias (Hq, Nq + Nk - 1) fp32 if bias_grad
           else None
    """
    name: str = ""
    device_types: frozenset = frozenset()
    dtypes: frozenset = frozenset({torch.float32, torch.bfloat16, torch.float16})
    quants: frozenset = frozenset({None})
    supports_backward: bool = True
    auto_select: bool = True  # considered by backend="auto"
    score_mods: frozenset = frozenset()       # score modifiers the exact forward/backward take
    int8_score_mods: frozenset = frozenset()  # ... and those the quant="int8" forward takes

    def unavailable_reason(self) -> Optional[str]:
        """None when the backend can run on this install, else why not."""
        return None

    def head_dim_reason(self, head_dim: int, head_dim_v: int) -> Optional[str]:
        return None

    def device_types_now(self) -> frozenset:
        return self.device_types

    def auto_device_types(self) -> frozenset:
        """Device types on which ``backend="auto"`` may pick this backend."""
        return self.device_types_now()

    def rejection_reasons(self, problem: Problem) -> List[str]:
        reasons = []
        why = self.unavailable_reason()
        if why:
            return [why]
        if problem.device_type not in self.device_types_now():
            reasons.append(f"device type {problem.device_type!r} not in "
                           f"{sorted(self.device_types_now())}")
        if problem.dtype not in self.dtypes:
            reasons.append(f"dtype {problem.dtype} not in "
                           f"{sorted(str(d) for d in self.dtypes)}")
        if problem.quant not in self.quants:
            reasons.append(f"quant={problem.quant!r} not supported "
                           f"(supports {sorted(str(x) for x in self.quants)})")
        if problem.needs_grad and not self.supports_backward:
            reasons.append("no backward (inputs require grad)")
        supported = self.int8_score_mods if problem.quant == "int8" else self.score_mods
        missing = sorted(problem.score_mods - supported)
        if missing:
            what = "with quant='int8'" if problem.quant == "int8" else "(forward/backward)"
            reasons.append(f"score modifier(s) {missing} not supported {what}")
        why = self.head_dim_reason(problem.head_dim, problem.head_dim_v)
        if why:
            reasons.append(why)
        return reasons

    def forward(self, q: Tensor, k: Tensor, v: Tensor, pattern: Pattern,
                quant: Optional[str]) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 pattern: Pattern) -> Tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError
