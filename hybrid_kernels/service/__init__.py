"""HTTP service for the RAG pipeline (FastAPI + uvicorn, SSE streaming, SQLite WAL store, faiss):
``hybrid-kernels serve`` or ``create_app(ServiceConfig(...))``. Needs the ``serve`` extra."""
from __future__ import annotations

from .config import ServiceConfig

__all__ = ["ServiceConfig", "create_app", "serve"]


def create_app(config: ServiceConfig, **kwargs):
    from .app import create_app as _create
    return _create(config, **kwargs)


def serve(config: ServiceConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the service with uvicorn until SIGINT/SIGTERM (then accepted requests drain)."""
    import uvicorn
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=30)
