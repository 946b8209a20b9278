"""Settings of one server (``hybrid-kernels serve`` options)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

API_KEY_ENV = "HYBRID_KERNELS_API_KEY"


@dataclass
class ServiceConfig:
    """Attributes:
        db_path: SQLite file of documents and the retention log (created if absent).
        api_key: key for mutating endpoints (header ``X-API-Key``).
        model_dir: FiD reader checkpoint with its tokenizer (``HybridRAGPipeline.save`` layout or
            a checkpoint directory); None = the small default reader built offline.
        default_reader: without ``model_dir``: "trained" (trained on the generated QA task on
            first use, cached under ``cache_dir``) or "random" (random weights, instant).
        cache_dir: default ``$HYBRID_KERNELS_CACHE`` or ``~/.cache/hybrid_kernels``.
        student_dir: cascade student checkpoint (same tokenizer); None = a default student.
        diffusion_dir: saved masked diffusion LM; None = the default one.
        embedder: "hashing" (dependency-free) or "minilm" (the packaged all-MiniLM-L6-v2).
        workers: threads running model/index work (default: the CPU cores).
        queue_limit: requests allowed to wait for a worker; more are answered 503.
        timeout_s: per-request limit; past it the answer is 504.
        threshold: cascade confidence threshold (used when the student directory has no
            ``cascade_calibration.json``, or when ``threshold_from_calibration`` is False).
    """
    db_path: str
    api_key: str
    model_dir: Optional[str] = None
    default_reader: str = "trained"
    cache_dir: Optional[str] = None
    student_dir: Optional[str] = None
    diffusion_dir: Optional[str] = None
    embedder: str = "hashing"
    workers: int = 0
    queue_limit: int = 32
    timeout_s: float = 30.0
    threshold: float = 0.5
    threshold_from_calibration: bool = True
    chunk_words: int = 100
    seed: int = 0

    def __post_init__(self):
        if not self.api_key:
            raise ValueError(f"api_key must be a non-empty string (--api-key or ${API_KEY_ENV})")
        if self.default_reader not in ("trained", "random"):
            raise ValueError(f"default_reader must be 'trained' or 'random'; got {self.default_reader!r}")
        if self.embedder not in ("hashing", "minilm"):
            raise ValueError(f"embedder must be 'hashing' or 'minilm'; got {self.embedder!r}")
        if self.workers == 0:
            self.workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if self.workers < 1 or self.queue_limit < 0 or not self.timeout_s > 0:
            raise ValueError(f"need workers >= 1, queue_limit >= 0, timeout_s > 0; got "
                             f"{self.workers}, {self.queue_limit}, {self.timeout_s}")
