"""Hierarchical encoding of a long input with retrieved passages, on the attention kernels.

``RetrievalAugmentedSegments`` splits the main sequence into segments of ``segment_len`` tokens.
Each layer runs

1. segment -> cross-segment self-attention in one ``hk.attention`` call: every token sees a
   ``window`` of its neighbours and the segment landmarks (the first token of every segment),
   which see every token, so information crosses segments through the landmarks at
   O(N * (window + N / segment_len)) cost;
2. cross-attention from every token to the retrieved passages' states (all passages' tokens as
   one key sequence with their padding mask), also through ``hk.attention``;
3. a feed-forward block (pre-norm residuals throughout).

After the layers, global synthesis: each segment's landmark state scores every passage (scaled
dot product with the passage's mean state, softmax over the real passages) -> per-segment
relevance, and the landmark states are pooled into one summary vector.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import attention

__all__ = ["RetrievalAugmentedSegments", "SegmentsOutput"]


@dataclass
class SegmentsOutput:
    hidden: Tensor      # (B, N, d) token states
    relevance: Tensor   # (B, n_segments, P) per-segment passage relevance, rows sum to 1
    summary: Tensor     # (B, d) pooled landmark states


class _Layer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dim_ff: int, dropout: float):
        super().__init__()
        self.h = num_heads
        self.norm_self, self.norm_cross, self.norm_ff = (nn.LayerNorm(d_model) for _ in range(3))
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.self_out = nn.Linear(d_model, d_model)
        self.q_cross = nn.Linear(d_model, d_model)
        self.kv_cross = nn.Linear(d_model, 2 * d_model)
        self.cross_out = nn.Linear(d_model, d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, dim_ff), nn.GELU(), nn.Linear(dim_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def _heads(self, x: Tensor) -> Tensor:  # (B, N, d) -> (B, H, N, d / H)
        B, N, d = x.shape
        return x.view(B, N, self.h, d // self.h).transpose(1, 2)

    def _merge(self, x: Tensor) -> Tensor:  # (B, H, N, dh) -> (B, N, H * dh)
        B, H, N, dh = x.shape
        return x.transpose(1, 2).reshape(B, N, H * dh)

    def forward(self, x, passages, passage_keys_mask, key_padding_mask, window, landmarks, backend):
        q, k, v = (self._heads(t) for t in self.qkv(self.norm_self(x)).chunk(3, dim=-1))
        a = attention(q, k, v, window=window, landmarks=landmarks, key_padding_mask=key_padding_mask,
                      backend=backend)
        x = x + self.drop(self.self_out(self._merge(a)))
        qc = self._heads(self.q_cross(self.norm_cross(x)))
        kc, vc = (self._heads(t) for t in self.kv_cross(passages).chunk(2, dim=-1))
        c = attention(qc, kc, vc, key_padding_mask=passage_keys_mask, backend=backend)
        x = x + self.drop(self.cross_out(self._merge(c)))
        return x + self.drop(self.ff(self.norm_ff(x)))


class RetrievalAugmentedSegments(nn.Module):
    """x (B, N, d) with passages (B, P, Lp, d) -> ``SegmentsOutput``.

    ``segment_len``: tokens per segment (the landmark is each segment's first token);
    ``window``: (left, right) tokens each token sees around itself; ``cross_segment=False`` drops
    the landmarks (segments then only see their window: for ablations). ``backend`` is handed to
    ``hk.attention`` ("auto", "cpu", "triton", "reference", ...).
    """

    def __init__(self, d_model: int, num_heads: int, *, segment_len: int, window=(32, 32),
                 num_layers: int = 2, dim_ff: Optional[int] = None, dropout: float = 0.0,
                 cross_segment: bool = True, backend: str = "auto"):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of num_heads ({num_heads})")
        if segment_len < 1:
            raise ValueError(f"segment_len must be >= 1, got {segment_len}")
        self.segment_len, self.window = segment_len, tuple(window)
        self.cross_segment, self.backend = cross_segment, backend
        self.layers = nn.ModuleList(_Layer(d_model, num_heads, dim_ff or 4 * d_model, dropout)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.passage_norm = nn.LayerNorm(d_model)
        self.pool = nn.Linear(d_model, 1)

    def forward(self, x: Tensor, passages: Tensor, passage_mask: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None) -> SegmentsOutput:
        """x (B, N, d); passages (B, P, Lp, d); passage_mask (B, P, Lp) bool, True = real token
        (None: all real); key_padding_mask (B, N) bool, True = real token (None: all real)."""
        B, N, d = self._check(x, passages, passage_mask, key_padding_mask)
        P, Lp = passages.shape[1], passages.shape[2]
        if passage_mask is None:
            passage_mask = torch.ones(B, P, Lp, dtype=torch.bool, device=x.device)
        starts = torch.arange(0, N, self.segment_len, device=x.device)
        landmarks = starts if self.cross_segment else None
        flat_passages = self.passage_norm(passages.reshape(B, P * Lp, d))
        keys_mask = passage_mask.reshape(B, P * Lp)
        for layer in self.layers:
            x = layer(x, flat_passages, keys_mask, key_padding_mask, self.window, landmarks,
                      self.backend)
        x = self.norm(x)
        marks = x[:, starts]                                                   # (B, S, d)
        m = passage_mask.unsqueeze(-1).to(x.dtype)
        pooled = (flat_passages.view(B, P, Lp, d) * m).sum(2) / m.sum(2).clamp_min(1.0)  # (B, P, d)
        scores = marks @ pooled.transpose(1, 2) / d ** 0.5                    # (B, S, P)
        real = passage_mask.any(-1)                                            # (B, P)
        scores = scores.masked_fill(~real[:, None, :], float("-inf"))
        relevance = torch.nan_to_num(scores.softmax(-1), nan=0.0)  # no real passage: all zeros
        weights = self.pool(marks).squeeze(-1).softmax(-1)                     # (B, S)
        summary = (weights.unsqueeze(-1) * marks).sum(1)
        return SegmentsOutput(hidden=x, relevance=relevance, summary=summary)

    @staticmethod
    def _check(x, passages, passage_mask, key_padding_mask):
        if x.dim() != 3:
            raise ValueError(f"x must be (B, N, d); got shape {tuple(x.shape)}")
        B, N, d = x.shape
        if passages.dim() != 4 or passages.shape[0] != B or passages.shape[3] != d:
            raise ValueError(f"passages must be (B, P, Lp, d) = ({B}, P, Lp, {d}); got shape "
                             f"{tuple(passages.shape)}")
        if passage_mask is not None and (passage_mask.dtype != torch.bool
                                         or tuple(passage_mask.shape) != tuple(passages.shape[:3])):
            raise ValueError(f"passage_mask must be bool of shape {tuple(passages.shape[:3])}; got "
                             f"{passage_mask.dtype} {tuple(passage_mask.shape)}")
        if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                             or tuple(key_padding_mask.shape) != (B, N)):
            raise ValueError(f"key_padding_mask must be bool of shape ({B}, {N}); got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        return B, N, d
