"""Sequence-parallel (context-parallel) window + landmark attention over a torch.distributed group.

Rank r of P holds rows [s, e) of the sequence (contiguous, in rank order, any lengths) of q, k
and v. With window (left, right), its rows see keys [s - left, e - 1 + right] plus the landmark
keys, so it fetches only those (a halo of at most left + right rows, several ranks away when the
window is wider than a shard, and the landmark rows) point-to-point: O(window + landmarks) rows
per rank, flat in N, where ring attention sends O(N). Its rows are then computed by the local
kernels (``hk.attention``): one call over the left halo and its own keys (the landmark keys
outside first), one over the right halo for the rows whose window reaches it, merged by
log-sum-exp (see _local_forward).

Landmark query rows see every key: every rank computes their partial softmax state over its own
keys (a G x n_local product), the states are all-gathered and merged by log-sum-exp, and each
owner writes its rows.

Backward: one autograd Function whose backward runs the communication in a fixed order on every
rank (all_reduce of the landmark-state gradients, then the halo gradients back to their owners),
so ranks can never wait on different exchanges.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

import hybrid_kernels as hk
from ..pattern import (normalize_key_padding_mask, normalize_landmarks, normalize_scale,
                       normalize_window)
from .agreement import agree
from .comm import CommStats, RowExchange, Shards, all_gather

__all__ = ["attention"]


@dataclass(frozen=True)
class _Geometry:
    """Rank rows [s, e); window keys [a, b); the landmark keys outside [a, e) (extras), which
    call (a) takes first."""
    s: int
    e: int
    a: int
    b: int
    extras: Tensor  # global positions, sorted

    @property
    def request(self) -> Tensor:
        return torch.cat([self.extras, torch.arange(self.a, self.s), torch.arange(self.e, self.b)])


def _geometry(shards: Shards, rank: int, window: Tuple[int, int], causal: bool,
              lm: Tensor) -> _Geometry:
    s, e, n = shards.starts[rank], shards.ends[rank], shards.total
    left, right = window
    a = 0 if left < 0 else max(0, s - left)
    b = e if causal else (n if right < 0 else min(n, e + right))
    outside = (lm < a) if causal else ((lm < a) | (lm >= e))
    return _Geometry(s, e, a, b, lm[outside])


def _softmax_weights(x: Tensor, dim: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Unnormalized softmax weights of logits ``x`` (-inf: excluded) over ``dim``:
    (w, denominator with 1 where nothing was seen, logsumexp with -inf there). NaN-free in
    forward and backward for slices that saw nothing."""
    m = x.amax(dim, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(x - m)                                      # 0 where excluded
    den = w.sum(dim)
    empty = den == 0
    den_safe = torch.where(empty, torch.ones_like(den), den)
    lse = torch.where(empty, torch.full_like(den, float("-inf")),
                      m.squeeze(dim) + torch.log(den_safe))
    return w, den_safe, lse


def _merge_states(outs: Tensor, lses: Tensor) -> Tuple[Tensor, Tensor]:
    """Merge softmax states over dim 0: outs (S, ..., Dv) normalized, lses (S, ...) (-inf: saw
    nothing); rows that saw nothing get out 0, lse -inf."""
    w, den, lse = _softmax_weights(lses, 0)
    return (w.unsqueeze(-1) * outs).sum(0) / den.unsqueeze(-1), lse


def _landmark_partial(q_lm: Tensor, k: Tensor, v: Tensor, lm: Tensor, s: int,
                      kpm: Optional[Tensor], causal: bool, scale: float) -> Tensor:
    """The softmax state of the landmark query rows q_lm (B, Hq, G, D) over this rank's keys
    [s, s + n): (B, Hq, G, Dv + 1) fp32, the normalized output then the lse."""
    B, Hq, G, D = q_lm.shape
    Hk = k.shape[1]
    ql = q_lm.float().reshape(B, Hk, (Hq // Hk) * G, D)  # the q heads of a kv head, stacked
    scores = torch.matmul(ql, k.float().transpose(-1, -2)).view(B, Hq, G, -1) * scale
    dev = scores.device
    keys = torch.arange(s, s + k.shape[2], device=dev)
    visible = torch.ones(scores.shape[0], 1, lm.numel(), keys.numel(), dtype=torch.bool, device=dev)
    if causal:
        visible = visible & (keys[None, :] <= lm.to(dev)[:, None])[None, None]
    if kpm is not None:
        visible = visible & kpm[:, None, None, s:s + k.shape[2]]
    w, den, lse = _softmax_weights(scores.masked_fill(~visible, float("-inf")), -1)
    out = torch.matmul(w.reshape(B, Hk, (Hq // Hk) * G, -1), v.float()).view(B, Hq, G, -1)
    return torch.cat([out / den.unsqueeze(-1), lse.unsqueeze(-1)], dim=-1)


@dataclass
class _Call:
    """Everything one rank's forward and backward need besides the tensors."""
    geo: _Geometry
    lm: Tensor                      # global landmark positions (G,), sorted
    kv_exchange: RowExchange         # the halo and outside landmark keys (and values)
    q_exchange: Optional[RowExchange]
    window: Tuple[int, int]
    causal: bool
    kpm: Optional[Tensor]           # (B, N) global
    scale: float
    quant: Optional[str]
    backend: str
    group: object
    stats: CommStats


def _local_forward(c: _Call, q: Tensor, k: Tensor, v: Tensor, k_fetched: Tensor,
                   v_fetched: Tensor, q_lm: Optional[Tensor]):
    """This rank's rows before the landmark-row merge: (out, lse, landmark partial or None).

    (a) its rows over [landmark keys outside [a, e)] + keys [a, e) (the left halo, then its own):
        with hk's alignment of queries to the end of the keys, window, causality, padding and the
        landmark keys are those of the global call;
    (b) (not causal, right > 0) the rows whose window reaches past e, over the right halo [e, b),
        the window shifted by the halo's length and its landmark keys masked out (they are in
        (a)); merged with (a) by log-sum-exp."""
    g = c.geo
    n_x, n_left = g.extras.numel(), g.s - g.a
    common = dict(scale=c.scale, quant=c.quant, return_lse=True, backend=c.backend)
    dev = q.device
    in_band = c.lm[(c.lm >= g.a) & (c.lm < g.e)]
    lm_a = torch.cat([torch.arange(n_x), in_band - g.a + n_x]).to(dev)
    kpm_a = None if c.kpm is None else torch.cat([c.kpm[:, g.extras.to(dev)], c.kpm[:, g.a:g.e]], dim=1)
    ka, va = k, v
    if n_x + n_left:
        ka = torch.cat([k_fetched[:, :, :n_x + n_left], k], dim=2)
        va = torch.cat([v_fetched[:, :, :n_x + n_left], v], dim=2)
    out, lse = hk.attention(q, ka, va, window=c.window, causal=c.causal,
                            landmarks=lm_a if lm_a.numel() else None, key_padding_mask=kpm_a,
                            **common)
    if g.b > g.e:  # (b)
        right, n2 = c.window[1], g.b - g.e
        s2 = 0 if right < 0 else max(0, (g.e - g.s) - right)
        keep = torch.ones(q.shape[0], n2, dtype=torch.bool, device=dev)
        keep[:, (c.lm[(c.lm >= g.e) & (c.lm < g.b)] - g.e).to(dev)] = False
        if c.kpm is not None:
            keep = keep & c.kpm[:, g.e:g.b]
        halo = slice(n_x + n_left, None)
        out_b, lse_b = hk.attention(q[:, :, s2:], k_fetched[:, :, halo], v_fetched[:, :, halo],
                                    window=(-1, -1 if right < 0 else right - n2),
                                    key_padding_mask=keep, **common)
        merged, merged_lse = _merge_states(torch.stack([out[:, :, s2:].float(), out_b.float()]),
                                           torch.stack([lse[:, :, s2:], lse_b]))
        out = torch.cat([out[:, :, :s2], merged.to(out.dtype)], dim=2)
        lse = torch.cat([lse[:, :, :s2], merged_lse], dim=2)
    partial = None
    if q_lm is not None:
        partial = _landmark_partial(q_lm, k, v, c.lm, g.s, c.kpm, c.causal, c.scale)
    return out, lse, partial


def _write_landmark_rows(c: _Call, out: Tensor, lse: Tensor, parts: Tensor):
    """Merge the gathered landmark-row states (P, B, Hq, G, Dv + 1) and write this rank's rows."""
    merged, merged_lse = _merge_states(parts[..., :-1], parts[..., -1])
    own = torch.nonzero((c.lm >= c.geo.s) & (c.lm < c.geo.e)).flatten()
    if own.numel() == 0:
        return out, lse
    dev = out.device
    rows, own = (c.lm[own] - c.geo.s).to(dev), own.to(dev)
    out = out.index_copy(2, rows, merged[:, :, own].to(out.dtype))
    lse = lse.index_copy(2, rows, merged_lse[:, :, own])
    return out, lse


class _SequenceParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, c: _Call):
        k_fetched = c.kv_exchange.forward(k, c.stats, "halo+landmark keys")
        v_fetched = c.kv_exchange.forward(v, c.stats, "halo+landmark values")
        q_lm = c.q_exchange.forward(q, c.stats, "landmark queries") if c.q_exchange else None
        grad = any(ctx.needs_input_grad[:3])
        leaves = [t.detach().requires_grad_(grad) for t in (q, k, v, k_fetched, v_fetched)]
        if q_lm is not None:
            leaves.append(q_lm.detach().requires_grad_(grad))
        with torch.enable_grad() if grad else torch.no_grad():
            out, lse, partial = _local_forward(c, *leaves[:5], leaves[5] if q_lm is not None else None)
        parts_leaf = None
        if partial is not None:
            parts = all_gather(partial.detach(), group=c.group, stats=c.stats, kind="landmark states")
            parts_leaf = parts.requires_grad_(grad)
            with torch.enable_grad() if grad else torch.no_grad():
                final_out, final_lse = _write_landmark_rows(c, out, lse, parts_leaf)
        else:
            final_out, final_lse = out, lse
        ctx.c = c
        ctx.saved = (leaves, out, lse, partial, parts_leaf, final_out, final_lse)
        return final_out.detach(), final_lse.detach()

    @staticmethod
    def backward(ctx, dout: Tensor, dlse: Tensor):
        c = ctx.c
        leaves, out, lse, partial, parts_leaf, final_out, final_lse = ctx.saved
        dlse = torch.zeros_like(final_lse) if dlse is None else dlse
        dout = torch.zeros_like(final_out) if dout is None else dout
        if parts_leaf is not None:  # 1. the landmark-row merge, then its all_reduce
            d_out, d_lse, d_parts = torch.autograd.grad(
                [final_out, final_lse], [out, lse, parts_leaf], [dout, dlse], allow_unused=True)
            d_parts = torch.zeros_like(parts_leaf) if d_parts is None else d_parts.contiguous()
            dist.all_reduce(d_parts, group=c.group)
            c.stats.add("grad", d_parts[0].numel() * d_parts.element_size())
            outputs, grads = [out, lse, partial], [d_out, d_lse, d_parts[dist.get_rank(c.group)]]
        else:
            outputs, grads = [out, lse], [dout, dlse]
        keep = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        dleaves = torch.autograd.grad([o for o, _ in keep], leaves, [g for _, g in keep],
                                      allow_unused=True)
        dq, dk, dv, dk_f, dv_f = [torch.zeros_like(t) if d is None else d
                                  for t, d in zip(leaves[:5], dleaves[:5])]
        # 2. the fetched keys' and values' gradients back to their owners, then the landmark
        # queries': the same order on every rank.
        dk = dk + c.kv_exchange.backward(dk_f, leaves[1].shape, c.stats)
        dv = dv + c.kv_exchange.backward(dv_f, leaves[2].shape, c.stats)
        if c.q_exchange is not None:
            dq_lm = torch.zeros_like(leaves[5]) if dleaves[5] is None else dleaves[5]
            dq = dq + c.q_exchange.backward(dq_lm, leaves[0].shape, c.stats)
        return dq, dk, dv, None


def _signature(q, k, v, window, landmarks, causal, kpm, scale, quant, backend) -> dict:
    def digest(t: Tensor) -> Tuple:
        t = t.detach().cpu().contiguous()
        return tuple(t.shape), str(t.dtype), zlib.crc32(t.numpy().tobytes())
    if landmarks is None or isinstance(landmarks, int):
        lm = landmarks
    elif isinstance(landmarks, Tensor):
        lm = digest(landmarks)
    else:
        lm = repr(landmarks)
    return {"q": (q.shape[0], q.shape[1], q.shape[3]), "k": (k.shape[1], k.shape[3]),
            "v": (v.shape[1], v.shape[3]), "dtype": str(q.dtype), "device": q.device.type,
            "window": window, "causal": causal, "scale": scale, "quant": quant,
            "backend": backend, "landmarks": lm,
            "key_padding_mask": None if kpm is None else digest(kpm),
            "requires_grad": bool(q.requires_grad or k.requires_grad or v.requires_grad),
            "n_local": q.shape[2]}


def _check_local(q, k, v, window, causal, scale, quant) -> Tuple[Tuple[int, int], float]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, N_local, D); got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if not (q.shape[2] == k.shape[2] == v.shape[2]) or q.shape[2] < 1:
        raise ValueError(f"q, k and v must hold the same N_local >= 1 rows of this rank's shard; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if quant not in (None, "int8"):
        raise ValueError(f"quant must be None or 'int8'; got {quant!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool; got {type(causal).__name__}")
    return normalize_window(window), normalize_scale(scale, q.shape[-1])


def attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, window=None, landmarks=None,
              causal: bool = False, key_padding_mask: Optional[Tensor] = None,
              scale: Optional[float] = None, quant: Optional[str] = None,
              return_lse: bool = False, backend: str = "auto",
              stats: Optional[CommStats] = None):
    """``hk.attention`` over a sequence sharded across the ranks of ``group``.

    Args:
        q, k, v: this rank's shard, (B, Hq, n, D), (B, Hk, n, D), (B, Hk, n, Dv); rank r holds
            the rows after those of ranks 0..r-1 (shards may differ in length). Nq = Nk = N, the
            sum of the shards.
        window, landmarks, causal, key_padding_mask, scale, quant, backend: as in
            ``hk.attention``, in global coordinates and the same on every rank (landmarks: int
            stride, (G,) or (B, G) positions; key_padding_mask: (B, N) bool).
        stats: a :class:`CommStats` that receives the bytes this rank sends.

    Returns:
        this rank's rows of the output (B, Hq, n, Dv), and the lse (B, Hq, n) if ``return_lse``.
        Differentiable (``quant="int8"``: forward only, as in ``hk.attention``).

    Every rank raises the same error when any rank's arguments are invalid or the ranks disagree
    (:class:`~hybrid_kernels.distributed.agreement.RankDisagreement`).
    """
    error, sig = None, {}
    try:
        window_n, scale_n = _check_local(q, k, v, window, causal, scale, quant)
        sig = _signature(q, k, v, window_n, landmarks, causal, key_padding_mask, scale_n, quant,
                         backend)
    except (TypeError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    sigs = agree(sig, error, group=group, per_rank=("n_local",), what="distributed.attention")
    shards = Shards.from_lengths([s["n_local"] for s in sigs])
    N, B = shards.total, q.shape[0]
    lm = normalize_landmarks(landmarks, B, N, torch.device("cpu"))
    if isinstance(key_padding_mask, Tensor):
        key_padding_mask = key_padding_mask.to(q.device)
    kpm = normalize_key_padding_mask(key_padding_mask, B, N, q.device)  # (B, N): global
    stats = CommStats() if stats is None else stats
    if lm is not None and not bool((lm == lm[:1]).all()):  # per-batch landmarks: one call per row
        rows = [_attend(q[i:i + 1], k[i:i + 1], v[i:i + 1], shards, lm[i], window_n, causal,
                        None if kpm is None else kpm[i:i + 1], scale_n, quant, backend, group,
                        stats, tag=16 * (i + 1)) for i in range(B)]
        out, lse = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    else:
        out, lse = _attend(q, k, v, shards, None if lm is None else lm[0], window_n, causal, kpm,
                           scale_n, quant, backend, group, stats, tag=0)
    return (out, lse) if return_lse else out


def _attend(q, k, v, shards: Shards, lm: Optional[Tensor], window, causal, kpm, scale, quant,
            backend, group, stats, tag: int):
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    lm = torch.empty(0, dtype=torch.int64) if lm is None else lm.to(torch.int64)
    geos: List[_Geometry] = [_geometry(shards, r, window, causal, lm) for r in range(P)]
    kv_ex = RowExchange(shards, [g.request for g in geos], group=group, tag=tag)
    q_ex = RowExchange(shards, [lm] * P, group=group, tag=tag + 2) if lm.numel() else None
    call = _Call(geos[rank], lm, kv_ex, q_ex, window, causal, kpm, scale, quant, backend, group,
                 stats)
    return _SequenceParallelAttention.apply(q, k, v, call)
