"""Backends, in the order ``backend="auto"`` tries them."""


def register_default_backends() -> None:
    from ..dispatch import register_backend
    from .cpu import CpuBackend
    from .cuda import CudaBackend
    from .reference import ReferenceBackend
    from .triton import TritonBackend

    for backend in (CudaBackend(), TritonBackend(), CpuBackend(), ReferenceBackend()):
        # Resolve availability (module imports) now, at package import, never while
        # torch.compile is tracing a call: an ImportError inside tracing breaks the graph.
        backend.unavailable_reason()
        register_backend(backend)
