"""StreamingEncoder: a small causal transformer whose attention runs on a StreamingSession.

Pre-norm blocks (RMSNorm, GQA attention with RoPE, GELU MLP). ``encoder.feed(session, ids)``
consumes a chunk of token ids of any length and returns its hidden states; the stream's state
lives in the session (bounded: S sinks + W recent tokens per layer). Feeding a stream in chunks
gives the same hidden states as ``encoder(ids)`` on the whole stream (one chunk), up to fp
rounding, for any chunking.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .session import StreamingSession

__all__ = ["StreamingEncoder"]


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, mlp_hidden: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.wq = nn.Linear(dim, heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(heads * head_dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, dim))

    def forward(self, x: Tensor, session: StreamingSession, layer: int) -> Tensor:
        B, n, _ = x.shape
        h = self.norm1(x)
        q = self.wq(h).view(B, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(h).view(B, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(h).view(B, n, self.kv_heads, self.head_dim).transpose(1, 2)
        a = session.attend(layer, q, k, v)
        x = x + self.wo(a.transpose(1, 2).reshape(B, n, -1))
        return x + self.mlp(self.norm2(x))


class StreamingEncoder(nn.Module):
    """Token ids -> hidden states, streamed.

    Args:
        vocab_size, dim, num_layers, num_heads: model size.
        num_kv_heads: key/value heads (GQA); default num_heads.
        mlp_hidden: MLP width; default 4 * dim.
        rope_theta: RoPE base (positions are re-based inside the cache, see .session).
    """

    def __init__(self, vocab_size: int = 256, dim: int = 64, num_layers: int = 2,
                 num_heads: int = 4, num_kv_heads: Optional[int] = None,
                 mlp_hidden: Optional[int] = None, rope_theta: float = 10000.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be a multiple of num_heads={num_heads}")
        self.vocab_size, self.dim, self.num_layers = vocab_size, dim, num_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.head_dim = dim // num_heads
        self.rope_theta = rope_theta
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(
            _Block(dim, num_heads, self.num_kv_heads, self.head_dim, mlp_hidden or 4 * dim)
            for _ in range(num_layers))
        self.norm = nn.RMSNorm(dim)

    def new_session(self, *, num_sinks: int = 4, window: Optional[int] = 256,
                    cache_dtype: str = "float32", int8_block: int = 32, backend: str = "auto",
                    retention=None) -> StreamingSession:
        """A fresh stream for this model (window=None, num_sinks=0: full-cache baseline)."""
        return StreamingSession(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                head_dim=self.head_dim, num_layers=self.num_layers,
                                num_sinks=num_sinks, window=window, rope_theta=self.rope_theta,
                                cache_dtype=cache_dtype, int8_block=int8_block, backend=backend,
                                retention=retention)

    def check_tokens(self, session: StreamingSession, token_ids: Tensor) -> None:
        """Raise TypeError/ValueError naming the problem if ``token_ids`` is not a valid chunk."""
        if not isinstance(session, StreamingSession):
            raise TypeError(f"session must be a StreamingSession; got {type(session).__name__}")
        c = session.config
        mine = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                    head_dim=self.head_dim, head_dim_v=self.head_dim,
                    num_layers=self.num_layers, rope_theta=self.rope_theta)
        if any(c[key] != val for key, val in mine.items()):
            raise ValueError(f"session was not made for this encoder (session {c}, encoder {mine}); "
                             f"use encoder.new_session()")
        if not isinstance(token_ids, Tensor):
            raise TypeError(f"token_ids must be a torch.Tensor; got {type(token_ids).__name__}")
        if token_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"token_ids must be an integer tensor; got {token_ids.dtype}")
        if token_ids.dim() != 2 or token_ids.shape[0] == 0 or token_ids.shape[1] == 0:
            raise ValueError(f"token_ids must be (B, n) with B, n >= 1; got shape {tuple(token_ids.shape)}")
        if session.batch_size is not None and token_ids.shape[0] != session.batch_size:
            raise ValueError(f"token_ids has batch size {token_ids.shape[0]} but the stream has "
                             f"{session.batch_size}")
        if session.retention is not None and token_ids.shape[0] != 1:
            raise ValueError("a session with a retention store streams one sequence (B = 1)")
        lo, hi = int(token_ids.min()), int(token_ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token_ids must lie in [0, vocab_size={self.vocab_size}); got "
                             f"min {lo}, max {hi}")

    @torch.no_grad()
    def feed(self, session: StreamingSession, token_ids: Tensor) -> Tensor:
        """Consume one chunk (B, n) and return its hidden states (B, n, dim). A rejected chunk
        (bad ids, or any error inside) leaves the session unchanged."""
        self.check_tokens(session, token_ids)
        start = session.position
        x = self.embed(token_ids.to(self.embed.weight.device).long())
        with session.chunk(token_ids.shape[1]):
            for i, block in enumerate(self.blocks):
                x = block(x, session, i)
            x = self.norm(x)
            if session.retention is not None:
                session.retention.ingest(x[0], start)
        return x

    def forward(self, token_ids: Tensor, *, num_sinks: int = 4, window: Optional[int] = 256) -> Tensor:
        """The whole sequence as one chunk of a fresh stream (the whole-stream reference)."""
        return self.feed(self.new_session(num_sinks=num_sinks, window=window), token_ids)
