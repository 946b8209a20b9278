"""Retrieval: a faiss :class:`VectorStore`, text embedders, and a trainable :class:`NeuralRetriever`."""
from __future__ import annotations

import importlib

__all__ = ["VectorStore", "TextEmbedder", "HashingEmbedder", "TfidfEmbedder", "default_embedder", "NeuralRetriever",
           "DynamicQueryGenerator", "reciprocal_rank_fusion"]

_WHERE = {"VectorStore": "vector_store", "TextEmbedder": "embedder", "HashingEmbedder": "embedder", "TfidfEmbedder": "embedder",
          "default_embedder": "embedder", "NeuralRetriever": "neural",
          "DynamicQueryGenerator": "query_generator", "reciprocal_rank_fusion": "query_generator"}


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'hybrid_kernels.retrieval' has no attribute {name!r}")
