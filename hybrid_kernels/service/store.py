"""Durable document store: SQLite in WAL mode with ``synchronous=FULL``, so a committed update is
on disk (fsync'd) before the service acknowledges it, plus an append-only retention log.

Documents are split into segments (the retrieval unit, :func:`hybrid_kernels.rag.chunk_text`);
the faiss :class:`~hybrid_kernels.retrieval.VectorStore` is keyed by segment id and is rebuilt
from the segments table on start, so the database is the only state that must survive a crash.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT NOT NULL,
                                      text TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS segments (id INTEGER PRIMARY KEY AUTOINCREMENT,
                                     document_id INTEGER NOT NULL, title TEXT NOT NULL,
                                     text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS segments_by_document ON segments(document_id);
CREATE TABLE IF NOT EXISTS retention_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL,
                                          op TEXT NOT NULL, detail TEXT NOT NULL);
"""


@dataclass
class Applied:
    """What one committed update changed (ids of new rows, counts of removed ones)."""
    log_seq: int
    added_documents: List[int]
    added_segments: List[Tuple[int, int, str, str]]   # (segment id, document id, title, text)
    removed_documents: int
    removed_segment_ids: List[int]


class DocumentStore:
    """Thread-safe: one connection behind a lock (SQLite serializes writers anyway)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal" and path != ":memory:":
            raise ValueError(f"db {path!r}: SQLite refused WAL mode (got {mode!r})")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def apply(self, add: Sequence[Dict[str, str]], remove_documents: Sequence[int],
              remove_segments: Sequence[int], chunker) -> Applied:
        """One transaction: add documents (``chunker(text) -> [segment text]``), remove documents
        (with their segments) and single segments, append to the retention log, commit."""
        now = time.time()
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                doc_ids, segs = [], []
                for doc in add:
                    cur = db.execute("INSERT INTO documents (title, text, created) VALUES (?, ?, ?)",
                                     (doc["title"], doc["text"], now))
                    doc_ids.append(cur.lastrowid)
                    for piece in chunker(doc["text"]):
                        cur = db.execute("INSERT INTO segments (document_id, title, text) VALUES (?, ?, ?)",
                                         (doc_ids[-1], doc["title"], piece))
                        segs.append((cur.lastrowid, doc_ids[-1], doc["title"], piece))
                removed_seg_ids: List[int] = []
                removed_docs = 0
                for d in remove_documents:
                    removed_seg_ids += [r[0] for r in db.execute(
                        "SELECT id FROM segments WHERE document_id = ?", (d,))]
                    db.execute("DELETE FROM segments WHERE document_id = ?", (d,))
                    removed_docs += db.execute("DELETE FROM documents WHERE id = ?", (d,)).rowcount
                for s in remove_segments:
                    if db.execute("DELETE FROM segments WHERE id = ?", (s,)).rowcount:
                        removed_seg_ids.append(s)
                detail = {"added_documents": doc_ids, "added_segments": [s[0] for s in segs],
                          "removed_documents": list(remove_documents),
                          "removed_segments": removed_seg_ids}
                cur = db.execute("INSERT INTO retention_log (ts, op, detail) VALUES (?, ?, ?)",
                                 (now, "update", json.dumps(detail)))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return Applied(cur.lastrowid, doc_ids, segs, removed_docs, removed_seg_ids)

    def segments(self) -> List[Tuple[int, int, str, str]]:
        """Every live segment: (id, document_id, title, text), by id."""
        with self._lock:
            return list(self._db.execute("SELECT id, document_id, title, text FROM segments ORDER BY id"))

    def counts(self) -> Dict[str, int]:
        with self._lock:
            one = lambda sql: int(self._db.execute(sql).fetchone()[0])  # noqa: E731
            return {"documents": one("SELECT COUNT(*) FROM documents"),
                    "segments": one("SELECT COUNT(*) FROM segments"),
                    "log_entries": one("SELECT COUNT(*) FROM retention_log")}

    def document_ids(self) -> List[int]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT id FROM documents ORDER BY id")]
