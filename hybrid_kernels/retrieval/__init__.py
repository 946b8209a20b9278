"""Retrieval: a faiss :class:`VectorStore` (and :class:`ShardedVectorStore` over several
indexes), text embedders, a trainable :class:`NeuralRetriever`, and two-round query generation
(:class:`DynamicQueryGenerator`, rule-based; :class:`LearnedSecondRound`, learned)."""
from __future__ import annotations

import importlib

_WHERE = {"VectorStore": "vector_store", "ShardedVectorStore": "sharded_store",
          "TextEmbedder": "embedder", "HashingEmbedder": "embedder", "TfidfEmbedder": "embedder",
          "default_embedder": "embedder", "NeuralRetriever": "neural",
          "DynamicQueryGenerator": "query_generator",
          "BagOfWordsTower": "distill", "reader_distillation_loss": "distill", "reciprocal_rank_fusion": "query_generator",
          "LearnedQueryEnhancer": "query_enhancer", "LearnedSecondRound": "query_enhancer"}
__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'hybrid_kernels.retrieval' has no attribute {name!r}")
