"""Pure-torch reference implementations of the attention contract.

These are the oracle for every kernel test and the last-resort fallback backend.

* :func:`dense_reference` builds the explicit (Nq, Nk) visibility mask. Simple and obviously
  right; O(N^2) memory, so only for tests and small inputs.
* :func:`blocked_reference` computes the same thing in query blocks, gathering only the keys the
  pattern lets a block see (the window band plus the landmark keys) and the landmark query rows
  apart, so memory and time grow with N * (window + landmarks), never N^2 for windowed patterns.
  It is differentiable through plain torch autograd.

Shapes: q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), Hq % Hk == 0.
landmarks: LongTensor (B, G) of sorted unique key positions, or None.
key_padding_mask: bool (B, Nk), True = real token, or None.
softcap: float, > 0 caps scores as softcap * tanh(s / softcap); bias: (Hq, Nq + Nk - 1) added by
query-key offset (see :mod:`hybrid_kernels.pattern`).
Returns (out (B, Hq, Nq, Dv), lse (B, Hq, Nq)) in ``compute_dtype`` (float32 by default).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["visibility_mask", "dense_reference", "blocked_reference", "blocked_reference_backward",
           "masked_softmax_lse", "modified_scores", "offset_index"]


def visibility_mask(
    batch: int,
    nq: int,
    nk: int,
    *,
    window_left: int,
    window_right: int,
    causal: bool,
    landmarks: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    device: torch.device | str = "cpu",
) -> Tensor:
    """Explicit visibility mask (B, 1, Nq, Nk), True = query i sees key j."""
    rows = torch.arange(nq, device=device) + (nk - nq)  # aligned query positions r
    cols = torch.arange(nk, device=device)
    return _visible(rows, cols, batch, nk, window_left, window_right, causal, landmarks,
                    key_padding_mask).unsqueeze(1)


def _landmark_flags(landmarks: Optional[Tensor], batch: int, nk: int, device) -> Tensor:
    """(B, Nk) bool, True where key position j is a landmark."""
    flags = torch.zeros(batch, nk, dtype=torch.bool, device=device)
    if landmarks is not None and landmarks.numel() > 0:
        flags.scatter_(1, landmarks.to(device).expand(batch, -1), True)
    return flags


def _visible(rows: Tensor, cols: Tensor, batch: int, nk: int, left: int, right: int,
             causal: bool, landmarks: Optional[Tensor], key_padding_mask: Optional[Tensor],
             flags: Optional[Tensor] = None) -> Tensor:
    """Visibility (B, len(rows), len(cols)) of key positions `cols` from aligned rows `rows`."""
    r = rows[:, None]
    j = cols[None, :]
    in_window = torch.ones(rows.numel(), cols.numel(), dtype=torch.bool, device=rows.device)
    if left >= 0:
        in_window &= j >= r - left
    if right >= 0:
        in_window &= j <= r + right
    if flags is None:
        flags = _landmark_flags(landmarks, batch, nk, rows.device)
    key_lm = flags[:, cols]                                          # (B, len(cols))
    valid_rows = (rows >= 0) & (rows < nk)
    row_lm = flags[:, rows.clamp(0, nk - 1)] & valid_rows[None, :]   # (B, len(rows))
    vis = in_window[None] | key_lm[:, None, :] | row_lm[:, :, None]
    if causal:
        vis = vis & (j <= r)[None]
    if key_padding_mask is not None:
        vis = vis & key_padding_mask[:, cols][:, None, :].to(torch.bool)
    return vis


def masked_softmax_lse(scores: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Softmax over the last dim restricted to ``mask``; rows with no visible key give p = 0 and
    lse = -inf. Gradients stay finite (no 0 * inf) for such rows."""
    s = scores.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    has_any = l > 0
    p = e / torch.where(has_any, l, torch.ones_like(l))
    lse = torch.where(has_any, m + torch.log(torch.where(has_any, l, torch.ones_like(l))),
                      torch.full_like(l, float("-inf")))
    return p, lse.squeeze(-1)


def offset_index(rows: Tensor, cols: Tensor, nk: int) -> Tensor:
    """(len(rows), len(cols)) index into a bias table's last dim: (j - r) + Nk - 1 for aligned
    query positions ``rows`` (r) and key positions ``cols`` (j)."""
    return cols[None, :] - rows[:, None] + (nk - 1)


