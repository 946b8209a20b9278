"""The torch side: learned projections of fluxem encodings into the model, and a HybridEncoder
that reads mixed streams."""
from typing import Sequence

import torch
from torch import Tensor, nn

from .batching import MixedBatch
from .encoding import EMBEDDING_DIM

__all__ = ["MixedStreamEmbedder", "MixedStreamEncoder"]


class MixedStreamEmbedder(nn.Module):
    """``embedder(batch) -> (B, N, d)``: text positions take ``token_embedding(token_ids)``,
    domain spans ``head[domain](encoding (128,)) (+ type embedding)``.

    Args:
        token_embedding: the model's token embedding (shared, e.g. ``HybridEncoder.embed``).
        domains: domain vocabulary, in the order of the batch's ``domain_types`` (1-based).
        type_embeddings: add a learned embedding per domain type.
    """

    def __init__(self, token_embedding: nn.Embedding, domains: Sequence[str], type_embeddings: bool = True):
        super().__init__()
        if not isinstance(token_embedding, nn.Embedding):
            raise TypeError(f"token_embedding must be an nn.Embedding; got {type(token_embedding).__name__}")
        d = token_embedding.embedding_dim
        self.token_embedding = token_embedding
        self.domains = tuple(domains)
        self.heads = nn.ModuleList(nn.Linear(EMBEDDING_DIM, d) for _ in self.domains)
        self.types = nn.Embedding(len(self.domains) + 1, d) if type_embeddings else None

    def forward(self, batch: MixedBatch) -> Tensor:
        if batch.encodings.shape[:2] != batch.token_ids.shape or batch.encodings.shape[-1] != EMBEDDING_DIM:
            raise ValueError(f"batch.encodings must be (B, N, {EMBEDDING_DIM}) matching token_ids "
                             f"{tuple(batch.token_ids.shape)}; got {tuple(batch.encodings.shape)}")
        x = self.token_embedding(batch.token_ids)
        enc = batch.encodings.to(x.dtype)
        for i, head in enumerate(self.heads):
            here = (batch.domain_types == i + 1).unsqueeze(-1)
            x = torch.where(here, head(enc), x)
        if self.types is not None:
            x = x + self.types(batch.domain_types) * batch.domain_mask.unsqueeze(-1)
        return x


class MixedStreamEncoder(nn.Module):
    """``HybridEncoder`` over mixed streams: ``model(batch) -> HybridEncoderOutput``.

    Args:
        encoder: a :class:`hybrid_kernels.models.HybridEncoder`.
        domains: the batcher's domain vocabulary.
        spans_as_landmarks: run domain spans as landmark (global) tokens.
        type_embeddings: see :class:`MixedStreamEmbedder`.
    """

    def __init__(self, encoder: nn.Module, domains: Sequence[str], spans_as_landmarks: bool = False,
                 type_embeddings: bool = True):
        super().__init__()
        self.encoder = encoder
        self.embedder = MixedStreamEmbedder(encoder.embed, domains, type_embeddings)
        self.spans_as_landmarks = spans_as_landmarks

    def forward(self, batch: MixedBatch):
        return self.encoder(inputs_embeds=self.embedder(batch), attention_mask=batch.attention_mask,
                            landmark_mask=batch.domain_mask if self.spans_as_landmarks else None)
