"""The service's state and blocking work: the durable :class:`DocumentStore`, the faiss index
over its segments, the FiD reader (through :class:`hybrid_kernels.rag.HybridRAGPipeline`) and an
optional teacher-student :class:`hybrid_kernels.cascade.Cascade`. Every method here blocks; the
app runs them on the :class:`WorkerPool`."""
from __future__ import annotations

import threading
import time
from typing import Callable, Dict, List, Optional

from .store import DocumentStore


class Engine:
    def __init__(self, pipeline, store: DocumentStore, cascade=None):
        self.pipe, self.store, self.cascade = pipeline, store, cascade
        self._index_lock = threading.Lock()
        # FiDT5 keeps per-call state on the module (cross-attention caches): one call at a time.
        self._model_lock = threading.Lock()
        self.rebuild_index()

    # ------------------------------------------------------------------ index
    def rebuild_index(self) -> int:
        """Re-embed every segment of the store into a fresh index (ids = segment ids)."""
        from ..retrieval.vector_store import VectorStore
        rows = self.store.segments()
        index = VectorStore(self.pipe.store.dim, use_gpu=False)
        self._index_rows(index, rows)
        with self._index_lock:
            self.pipe.store = index
        return len(rows)

    def _index_rows(self, index, rows) -> None:
        for i in range(0, len(rows), 256):
            part = rows[i:i + 256]
            vectors = self.pipe.embedder([f"{r[2]} {r[3]}".strip() for r in part])
            index.add(vectors, payloads=[{"document_id": r[1], "title": r[2], "text": r[3]} for r in part],
                      ids=[r[0] for r in part])

    def update(self, add: List[Dict[str, str]], remove_documents: List[int],
               remove_segments: List[int]):
        """Commit to the store (durable on return), then update the index."""
        from ..rag import chunk_text
        chunker = lambda text: chunk_text(text, self.pipe.chunk_words, self.pipe.chunk_overlap)  # noqa: E731
        applied = self.store.apply(add, remove_documents, remove_segments, chunker)
        with self._index_lock:
            self.pipe.store.remove(applied.removed_segment_ids)
            self._index_rows(self.pipe.store, applied.added_segments)
        return applied

    # ------------------------------------------------------------------ reading
    def retrieve(self, question: str, top_k: int):
        with self._index_lock:
            found, timings = self.pipe.retrieve([question], top_k)
        return found[0], timings

    def _inputs(self, question: str, passages):
        ids, mask = self.pipe._inputs([question], [passages])
        device = next(self.pipe.model.parameters()).device
        return ids.to(device), mask.to(device)

    def answer(self, question: str, top_k: int, max_new_tokens: int) -> dict:
        t0 = time.perf_counter()
        passages, timings = self.retrieve(question, top_k)
        ids, mask = self._inputs(question, passages)
        t1 = time.perf_counter()
        with self._model_lock:
            out = self.pipe.model.generate(ids, mask, max_new_tokens=max_new_tokens)
        t2 = time.perf_counter()
        timings.update(generate=t2 - t1, total=t2 - t0)
        return {"question": question, "answer": self.pipe.tokenizer.decode(out[0, 1:].tolist()),
                "passages": passages, "timings": timings}

    def answer_cascade(self, question: str, top_k: int, max_new_tokens: int) -> dict:
        if self.cascade is None:
            raise RuntimeError("this server has no cascade")
        t0 = time.perf_counter()
        passages, timings = self.retrieve(question, top_k)
        ids, mask = self._inputs(question, passages)
        with self._model_lock:
            result = self.cascade.answer(ids, mask, max_new_tokens=max_new_tokens)[0]
        timings.update(generate=time.perf_counter() - t0 - sum(timings.values()),
                       total=time.perf_counter() - t0)
        return {"question": question, "answer": result.answer, "passages": passages,
                "timings": timings, "answered_by": result.answered_by,
                "confidence": result.confidence, "threshold": self.cascade.threshold}

    def stream_tokens(self, question: str, passages, max_new_tokens: int,
                      emit: Callable[[str], None], cancelled: threading.Event) -> int:
        """Greedy decoding that calls ``emit(word)`` per generated token and stops at eos, at
        ``max_new_tokens`` or as soon as ``cancelled`` is set (client gone). Returns tokens made."""
        from ..cascade import greedy_steps
        ids, mask = self._inputs(question, passages)
        eos = self.pipe.model.config.eos_token_id
        made = 0
        with self._model_lock:
            for nxt, _ in greedy_steps(self.pipe.model, ids, mask, max_new_tokens, cancelled.is_set):
                if int(nxt[0]) == eos:
                    break
                emit(self.pipe.tokenizer.decode([int(nxt[0])]))
                made += 1
        return made

    def index_size(self) -> Dict[str, int]:
        with self._index_lock:
            n = len(self.pipe.store)
            return {"vectors": n, "bytes": n * self.pipe.store.dim * 4}


def process_memory() -> Optional[int]:
    """Resident set size of this process in bytes (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            import os
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None
