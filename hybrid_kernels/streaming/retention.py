"""Retention: a bounded, stream-fed store of finished segments, so a long-running stream can
retrieve what fell out of its attention window.

:class:`RetentionStore` receives the encoder's per-token output embeddings as the stream goes;
every ``segment_tokens`` tokens form a finished segment whose mean embedding (L2-normalized) is
added to a vector store with its stream span [start, end). At ``capacity`` segments the store
evicts before adding: the oldest segment (``eviction="oldest"``), or the one returned least often
by :meth:`RetentionStore.search` (``"least_retrieved"``, ties broken by age).

Vector store protocol (what ``store=`` must provide): ``add(ids: LongTensor (m,), vectors:
Tensor (m, d))``, ``search(queries: (m, d), k) -> (scores (m, k'), ids (m, k'))`` by cosine
similarity, best first, k' = min(k, len), ``remove(ids)``, ``__len__``, ``state_dict()``,
``load_state_dict(state)`` and ``nbytes()``. By default the store is
:class:`hybrid_kernels.retrieval.VectorStore` (faiss, exact "flat" index) behind
:class:`VectorStoreAdapter`; when faiss is not installed it is :class:`TorchCosineStore`, a
minimal pure-torch exact cosine store with the same protocol. Both are bounded by ``capacity``
(evicted vectors are really removed from the flat index).
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import Tensor

__all__ = ["TorchCosineStore", "VectorStoreAdapter", "default_store", "RetentionStore"]

EVICTION_POLICIES = ("oldest", "least_retrieved")


class TorchCosineStore:
    """Exact cosine-similarity store: (N, d) float32 unit vectors and their int64 ids."""

    def __init__(self, dim: int, device=None):
        self.dim = dim
        self.vectors = torch.zeros(0, dim, device=device)
        self.ids = torch.zeros(0, dtype=torch.int64, device=device)

    def __len__(self) -> int:
        return int(self.ids.numel())

    def add(self, ids: Tensor, vectors: Tensor) -> None:
        if vectors.dim() != 2 or vectors.shape[1] != self.dim or ids.shape != (vectors.shape[0],):
            raise ValueError(f"add() needs ids (m,) and vectors (m, {self.dim}); got "
                             f"{tuple(ids.shape)} and {tuple(vectors.shape)}")
        if bool(torch.isin(ids.to(self.ids.device), self.ids).any()):
            raise ValueError("add(): some ids are already in the store")
        v = torch.nn.functional.normalize(vectors.detach().float(), dim=-1).to(self.vectors.device)
        self.vectors = torch.cat([self.vectors, v])
        self.ids = torch.cat([self.ids, ids.to(device=self.ids.device, dtype=torch.int64)])

    def search(self, queries: Tensor, k: int):
        qn = torch.nn.functional.normalize(queries.detach().float().to(self.vectors.device), dim=-1)
        scores = qn @ self.vectors.T
        top = torch.topk(scores, min(k, len(self)), dim=-1)
        return top.values, self.ids[top.indices]

    def remove(self, ids: Tensor) -> None:
        keep = ~torch.isin(self.ids, ids.to(self.ids.device))
        self.vectors, self.ids = self.vectors[keep], self.ids[keep]

    def nbytes(self) -> int:
        return self.vectors.nbytes + self.ids.nbytes

    def state_dict(self) -> Dict[str, Tensor]:
        return {"vectors": self.vectors.clone(), "ids": self.ids.clone()}

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        vectors, ids = state["vectors"], state["ids"]
        if vectors.dim() != 2 or vectors.shape[1] != self.dim or ids.shape != (vectors.shape[0],):
            raise ValueError(f"store state has vectors {tuple(vectors.shape)} and ids "
                             f"{tuple(ids.shape)}; expected (m, {self.dim}) and (m,)")
        self.vectors, self.ids = vectors.clone(), ids.clone()


class VectorStoreAdapter:
    """:class:`hybrid_kernels.retrieval.VectorStore` (faiss flat, cosine) behind the protocol.

    The raw vectors are also kept (capacity x dim floats) so that :meth:`state_dict` /
    :meth:`load_state_dict` rebuild an identical index (bit-exact resume) without touching files.
    """

    def __init__(self, dim: int):
        from ..retrieval import VectorStore
        self.dim = dim
        self._make = lambda: VectorStore(dim, index="flat", metric="ip", normalize=True, use_gpu=False)
        self.store = self._make()
        self.raw = torch.zeros(0, dim)
        self.ids = torch.zeros(0, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.store)

    def add(self, ids: Tensor, vectors: Tensor) -> None:
        vectors = vectors.detach().float().cpu()
        self.store.add(vectors, ids=ids.tolist())
        self.raw = torch.cat([self.raw, vectors])
        self.ids = torch.cat([self.ids, ids.to(torch.int64).cpu()])

    def search(self, queries: Tensor, k: int):
        scores, ids = self.store.search(queries.detach().float().cpu(), k=min(k, len(self)))
        return torch.from_numpy(scores), torch.from_numpy(ids)

    def remove(self, ids: Tensor) -> None:
        self.store.remove(ids.cpu().numpy())
        keep = ~torch.isin(self.ids, ids.cpu())
        self.raw, self.ids = self.raw[keep], self.ids[keep]

    def nbytes(self) -> int:
        # faiss flat index: one float32 vector + one int64 id per entry; plus the raw copies.
        return len(self) * (self.dim * 4 + 8) + self.raw.nbytes + self.ids.nbytes

    def state_dict(self) -> Dict[str, Tensor]:
        return {"vectors": self.raw.clone(), "ids": self.ids.clone()}

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        vectors, ids = state["vectors"], state["ids"]
        if vectors.dim() != 2 or vectors.shape[1] != self.dim or ids.shape != (vectors.shape[0],):
            raise ValueError(f"store state has vectors {tuple(vectors.shape)} and ids "
                             f"{tuple(ids.shape)}; expected (m, {self.dim}) and (m,)")
        store = self._make()
        if len(ids):
            store.add(vectors, ids=ids.tolist())
        self.store, self.raw, self.ids = store, vectors.clone(), ids.clone()


def default_store(dim: int):
    """hybrid_kernels.retrieval.VectorStore (faiss) if faiss is installed, else TorchCosineStore."""
    try:
        import faiss  # noqa: F401
        return VectorStoreAdapter(dim)
    except ImportError:
        return TorchCosineStore(dim)


class RetentionStore:
    """Segments of a stream's output embeddings, bounded to ``capacity`` entries.

    Args:
        dim: embedding size.
        capacity: maximum number of stored segments (>= 1).
        segment_tokens: tokens per segment (>= 1).
        eviction: "oldest" or "least_retrieved".
        store: a vector store following the protocol in the module docstring; default
            :func:`default_store` (faiss VectorStore, else TorchCosineStore).
    """

    def __init__(self, dim: int, *, capacity: int = 1024, segment_tokens: int = 64,
                 eviction: str = "oldest", store=None):
        for name, value in (("dim", dim), ("capacity", capacity), ("segment_tokens", segment_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if eviction not in EVICTION_POLICIES:
            raise ValueError(f"eviction must be one of {EVICTION_POLICIES}; got {eviction!r}")
        self.dim, self.capacity, self.segment_tokens, self.eviction = dim, capacity, segment_tokens, eviction
        self.store = default_store(dim) if store is None else store
        self.reset()

    def reset(self) -> None:
        if getattr(self, "_ids", None) is not None and len(self._ids):
            self.store.remove(self._ids)
        self._pending_sum = torch.zeros(self.dim, dtype=torch.float64)
        self._pending_count = 0
        self._pending_start = 0
        self._next_id = 0
        # Metadata of the stored segments, parallel tensors in insertion order.
        self._ids = torch.zeros(0, dtype=torch.int64)
        self._spans = torch.zeros(0, 2, dtype=torch.int64)
        self._hits = torch.zeros(0, dtype=torch.int64)

    def __len__(self) -> int:
        return int(self._ids.numel())

    def ingest(self, embeddings: Tensor, start: int) -> List[int]:
        """Add the per-token embeddings (n, dim) of stream positions start..start+n-1. Returns
        the ids of segments finished by this call. Validates before changing anything."""
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
            raise ValueError(f"embeddings must be a tensor (n, {self.dim}); got {shape}")
        expected = self._pending_start + self._pending_count
        if start != expected:
            raise ValueError(f"start={start} but the retention store expects the stream to "
                             f"continue at position {expected}")
        if not bool(torch.isfinite(embeddings).all()):
            raise ValueError("embeddings contain NaN or Inf")
        emb = embeddings.detach().to("cpu", torch.float64)
        finished, i, n = [], 0, emb.shape[0]
        while i < n:
            take = min(self.segment_tokens - self._pending_count, n - i)
            self._pending_sum += emb[i : i + take].sum(0)
            self._pending_count += take
            i += take
            if self._pending_count == self.segment_tokens:
                finished.append(self._finish_segment())
        return finished

    def _finish_segment(self) -> int:
        if len(self) >= self.capacity:
            self._evict()
        seg_id = self._next_id
        vector = (self._pending_sum / self._pending_count).float()[None]
        self.store.add(torch.tensor([seg_id]), vector)
        end = self._pending_start + self._pending_count
        self._ids = torch.cat([self._ids, torch.tensor([seg_id])])
        self._spans = torch.cat([self._spans, torch.tensor([[self._pending_start, end]])])
        self._hits = torch.cat([self._hits, torch.zeros(1, dtype=torch.int64)])
        self._next_id += 1
        self._pending_sum.zero_()
        self._pending_count, self._pending_start = 0, end
        return seg_id

    def _evict(self) -> None:
        # Insertion order is age order, and argmin returns the first (oldest) minimum.
        victim = 0 if self.eviction == "oldest" else int(torch.argmin(self._hits))
        self.store.remove(self._ids[victim : victim + 1])
        keep = torch.arange(len(self)) != victim
        self._ids, self._spans, self._hits = self._ids[keep], self._spans[keep], self._hits[keep]

    def search(self, query: Tensor, k: int = 4) -> List[List[Dict[str, Any]]]:
        """For each query (dim,) or (m, dim): up to k segments, best first, as dicts with
        ``id``, ``start``, ``end``, ``score``. Each returned segment counts as retrieved."""
        if not isinstance(query, Tensor) or query.shape[-1] != self.dim or query.dim() not in (1, 2):
            raise ValueError(f"query must be a tensor (dim,) or (m, dim) with dim={self.dim}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int; got {k!r}")
        queries = query[None] if query.dim() == 1 else query
        if len(self) == 0:
            return [[] for _ in range(queries.shape[0])]
        scores, ids = self.store.search(queries, k)
        results = []
        for row_scores, row_ids in zip(scores.tolist(), ids.tolist()):
            row = []
            for score, seg_id in zip(row_scores, row_ids):
                idx = int((self._ids == seg_id).nonzero()[0, 0])
                self._hits[idx] += 1
                start, end = self._spans[idx].tolist()
                row.append({"id": seg_id, "start": start, "end": end, "score": score})
            results.append(row)
        return results

    def hits(self) -> Dict[int, int]:
        return dict(zip(self._ids.tolist(), self._hits.tolist()))

    def nbytes(self) -> int:
        own = sum(t.nbytes for t in (self._pending_sum, self._ids, self._spans, self._hits))
        return own + self.store.nbytes()

    def state_dict(self) -> Dict[str, Any]:
        return {"config": (self.dim, self.capacity, self.segment_tokens, self.eviction),
                "pending_sum": self._pending_sum.clone(), "pending_count": self._pending_count,
                "pending_start": self._pending_start, "next_id": self._next_id,
                "ids": self._ids.clone(), "spans": self._spans.clone(), "hits": self._hits.clone(),
                "store": self.store.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        config = (self.dim, self.capacity, self.segment_tokens, self.eviction)
        if state.get("config") != config:
            raise ValueError(f"retention state has config {state.get('config')}; expected {config}")
        m = state["ids"].numel()
        if state["spans"].shape != (m, 2) or state["hits"].shape != (m,) or m > self.capacity:
            raise ValueError("retention state is inconsistent (ids/spans/hits sizes)")
        self.store.load_state_dict(state["store"])
        self._pending_sum = state["pending_sum"].clone()
        self._pending_count, self._pending_start = state["pending_count"], state["pending_start"]
        self._next_id = state["next_id"]
        self._ids, self._spans, self._hits = (state[n].clone() for n in ("ids", "spans", "hits"))
