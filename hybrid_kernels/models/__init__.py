"""Models built on hybrid-kernels: :class:`HybridEncoder`, Fusion-in-Decoder :class:`FiDT5` and the
hierarchical :class:`RetrievalAugmentedSegments`."""
from __future__ import annotations

import importlib

__all__ = ["HybridEncoder", "HybridEncoderConfig", "FiDT5", "HKCrossAttention", "CrossKV",
           "format_passage", "small_t5_config", "RetrievalAugmentedSegments", "SegmentsOutput"]

_WHERE = {"HybridEncoder": "encoder", "HybridEncoderConfig": "encoder", "FiDT5": "fid",
          "HKCrossAttention": "fid", "format_passage": "fid", "small_t5_config": "fid", "CrossKV": "cross_kv",
          "RetrievalAugmentedSegments": "segments", "SegmentsOutput": "segments"}


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'hybrid_kernels.models' has no attribute {name!r}")
