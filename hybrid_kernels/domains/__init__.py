"""Typed domain spans (fluxem) in mixed text streams for the hybrid encoder.

``DomainParser`` (fluxem's tokenizer + explicit fallback rules) -> ``SpanEncoder`` (128-d
deterministic encodings) -> ``MixedStreamBatcher`` (padded batches, one position per span) ->
``MixedStreamEncoder`` (learned 128 -> d projections, optional type embeddings, spans as ordinary
tokens or as landmarks). Needs ``pip install "hybrid-kernels[domains]"`` (fluxem, imported lazily).
"""
from .batching import MixedBatch, MixedStreamBatcher
from .encoding import SpanEncoder, encode_spans
from .frontend import MixedStreamEmbedder, MixedStreamEncoder
from .parsing import DOMAINS, DomainParser, DomainSpan

__all__ = ["DOMAINS", "DomainParser", "DomainSpan", "SpanEncoder", "encode_spans", "MixedBatch",
           "MixedStreamBatcher", "MixedStreamEmbedder", "MixedStreamEncoder"]
