"""Retriever training from the reader (Izacard & Grave, "Distilling Knowledge from Reader to
Retriever", 2021): the reader's cross-attention mass over the passages it read is the target
distribution of the retriever's softmax over the same passages.

    target = fid.passage_attention(ids, mask, labels)                  # (B, P)
    scores = retriever.scores_for_sets(q_ids, q_mask, p_ids, p_mask)   # (B, P)
    loss = reader_distillation_loss(scores, target, passage_mask)
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BagOfWordsTower", "reader_distillation_loss", "set_scores", "recall_at_k"]


class BagOfWordsTower(nn.Module):
    """A small retriever tower: token embeddings, mean over real tokens, a linear map.
    (B, L) ids (+ (B, L) mask) -> (B, dim)."""

    def __init__(self, vocab_size: int, dim: int = 64, pad_token_id: int = 0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=pad_token_id)
        self.proj = nn.Linear(dim, dim)
        self.pad_token_id = pad_token_id

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        if attention_mask is None:
            attention_mask = input_ids != self.pad_token_id
        m = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.proj(pooled)


def set_scores(retriever, query_ids: Tensor, query_mask: Tensor, passage_ids: Tensor,
               passage_mask: Tensor) -> Tensor:
    """Retriever scores of each question against its own passage set: queries (B, Lq), passages
    (B, P, Lp) -> (B, P) (cosine / temperature)."""
    B, P, L = passage_ids.shape
    q = retriever.encode_queries(query_ids, query_mask)                                   # (B, d)
    d = retriever.encode_documents(passage_ids.reshape(B * P, L), passage_mask.reshape(B * P, L))
    return torch.einsum("bd,bpd->bp", q, d.view(B, P, -1)) / retriever.log_temperature.exp()


def reader_distillation_loss(scores: Tensor, target: Tensor, passage_mask: Optional[Tensor] = None) -> Tensor:
    """KL(target || softmax(scores)) per question, averaged: scores and target (B, P); target rows
    are the reader's attention distribution (renormalized over real passages); ``passage_mask``
    (B, P) bool marks real passages (padding passages are left out of both distributions)."""
    if scores.shape != target.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and target {tuple(target.shape)} must match")
    if passage_mask is not None:
        scores = scores.masked_fill(~passage_mask, float("-inf"))
        target = target * passage_mask
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-12)
    logp = F.log_softmax(scores.float(), -1)
    kl = target * (torch.log(target.clamp_min(1e-12)) - logp.masked_fill(target == 0, 0.0))
    return kl.sum(-1).mean()


def recall_at_k(ranked_ids: Sequence[Sequence[int]], gold: Sequence[Sequence[int]], k: int) -> float:
    """Share of questions whose gold passages all sit in the first ``k`` ranked ids."""
    hits = [set(g) <= set(list(r)[:k]) for r, g in zip(ranked_ids, gold)]
    return sum(hits) / max(1, len(hits))
