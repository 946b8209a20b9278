"""Retrieval: a faiss :class:`VectorStore` (and :class:`ShardedVectorStore` over several indexes), text embedders, and a trainable :class:`NeuralRetriever`."""
from __future__ import annotations

import importlib

__all__ = ["VectorStore", "ShardedVectorStore", "TextEmbedder", "HashingEmbedder", "default_embedder", "NeuralRetriever"]

_WHERE = {"VectorStore": "vector_store", "ShardedVectorStore": "sharded_store", "TextEmbedder": "embedder", "HashingEmbedder": "embedder",
          "default_embedder": "embedder", "NeuralRetriever": "neural"}


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'hybrid_kernels.retrieval' has no attribute {name!r}")
