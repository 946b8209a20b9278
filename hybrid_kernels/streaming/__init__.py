"""Streaming: unbounded token streams in bounded memory.

* :class:`StreamingSession` - chunked attention over a sink + recent-window KV cache
  (fp32/fp16/bf16 or INT8 with per-block scales), transactional, checkpointable.
* :class:`StreamingEncoder` - a small transformer running on a session.
* :class:`RetentionStore` - bounded store of finished segments for retrieval.
* :func:`whole_stream_attention` - the whole-stream computation a session reproduces.
* ``hf_cache.SinkWindowHFCache`` - the same cache policy for ``transformers`` ``generate``
  (imported on demand: ``from hybrid_kernels.streaming.hf_cache import SinkWindowHFCache``).
* :class:`StreamingHybridEncoder` - a trained causal ``HybridEncoder`` run on a session
  (imported on demand).
"""
from .cache import CACHE_DTYPES, KVCodec, SinkWindowCache
from .encoder import StreamingEncoder
from .equivalence import whole_stream_attention
from .positions import apply_rope
from .retention import RetentionStore, TorchCosineStore
from .session import StreamingSession, merge_attention

__all__ = ["CACHE_DTYPES", "KVCodec", "SinkWindowCache", "StreamingEncoder",
           "whole_stream_attention", "apply_rope", "RetentionStore", "TorchCosineStore",
           "StreamingSession", "merge_attention", "SinkWindowHFCache", "StreamingHybridEncoder"]


def __getattr__(name):
    if name == "SinkWindowHFCache":  # needs transformers; loaded on first use
        from .hf_cache import SinkWindowHFCache
        return SinkWindowHFCache
    if name == "StreamingHybridEncoder":  # imports hybrid_kernels.models; loaded on first use
        from .hybrid_encoder import StreamingHybridEncoder
        return StreamingHybridEncoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
