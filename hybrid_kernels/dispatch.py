"""The one dispatch point.

Each backend (a :class:`~hybrid_kernels.backend_base.Backend`) declares what it supports (device
types, dtypes, head dims, quantization, score modifiers, backward) and whether it is usable on
this install. :func:`select_backend` picks the first backend, in
priority order, that accepts the problem; when none does (or an explicitly requested backend
cannot run it) the error lists why each backend was rejected, in the manner of xformers'
``ops/fmha/dispatch.py``.

The environment variable ``HYBRID_KERNELS_BACKEND`` overrides the requested backend, with a
warning the first time it takes effect.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional

from .backend_base import SCORE_MODS, Backend, NoBackendError, Problem, score_mods_of

__all__ = ["Problem", "Backend", "NoBackendError", "register_backend", "get_backend",
           "backend_names", "select_backend", "explain", "SCORE_MODS", "score_mods_of"]

BACKEND_ENV = "HYBRID_KERNELS_BACKEND"


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
    from .backends import default_backends
    for backend in default_backends():
        register_backend(backend)
