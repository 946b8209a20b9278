"""``SequenceParallelSelfAttention``: a self-attention layer whose sequence is sharded over the
ranks of a process group (each rank passes its rows), on :func:`hybrid_kernels.distributed.attention`.

    layer = SequenceParallelSelfAttention(512, 8, window=(256, 256), landmarks=64)
    y_shard = layer(x_shard)          # x_shard (B, n_local, 512): this rank's rows

Parameters are ordinary (wrap the model in DistributedDataParallel to keep them in sync); with
one process and no initialized group it is plain ``hk.attention``.
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import Tensor, nn

import hybrid_kernels as hk
from .sequence_parallel import attention as sp_attention

__all__ = ["SequenceParallelSelfAttention"]


class SequenceParallelSelfAttention(nn.Module):
    """x (B, n_local, E) -> (B, n_local, E); pattern keywords as in ``hk.attention`` (global
    coordinates: the same on every rank)."""

    def __init__(self, embed_dim: int, num_heads: int, *, window=None, landmarks=None,
                 causal: bool = False, group=None, bias: bool = True):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.window, self.landmarks, self.causal, self.group = window, landmarks, causal, group

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        B, n, E = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        kw = dict(window=self.window, landmarks=self.landmarks, causal=self.causal,
                  key_padding_mask=key_padding_mask)
        if dist.is_available() and dist.is_initialized():
            y = sp_attention(q, k, v, group=self.group, **kw)
        else:
            y = hk.attention(q, k, v, **kw)
        return self.out(y.transpose(1, 2).reshape(B, n, E))
