"""A learned second retrieval round: the question's token states attend (multi-head attention)
over the token states of what the first round retrieved, and the result is a dense query for the
passage the first round could not find (for "what is the capital of the country where X was
born ?": the passage about the country named in "X was born in C ."). Its ranking over the corpus
is fused with the first round by reciprocal rank.

    enhancer = LearnedQueryEnhancer(vocab_size=len(tok), dim=64)
    fit_query_enhancer(enhancer, groups, steps=300)             # InfoNCE on the bridge passages
    second = LearnedSecondRound(enhancer, encode, corpus, DynamicQueryGenerator(texts, rounds=1))
    passages, trace = second.retrieve(question, search, k=10)   # same interface as the generator

Shapes: questions (B, Lq), first-round passages (B, M, Lp), documents (N, Ld); queries and
document vectors (B, D) / (N, D), L2-normalized.
"""
from __future__ import annotations

import random
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .query_generator import reciprocal_rank_fusion

__all__ = ["LearnedQueryEnhancer", "EnhancerGroup", "fit_query_enhancer", "LearnedSecondRound",
           "pad_token_ids"]


def pad_token_ids(sequences: Sequence[Sequence[int]], length: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Token id lists -> ids (N, L) padded with 0 and mask (N, L) bool."""
    L = length or max(1, max((len(s) for s in sequences), default=1))
    ids = torch.zeros((len(sequences), L), dtype=torch.long)
    for i, s in enumerate(sequences):
        s = list(s)[:L]
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, ids != 0


class LearnedQueryEnhancer(nn.Module):
    """Question tokens attend over first-round passage tokens; the pooled result is a query vector.

    Args:
        vocab_size: token ids are in [0, vocab_size); 0 is padding.
        dim: embedding / query width D (divisible by ``num_heads``).
        num_heads: heads of the query-enhancement attention.
        max_passages: first-round passages read (M); each gets a learned rank embedding.
        temperature: cosine similarity is divided by it in :meth:`scores`.
    """

    def __init__(self, vocab_size: int, dim: int = 64, num_heads: int = 4, max_passages: int = 3,
                 temperature: float = 0.05):
        super().__init__()
        if not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2; got {vocab_size!r}")
        if not isinstance(dim, int) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim must be an int divisible by num_heads; got dim={dim!r}, num_heads={num_heads!r}")
        if not isinstance(max_passages, int) or max_passages < 1:
            raise ValueError(f"max_passages must be an int >= 1; got {max_passages!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature!r}")
        self.max_passages, self.temperature = max_passages, temperature
        self.question_embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.passage_embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.rank_embed = nn.Embedding(max_passages, dim)
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.query_proj = nn.Linear(dim, dim)
        self.document_embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.document_proj = nn.Linear(dim, dim)

    @staticmethod
    def _check(name: str, ids: Tensor, mask: Optional[Tensor], dims: int) -> Tensor:
        if not isinstance(ids, Tensor) or ids.dim() != dims or ids.dtype != torch.long:
            raise ValueError(f"{name} must be a {dims}-D long tensor; got "
                             f"{type(ids).__name__ if not isinstance(ids, Tensor) else (ids.dtype, tuple(ids.shape))}")
        if mask is None:
            return ids != 0
        if mask.shape != ids.shape:
            raise ValueError(f"{name} mask must have shape {tuple(ids.shape)}; got {tuple(mask.shape)}")
        return mask.bool()

    def encode_documents(self, document_ids: Tensor, document_mask: Optional[Tensor] = None) -> Tensor:
        """Documents (N, L) -> (N, D): mean of token embeddings, a linear map, L2-normalized."""
        m = self._check("document_ids", document_ids, document_mask, 2).unsqueeze(-1).float()
        pooled = (self.document_embed(document_ids) * m).sum(1) / m.sum(1).clamp_min(1.0)
        return F.normalize(self.document_proj(pooled), dim=-1)

    def forward(self, question_ids: Tensor, question_mask: Optional[Tensor], passage_ids: Tensor,
                passage_mask: Optional[Tensor] = None) -> Tensor:
        """Questions (B, Lq) and their first-round passages in rank order (B, M, Lp), M <=
        ``max_passages`` -> enhanced queries (B, D), L2-normalized."""
        q_mask = self._check("question_ids", question_ids, question_mask, 2)
        p_mask = self._check("passage_ids", passage_ids, passage_mask, 3)
        B, M, L = passage_ids.shape
        if question_ids.shape[0] != B:
            raise ValueError(f"question_ids and passage_ids must share the batch size; got "
                             f"{question_ids.shape[0]} and {B}")
        if M > self.max_passages:
            raise ValueError(f"passage_ids holds {M} passages per question; max_passages is {self.max_passages}")
        ranks = self.rank_embed(torch.arange(M, device=passage_ids.device))            # (M, D)
        keys = (self.passage_embed(passage_ids) + ranks[None, :, None]).reshape(B, M * L, -1)
        key_mask = p_mask.reshape(B, M * L).clone()
        key_mask[:, 0] = True                     # a question without passages keeps one key
        states = self.question_embed(question_ids)                                    # (B, Lq, D)
        attended, _ = self.attention(states, keys, keys, key_padding_mask=~key_mask, need_weights=False)
        h = self.norm(states + attended)
        m = q_mask.unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return F.normalize(self.query_proj(pooled), dim=-1)

    def scores(self, queries: Tensor, documents: Tensor) -> Tensor:
        """(B, D) x (N, D) -> (B, N) cosine / temperature."""
        return queries @ documents.T / self.temperature

    def loss(self, queries: Tensor, documents: Tensor, positives: Tensor) -> Tensor:
        """InfoNCE over the whole candidate set: query b's positive is document ``positives[b]``,
        every other document (N - 1 of them) is a negative."""
        if positives.shape != (queries.shape[0],):
            raise ValueError(f"positives must be ({queries.shape[0]},); got {tuple(positives.shape)}")
        return F.cross_entropy(self.scores(queries, documents), positives)


class EnhancerGroup:
    """Training examples over one corpus: questions (B, Lq), their first-round passages (B, M, Lp),
    the corpus documents (N, Ld) and the index of each question's target passage (B,)."""

    def __init__(self, question_ids: Tensor, passage_ids: Tensor, document_ids: Tensor, positives: Tensor):
        if not (question_ids.shape[0] == passage_ids.shape[0] == positives.shape[0]):
            raise ValueError(f"question_ids, passage_ids and positives need one row per question; got "
                             f"{question_ids.shape[0]}, {passage_ids.shape[0]}, {positives.shape[0]}")
        if positives.numel() and (int(positives.min()) < 0 or int(positives.max()) >= document_ids.shape[0]):
            raise ValueError(f"positives must index document_ids (N = {document_ids.shape[0]})")
        self.question_ids, self.passage_ids = question_ids, passage_ids
        self.document_ids, self.positives = document_ids, positives.long()

    @classmethod
    def from_texts(cls, encode: Callable[[str], List[int]], questions: Sequence[str],
                   first_round: Sequence[Sequence[str]], documents: Sequence[str],
                   positives: Sequence[int], max_passages: int) -> "EnhancerGroup":
        """Tokenize: ``first_round[b]`` are question b's first-round passage texts, best first
        (the first ``max_passages`` are kept); ``positives[b]`` indexes ``documents``."""
        if not (len(questions) == len(first_round) == len(positives)):
            raise ValueError(f"questions, first_round and positives need one entry per question; got "
                             f"{len(questions)}, {len(first_round)}, {len(positives)}")
        q_ids, _ = pad_token_ids([encode(q) for q in questions])
        seqs = [[encode(t) for t in list(ps)[:max_passages]] for ps in first_round]
        M = max(1, max(len(s) for s in seqs))
        L = max(1, max((len(t) for s in seqs for t in s), default=1))
        p_ids = torch.zeros((len(seqs), M, L), dtype=torch.long)
        for b, s in enumerate(seqs):
            if s:
                p_ids[b, :len(s)] = pad_token_ids(s, L)[0]
        d_ids, _ = pad_token_ids([encode(d) for d in documents])
        return cls(q_ids, p_ids, d_ids, torch.tensor(list(positives), dtype=torch.long))


def fit_query_enhancer(enhancer: LearnedQueryEnhancer, groups: Sequence[EnhancerGroup], *,
                       steps: int = 300, seconds: Optional[float] = None, batch_size: int = 32,
                       lr: float = 3e-3, seed: int = 0) -> List[float]:
    """AdamW on :meth:`LearnedQueryEnhancer.loss` (the whole corpus of a group as candidates);
    each step draws one group and ``batch_size`` of its questions. Stops after ``steps`` or
    ``seconds``. Returns the loss per step."""
    if not groups:
        raise ValueError("groups must be a non-empty sequence of EnhancerGroup")
    rng = random.Random(seed)
    opt = torch.optim.AdamW(enhancer.parameters(), lr=lr)
    enhancer.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        if seconds is not None and time.perf_counter() - t0 > seconds:
            break
        g = groups[rng.randrange(len(groups))]
        idx = torch.tensor(rng.sample(range(g.positives.shape[0]), min(batch_size, g.positives.shape[0])))
        q = enhancer(g.question_ids[idx], None, g.passage_ids[idx])
        loss = enhancer.loss(q, enhancer.encode_documents(g.document_ids), g.positives[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    enhancer.eval()
    return losses


Search = Callable[[List[str], int], List[List[Dict[str, Any]]]]


class LearnedSecondRound:
    """First round from ``first_round`` (a one-round :class:`DynamicQueryGenerator`), second round
    from the enhancer's query over the corpus, reciprocal-rank fused (the learned list weighs
    ``weight``). Same ``retrieve(question, search, k)`` interface as the generator.

    Args:
        enhancer: a trained :class:`LearnedQueryEnhancer`.
        encode: text -> token ids (the enhancer's vocabulary).
        corpus: the searched passages as dicts {"id", "title", "text"}, ``id`` = position.
        first_round: object with ``retrieve(question, search, k) -> (passages, trace)``.
    """

    def __init__(self, enhancer: LearnedQueryEnhancer, encode: Callable[[str], List[int]],
                 corpus: Sequence[Dict[str, Any]], first_round, *, weight: float = 1.0,
                 fusion_k: int = 60, depth: int = 20):
        if not callable(encode):
            raise TypeError(f"encode must be callable (text -> token ids); got {type(encode).__name__}")
        if len(corpus) == 0:
            raise ValueError("corpus must be a non-empty sequence of passage dicts")
        self.enhancer, self.encode, self.corpus = enhancer, encode, list(corpus)
        self.first_round, self.weight, self.fusion_k, self.depth = first_round, weight, fusion_k, depth
        ids, mask = pad_token_ids([encode(f"{p['title']} {p['text']}") for p in self.corpus])
        with torch.no_grad():
            self.documents = enhancer.encode_documents(ids, mask)                    # (N, D)

    def query(self, question: str, passages: Sequence[Dict[str, Any]]) -> Tensor:
        """The enhanced query (D,) of a question given its first-round passages (best first)."""
        q_ids, q_mask = pad_token_ids([self.encode(question)])
        top = list(passages)[:self.enhancer.max_passages]
        seqs = [self.encode(f"{p['title']} {p['text']}") for p in top] or [[]]
        p_ids, p_mask = pad_token_ids(seqs)
        with torch.no_grad():
            return self.enhancer(q_ids, q_mask, p_ids[None], p_mask[None])[0]

    def retrieve(self, question: str, search: Search, k: int) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        depth = max(k, self.depth)
        first, trace = self.first_round.retrieve(question, search, depth)
        scores = self.documents @ self.query(question, first)
        top = scores.topk(min(depth, scores.shape[0])).indices.tolist()
        learned = [{**self.corpus[i], "score": float(scores[i])} for i in top]
        fused = reciprocal_rank_fusion([first, learned], [1.0, self.weight], k=self.fusion_k)
        return fused[:k], {**trace, "learned": [p["id"] for p in learned[:k]]}
