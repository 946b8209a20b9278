"""A vector store split over several faiss indexes, with VectorStore's API.

    store = ShardedVectorStore(dim=384, num_shards=4)     # each shard a VectorStore
    ids = store.add(vectors, payloads=texts)              # vector i goes to shard id % num_shards
    scores, ids = store.search(queries, k=10)             # faiss.IndexShards queries every shard
    store.save("dir")                                     # dir/shard_000, dir/shard_001, ...
    ShardedVectorStore.load("dir")

Each shard is an ordinary :class:`~hybrid_kernels.retrieval.vector_store.VectorStore` saved in
its own folder, so shards can live on different disks or be built by different processes (one
per rank) and searched together. Search runs on ``faiss.IndexShards`` (threaded, one thread per
shard) over the shards' indexes; for flat indexes its top-k equals the unsharded index's. HNSW
shards (whose removals are filtered, not deleted) are searched one by one and merged here.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .vector_store import VectorStore, _faiss, assign_ids

__all__ = ["ShardedVectorStore"]


class ShardedVectorStore:
    """See the module docstring. Keyword arguments other than ``num_shards`` go to every
    shard's VectorStore."""

    def __init__(self, dim: int, *, num_shards: int = 2, **store_kwargs: Any):
        if not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"num_shards must be a positive int; got {num_shards!r}")
        self.shards: List[VectorStore] = [VectorStore(dim, **store_kwargs) for _ in range(num_shards)]
        self.dim = dim
        self._next_id = 0

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def _shard_of(self, ids: np.ndarray) -> np.ndarray:
        return ids % len(self.shards)

    def add(self, vectors, payloads: Optional[Sequence[Any]] = None,
            ids: Optional[Iterable[int]] = None) -> np.ndarray:
        """Add vectors (n, dim); returns their int64 ids (consecutive unless given)."""
        first = self.shards[0]
        a = first._prep(vectors, "vectors")  # validates once, before any shard changes
        n = a.shape[0]
        taken = set(self.ids())
        new_ids = assign_ids(n, payloads, ids, self._next_id, taken.__contains__)
        where = self._shard_of(new_ids)
        for r, shard in enumerate(self.shards):
            sel = np.nonzero(where == r)[0]
            if sel.size:
                shard.add(a[sel], None if payloads is None else [payloads[i] for i in sel],
                          ids=new_ids[sel])
        if n:
            self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        return new_ids

    def remove(self, ids) -> int:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        where = self._shard_of(ids)
        return sum(shard.remove(ids[where == r]) for r, shard in enumerate(self.shards))

    def search(self, queries, k: int = 5) -> Tuple[np.ndarray, np.ndarray]:
        """Top-k over every shard: (scores (Q, k) float32, ids (Q, k) int64), best first;
        missing results have id -1 and score -inf (ip) / +inf (l2)."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int; got {k!r}")
        first = self.shards[0]
        a = first._prep(queries, "queries")
        live = [s for s in self.shards if s._index is not None and len(s)]
        worst = -np.inf if first.metric == "ip" else np.inf
        if not live:
            return np.full((a.shape[0], k), worst, np.float32), np.full((a.shape[0], k), -1, np.int64)
        if first.kind == "hnsw":
            return self._merge([s.search(a, k) for s in live], k, worst)
        faiss = _faiss()
        shards = faiss.IndexShards(self.dim, True, False)  # threaded, ids kept as given
        for s in live:
            shards.add_shard(s._index)
        kk = min(k, sum(int(s._index.ntotal) for s in live))
        scores, ids = shards.search(a, kk)
        out_s = np.full((a.shape[0], k), worst, np.float32)
        out_i = np.full((a.shape[0], k), -1, np.int64)
        out_s[:, :kk], out_i[:, :kk] = scores, ids
        out_s[out_i < 0] = worst
        return out_s, out_i

    @staticmethod
    def _merge(results, k: int, worst: float) -> Tuple[np.ndarray, np.ndarray]:
        scores = np.concatenate([r[0] for r in results], axis=1)
        ids = np.concatenate([r[1] for r in results], axis=1)
        order = np.argsort(-scores if worst < 0 else scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    def payload(self, id_: int) -> Any:
        return self.shards[int(id_) % len(self.shards)].payload(id_)

    def ids(self) -> List[int]:
        return sorted(i for s in self.shards for i in s.ids())

    def save(self, directory: str) -> None:
        """``directory/shard_NNN`` per shard (a VectorStore each) and ``sharded.json``."""
        os.makedirs(directory, exist_ok=True)
        for r, shard in enumerate(self.shards):
            shard.save(os.path.join(directory, f"shard_{r:03d}"))
        with open(os.path.join(directory, "sharded.json"), "w") as f:
            json.dump({"format": 1, "dim": self.dim, "num_shards": len(self.shards),
                       "next_id": self._next_id}, f)

    @classmethod
    def load(cls, directory: str, use_gpu: Any = "auto") -> "ShardedVectorStore":
        path = os.path.join(directory, "sharded.json")
        if not os.path.exists(path):
            raise ValueError(f"{directory!r} is not a saved ShardedVectorStore (no sharded.json)")
        with open(path) as f:
            meta = json.load(f)
        store = cls.__new__(cls)
        store.dim, store._next_id = meta["dim"], meta["next_id"]
        store.shards = [VectorStore.load(os.path.join(directory, f"shard_{r:03d}"), use_gpu=use_gpu)
                        for r in range(meta["num_shards"])]
        return store
