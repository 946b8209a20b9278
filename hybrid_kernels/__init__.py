"""hybrid-kernels: sliding-window, landmark-sparse and INT8 attention kernels for PyTorch.

``hk.attention`` is the one entry point; see its docstring and the README for the contract.
"""
from __future__ import annotations

import importlib

from .api import Explanation, attention, explain, plan
from .dispatch import NoBackendError, backend_names, select_backend

__version__ = "0.1.0"

__all__ = ["attention", "plan", "NoBackendError", "backend_names", "explain", "Explanation",
           "select_backend", "__version__"]

# Subpackages with heavier imports (transformers, faiss, ...) load on first use.
_LAZY = {"backends", "nn", "integrations", "models", "streaming", "retrieval", "rag", "quant", "reference",
         "bench", "cli", "training", "domains"}


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'hybrid_kernels' has no attribute {name!r}")
