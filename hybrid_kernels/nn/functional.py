"""One call that runs a pattern on the kernels when it can, and exactly (dense) when it cannot.

The kernels take a key padding mask, causality and the window/landmark pattern. Anything else
(an arbitrary additive or boolean ``attn_mask``, attention dropout, returning the weights) runs
the dense path: the same visibility, built explicitly and intersected with the extra mask, through
``F.scaled_dot_product_attention`` (or an explicit softmax when the weights are wanted). Rows that
see no key output zeros on both paths (hk's contract; nn.MultiheadAttention would give NaN).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..api import attention as hk_attention
from ..reference import visibility_mask
from .spec import PatternSpec

__all__ = ["attend", "KERNEL_DTYPES"]

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def attend(q: Tensor, k: Tensor, v: Tensor, spec: PatternSpec, *,
           landmarks: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
           causal: bool = False, attn_mask: Optional[Tensor] = None, scale: Optional[float] = None,
           dropout_p: float = 0.0, need_weights: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv) -> (out (B, Hq, Nq, Dv), weights).

    landmarks: (B, G) int64 key positions or None (see ``PatternSpec.landmark_positions``).
    key_padding_mask: bool (B, Nk), True = real token. causal: bottom-right aligned.
    attn_mask: None, bool (True = may attend) or float additive, broadcastable to
    (B, Hq, Nq, Nk); forces the dense path. weights (B, Hq, Nq, Nk) only if ``need_weights``.
    """
    use_kernels = (attn_mask is None and dropout_p == 0.0 and not need_weights
                   and q.dtype in KERNEL_DTYPES and q.dtype == k.dtype == v.dtype)
    if use_kernels:
        out = hk_attention(q, k, v, window=spec.window, landmarks=landmarks, causal=causal,
                           key_padding_mask=key_padding_mask, scale=scale, quant=spec.quant,
                           backend=spec.backend)
        return out, None
    return dense_attend(q, k, v, spec, landmarks=landmarks, key_padding_mask=key_padding_mask,
                        causal=causal, attn_mask=attn_mask, scale=scale, dropout_p=dropout_p,
                        need_weights=need_weights)


def pattern_mask(spec: PatternSpec, batch: int, nq: int, nk: int, *, landmarks: Optional[Tensor],
                 key_padding_mask: Optional[Tensor], causal: bool, device) -> Tensor:
    """bool (B, 1, Nq, Nk), True = visible under the pattern (the kernels' contract)."""
    return visibility_mask(batch, nq, nk, window_left=spec.window_left,
                           window_right=spec.window_right, causal=causal, landmarks=landmarks,
                           key_padding_mask=key_padding_mask, device=device)


def dense_attend(q: Tensor, k: Tensor, v: Tensor, spec: PatternSpec, *, landmarks, key_padding_mask,
                 causal, attn_mask, scale, dropout_p, need_weights) -> Tuple[Tensor, Optional[Tensor]]:
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    allowed = pattern_mask(spec, B, Nq, Nk, landmarks=landmarks,
                           key_padding_mask=key_padding_mask, causal=causal, device=q.device)
    if attn_mask is None:
        additive = None
    elif attn_mask.dtype == torch.bool:
        allowed = allowed & attn_mask
        additive = None
    else:
        additive = attn_mask.to(q.dtype)
        allowed = allowed & (additive != float("-inf"))
    if Hq != Hk:
        k = k.repeat_interleave(Hq // Hk, dim=1)
        v = v.repeat_interleave(Hq // Hk, dim=1)
    row_any = allowed.any(dim=-1, keepdim=True)
    if need_weights:
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        if additive is not None:
            scores = scores + additive
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores, dim=-1).masked_fill(~row_any, 0.0)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.matmul(weights, v)
        return out, weights
    if additive is None:
        mask = allowed
    else:
        mask = additive.masked_fill(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.masked_fill(~row_any, 0.0), None
