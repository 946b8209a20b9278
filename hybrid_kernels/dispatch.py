"""The one dispatch point.

Each backend declares what it supports (device types, dtypes, head dims, quantization, backward)
and whether it is usable on this install. :func:`select_backend` picks the first backend, in
priority order, that accepts the problem; when none does (or an explicitly requested backend
cannot run it) the error lists why each backend was rejected, in the manner of xformers'
``ops/fmha/dispatch.py``.

The environment variable ``HYBRID_KERNELS_BACKEND`` overrides the requested backend, with a
warning the first time it takes effect.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .pattern import Pattern

__all__ = ["Problem", "Backend", "NoBackendError", "register_backend", "get_backend",
           "backend_names", "select_backend", "explain", "SCORE_MODS", "score_mods_of"]

BACKEND_ENV = "HYBRID_KERNELS_BACKEND"


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


_REGISTRY: Dict[str, Backend] = {}
_ORDER: List[str] = []


_REGISTER_HOOKS: List = []


def on_register(hook) -> None:
    """Call ``hook()`` whenever the registry changes (the api's plan cache clears itself)."""
    _REGISTER_HOOKS.append(hook)


def register_backend(backend: Backend, priority: Optional[int] = None) -> Backend:
    """Register ``backend``; lower ``priority`` index is tried first by ``auto``."""
    for hook in _REGISTER_HOOKS:
        hook()
    if backend.name in _REGISTRY:
        _ORDER.remove(backend.name)
    _REGISTRY[backend.name] = backend
    _ORDER.insert(len(_ORDER) if priority is None else priority, backend.name)
    return backend


def get_backend(name: str) -> Backend:
    _ensure_registered()
    if name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {backend_names()}; got {name!r}")
    return _REGISTRY[name]


def backend_names() -> List[str]:
    _ensure_registered()
    return list(_ORDER)


def explain(problem: Problem) -> Dict[str, List[str]]:
    """For every backend: the reasons it rejects ``problem`` (empty list = accepted)."""
    _ensure_registered()
    return {name: _REGISTRY[name].rejection_reasons(problem) for name in _ORDER}


_warned_override: set = set()


def _requested_with_override(requested: str) -> str:
    override = os.environ.get(BACKEND_ENV)
    if not override or override == requested:
        return requested
    if override not in ("auto", *backend_names()):
        raise ValueError(f"{BACKEND_ENV}={override!r} is not 'auto' or one of {backend_names()}")
    if (override, requested) not in _warned_override:
        _warned_override.add((override, requested))
        warnings.warn(f"hybrid_kernels: {BACKEND_ENV}={override!r} overrides backend={requested!r}",
                      RuntimeWarning, stacklevel=4)
    return override


def select_backend(problem: Problem, requested: str = "auto") -> Backend:
    """The backend that will run ``problem``, or NoBackendError explaining every rejection."""
    _ensure_registered()
    requested = _requested_with_override(requested)
    if requested != "auto":
        backend = get_backend(requested)
        reasons = backend.rejection_reasons(problem)
        if reasons:
            raise NoBackendError(
                f"backend={requested!r} cannot run these inputs ({_describe(problem)}): "
                + "; ".join(reasons) + "\n" + _format_all(problem))
        return backend
    for name in _ORDER:
        backend = _REGISTRY[name]
        if (backend.auto_select and problem.device_type in backend.auto_device_types()
                and not backend.rejection_reasons(problem)):
            return backend
    raise NoBackendError(f"no backend can run these inputs ({_describe(problem)}):\n"
                         + _format_all(problem))


def _describe(p: Problem) -> str:
    return (f"device={p.device_type}, dtype={p.dtype}, head_dim={p.head_dim}, "
            f"head_dim_v={p.head_dim_v}, quant={p.quant!r}, needs_grad={p.needs_grad}"
            + (f", score_mods={sorted(p.score_mods)}" if p.score_mods else ""))


def _format_all(problem: Problem) -> str:
    lines = []
    for name, reasons in explain(problem).items():
        lines.append(f"  {name}: " + ("accepted" if not reasons else "; ".join(reasons)))
    return "\n".join(lines)


_registered = False


def _ensure_registered() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from .backends import register_default_backends
    register_default_backends()
