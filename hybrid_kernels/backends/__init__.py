"""Backends, in the order ``backend="auto"`` tries them (registered by :mod:`..dispatch`)."""
from __future__ import annotations

from typing import List

from ..backend_base import Backend


def default_backends() -> List[Backend]:
    """One instance of each built-in backend, in ``auto`` priority order, availability resolved."""
    from .cpu import CpuBackend
    from .cuda import CudaBackend
    from .reference import ReferenceBackend
    from .triton import TritonBackend

    backends = [CudaBackend(), TritonBackend(), CpuBackend(), ReferenceBackend()]
    for backend in backends:
        # Resolve availability (module imports) now, at package import, never while
        # torch.compile is tracing a call: an ImportError inside tracing breaks the graph.
        backend.unavailable_reason()
    return backends
