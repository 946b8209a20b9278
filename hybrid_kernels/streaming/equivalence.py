"""The whole-stream computation a :class:`.session.StreamingSession` reproduces chunk by chunk.

Used by the tests and as executable documentation of the semantics (see .session's docstring).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import api as _api
from .positions import apply_rope
from .session import merge_attention

__all__ = ["whole_stream_attention"]


def whole_stream_attention(q: Tensor, k: Tensor, v: Tensor, *, num_sinks: int,
                           window: Optional[int], rope_theta: Optional[float] = None,
                           backend: str = "auto") -> Tensor:
    """Attention of the whole stream (q, k, v: (B, H, N, D), pre-RoPE) in one go.

    Without RoPE this is the single call ``hk.attention(q, k, v, causal=True, window=(W, 0),
    landmarks=arange(S))``. With RoPE the visible key set is the same; rows r <= S + W use true
    positions and rows r > S + W see window keys at true distance and sink s at distance
    S + W - s (merged through the log-sum-exp).
    """
    S, W, N, dev = num_sinks, window, q.shape[2], q.device
    call = lambda *a, **kw: _api.attention(*a, backend=backend, **kw)  # noqa: E731
    if W is None:
        if rope_theta is not None:
            pos = torch.arange(N, device=dev)
            q, k = apply_rope(q, pos, rope_theta), apply_rope(k, pos, rope_theta)
        return call(q, k, v, causal=True)
    landmarks = torch.arange(min(S, N), device=dev) if S else None
    if rope_theta is None:
        return call(q, k, v, causal=True, window=(W, 0), landmarks=landmarks)
    head = min(N, S + W + 1)
    pos = torch.arange(head, device=dev)
    outs = [call(apply_rope(q[:, :, :head], pos, rope_theta), apply_rope(k[:, :, :head], pos, rope_theta),
                 v[:, :, :head], causal=True, window=(W, 0),
                 landmarks=None if landmarks is None else landmarks[landmarks < head])]
    if head < N:
        pos_k = torch.arange(N - S, device=dev)
        qa = apply_rope(q[:, :, head:], torch.arange(head - S, N - S, device=dev), rope_theta)
        out, lse = call(qa, apply_rope(k[:, :, S:], pos_k, rope_theta), v[:, :, S:], causal=True,
                        window=(W, 0), return_lse=True)
        if S:
            qb = apply_rope(q[:, :, head:], torch.full((N - head,), S + W, device=dev), rope_theta)
            sk = apply_rope(k[:, :, :S], torch.arange(S, device=dev), rope_theta)
            out_s, lse_s = call(qb, sk, v[:, :, :S], return_lse=True)
            out = merge_attention(out, lse, out_s, lse_s)
        outs.append(out)
    return torch.cat(outs, 2)