def modified_scores(s: Tensor, rows: Tensor, cols: Tensor, nk: int, softcap: float,
                    bias: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """Apply the score modifiers to scaled scores s (..., Hq, R, C); returns (scores, dcap)
    where dcap = d(capped)/d(s) (None without softcap), for the backward."""
    dcap = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s, dcap = softcap * t, 1 - t * t
    if bias is not None:
        s = s + bias.to(s.dtype)[:, offset_index(rows, cols, nk)]
    return s, dcap


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def dense_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_left: int = -1,
    window_right: int = -1,
    causal: bool = False,
    landmarks: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    bias: Optional[Tensor] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tuple[Tensor, Tensor]:
    """The oracle: explicit mask, math in ``compute_dtype``. Returns (out, lse)."""
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    qf, kf, vf = (t.to(compute_dtype) for t in (q, k, v))
    kf, vf = _repeat_kv(kf, Hq // Hk), _repeat_kv(vf, Hq // Hk)
    mask = visibility_mask(B, Nq, Nk, window_left=window_left, window_right=window_right,
                           causal=causal, landmarks=landmarks,
                           key_padding_mask=key_padding_mask, device=q.device)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    rows = torch.arange(Nq, device=q.device) + (Nk - Nq)
    scores, _ = modified_scores(scores, rows, torch.arange(Nk, device=q.device), Nk, softcap, bias)
    p, lse = masked_softmax_lse(scores, mask)
    return torch.matmul(p, vf), lse


def _pattern_blocks(b: int, nq: int, nk: int, window_left: int, window_right: int, causal: bool,
                    landmarks: Optional[Tensor], key_padding_mask: Optional[Tensor],
                    flags: Tensor, block_size: int, device):
    """Yield (query indices, key indices, mask) covering every visible pair of batch row ``b``
    exactly once: regular query blocks over their window band plus the landmark keys outside it,
    then all landmark query rows over every key."""
    offset = nk - nq
    fb = flags[b : b + 1]
    pad_b = None if key_padding_mask is None else key_padding_mask[b : b + 1]
    lm_b = None if landmarks is None else landmarks[b : b + 1]
    lm_pos = lm_b[0] if lm_b is not None else torch.zeros(0, dtype=torch.long, device=device)
    for i0 in range(0, nq, block_size):
        i1 = min(i0 + block_size, nq)
        r0, r1 = i0 + offset, i1 + offset
        lo = 0 if window_left < 0 else max(r0 - window_left, 0)
        hi = nk if window_right < 0 else min(r1 - 1 + window_right + 1, nk)
        if causal:
            hi = min(hi, r1)
        lo = min(lo, max(hi, 0))
        band = torch.arange(lo, max(hi, lo), device=device)
        extra = lm_pos[(lm_pos < lo) | (lm_pos >= hi)]
        if causal:
            extra = extra[extra < r1]
        cols = torch.cat([band, extra])
        rows = torch.arange(r0, r1, device=device)
        mask = _visible(rows, cols, 1, nk, window_left, window_right, causal, lm_b, pad_b,
                        flags=fb)[0]
        valid = (rows >= 0) & (rows < nk)
        row_is_lm = fb[0, rows.clamp(0, nk - 1)] & valid
        yield rows - offset, cols, mask & ~row_is_lm[:, None]
    lm_rows = lm_pos - offset
    lm_rows = lm_rows[(lm_rows >= 0) & (lm_rows < nq)]
    if lm_rows.numel() > 0:
        cols = torch.arange(nk, device=device)
        mask = _visible(lm_rows + offset, cols, 1, nk, window_left, window_right, causal, lm_b,
                        pad_b, flags=fb)[0]
        yield lm_rows, cols, mask


def blocked_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_left: int = -1,
    window_right: int = -1,
    causal: bool = False,
    landmarks: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    bias: Optional[Tensor] = None,
    block_size: int = 256,
    compute_dtype: torch.dtype = torch.float32,
) -> Tuple[Tensor, Tensor]:
    """Memory-lean reference: per query block, attend only to the gathered keys it can see.

    Regular rows of a block see the window band [lo, hi) plus landmark keys outside it; landmark
    query rows (which see every key) are computed together afterwards. Peak extra memory is
    O(Hq * block_size * (band + G)) plus O(Hq * G * Nk) for the landmark rows.
    """
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    groups = Hq // Hk
    scale = D ** -0.5 if scale is None else scale
    flags = _landmark_flags(landmarks, B, Nk, q.device)
    out = q.new_zeros((B, Hq, Nq, Dv), dtype=compute_dtype)
    lse = q.new_full((B, Hq, Nq), float("-inf"), dtype=compute_dtype)
    for b in range(B):
        qb = q[b].to(compute_dtype)
        kb = _repeat_kv(k[b : b + 1].to(compute_dtype), groups)[0]
        vb = _repeat_kv(v[b : b + 1].to(compute_dtype), groups)[0]
        for rows, cols, mask in _pattern_blocks(b, Nq, Nk, window_left, window_right, causal,
                                                landmarks, key_padding_mask, flags, block_size,
                                                q.device):
            s = torch.matmul(qb[:, rows], kb[:, cols].transpose(-1, -2)) * scale
            s, _ = modified_scores(s, rows + (Nk - Nq), cols, Nk, softcap, bias)
            p, l = masked_softmax_lse(s, mask)
            has_rows = mask.any(dim=1)
            sel = rows[has_rows]
            out[b].index_copy_(1, sel, torch.matmul(p, vb[:, cols])[:, has_rows])
            lse[b].index_copy_(1, sel, l[:, has_rows])
    return out, lse


def blocked_reference_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    *,
    dlse: Optional[Tensor] = None,
    window_left: int = -1,
    window_right: int = -1,
    causal: bool = False,
    landmarks: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    bias: Optional[Tensor] = None,
    bias_grad: bool = False,
    block_size: int = 256,
    compute_dtype: torch.dtype = torch.float32,
):
    """Explicit gradients (dq, dk, dv) of :func:`blocked_reference` given its ``lse``; with
    ``bias_grad`` also dbias (Hq, Nq + Nk - 1), as a fourth element.

    With S the modified scores and P = exp(S - lse) on visible pairs: dV = P^T dO, dP = dO V^T,
    dS = P * (dP - rowsum(dO * O) + dlse), dbias[h, offset] = sum of dS over that offset,
    dQ = scale dS' K, dK = scale dS'^T Q with dS' = dS * (1 - tanh^2) under a softcap. Same
    blocks as the forward, so memory stays O(N * (window + landmarks)).
    """
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    groups = Hq // Hk
    scale = D ** -0.5 if scale is None else scale
    flags = _landmark_flags(landmarks, B, Nk, q.device)
    dq = q.new_zeros(q.shape, dtype=compute_dtype)
    dk = q.new_zeros((B, Hq, Nk, D), dtype=compute_dtype)
    dv = q.new_zeros((B, Hq, Nk, Dv), dtype=compute_dtype)
    dbias = (torch.zeros(Hq, Nq + Nk - 1, dtype=compute_dtype, device=q.device)
              if bias_grad and bias is not None else None)
    lse = lse.to(compute_dtype)
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    for b in range(B):
        qb = q[b].to(compute_dtype)
        kb = _repeat_kv(k[b : b + 1].to(compute_dtype), groups)[0]
        vb = _repeat_kv(v[b : b + 1].to(compute_dtype), groups)[0]
        dob = dout[b].to(compute_dtype)
        for rows, cols, mask in _pattern_blocks(b, Nq, Nk, window_left, window_right, causal,
                                                landmarks, key_padding_mask, flags, block_size,
                                                q.device):
            s = torch.matmul(qb[:, rows], kb[:, cols].transpose(-1, -2)) * scale
            s, dcap = modified_scores(s, rows + (Nk - Nq), cols, Nk, softcap, bias)
            p = torch.exp(s - lse_safe[b][:, rows, None]).masked_fill(~mask, 0.0)
            do_r = dob[:, rows]
            o_r = torch.matmul(p, vb[:, cols])
            delta = (do_r * o_r).sum(-1, keepdim=True)
            if dlse is not None:
                delta = delta - dlse[b][:, rows, None].to(compute_dtype)
            dp = torch.matmul(do_r, vb[:, cols].transpose(-1, -2))
            ds = p * (dp - delta)
            if dbias is not None:
                idx = offset_index(rows + (Nk - Nq), cols, Nk).reshape(-1)
                dbias.index_add_(1, idx, ds.reshape(Hq, -1))
            if dcap is not None:
                ds = ds * dcap
            dq[b].index_add_(1, rows, torch.matmul(ds, kb[:, cols]) * scale)
            dk[b].index_add_(1, cols, torch.matmul(ds.transpose(-1, -2), qb[:, rows]) * scale)
            dv[b].index_add_(1, cols, torch.matmul(p.transpose(-1, -2), do_r))
    if groups > 1:
        dk = dk.view(B, Hk, groups, Nk, D).sum(2)
        dv = dv.view(B, Hk, groups, Nk, Dv).sum(2)
    return (dq, dk, dv, dbias) if bias_grad else (dq, dk, dv)
