"""A trainable dense retriever: query and document towers, cosine similarity with temperature,
in-batch + hard-negative contrastive (InfoNCE) loss.

A tower is any module ``tower(input_ids, attention_mask)`` returning (B, d) or an object with a
``pooled`` attribute (such as :class:`hybrid_kernels.models.HybridEncoder`'s output). Pass one
tower to share it between queries and documents.

    retriever = NeuralRetriever(HybridEncoder(cfg), HybridEncoder(cfg), temperature=0.05)
    loss = retriever.contrastive_loss(q_ids, q_mask, pos_ids, pos_mask, neg_ids, neg_mask)
    store.add(retriever.encode_documents(d_ids, d_mask).numpy(), payloads=texts)
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NeuralRetriever"]


def _pooled(out) -> Tensor:
    return out.pooled if hasattr(out, "pooled") else out


class NeuralRetriever(nn.Module):
    def __init__(self, query_tower: nn.Module, document_tower: Optional[nn.Module] = None, *,
                 temperature: float = 0.05, learn_temperature: bool = False):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        self.query_tower = query_tower
        self.document_tower = document_tower if document_tower is not None else query_tower
        log_t = torch.tensor(math.log(temperature))
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    @property
    def temperature(self) -> float:
        return float(self.log_temperature.exp())

    def encode_queries(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        return F.normalize(_pooled(self.query_tower(input_ids, attention_mask)).float(), dim=-1)

    def encode_documents(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        return F.normalize(_pooled(self.document_tower(input_ids, attention_mask)).float(), dim=-1)

    def scores(self, queries: Tensor, documents: Tensor) -> Tensor:
        """Cosine similarity / temperature: (Q, d) x (D, d) -> (Q, D)."""
        return queries @ documents.transpose(0, 1) / self.log_temperature.exp()

    def contrastive_loss(self, query_ids: Tensor, query_mask: Optional[Tensor],
                         positive_ids: Tensor, positive_mask: Optional[Tensor],
                         negative_ids: Optional[Tensor] = None,
                         negative_mask: Optional[Tensor] = None) -> Tensor:
        """InfoNCE: query i's positive is document i; every other positive in the batch and every
        hard negative (any number, shared across the batch) is a negative."""
        q = self.encode_queries(query_ids, query_mask)
        docs = self.encode_documents(positive_ids, positive_mask)
        if negative_ids is not None:
            docs = torch.cat([docs, self.encode_documents(negative_ids, negative_mask)], dim=0)
        logits = self.scores(q, docs)
        return F.cross_entropy(logits, torch.arange(q.shape[0], device=logits.device))
