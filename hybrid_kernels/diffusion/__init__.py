"""Diffusion generators for data augmentation: a masked discrete diffusion language model
(:class:`MaskedDiffusionLM`, text -> text) and a conditional embedding diffusion
(:class:`EmbeddingDiffusion`, query embedding -> passage embeddings)."""
from .embedding import EmbeddingDiffusion
from .text import MaskedDiffusionLM, fact_corpus, parse_fact

__all__ = ["MaskedDiffusionLM", "EmbeddingDiffusion", "fact_corpus", "parse_fact"]
