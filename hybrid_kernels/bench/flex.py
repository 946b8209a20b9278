"""FlexAttention (torch.compile'd) in its best arrangement for each pattern.

* full: no block mask; causal / window: one block mask (band).
* window + landmarks: the G landmark keys are copied into one zero-padded front block of K/V
  (FRONT = G rounded up to flex's block size) and the window is a block mask over the rest. A
  landmark key is visible from the front block only to rows whose band does not hold it, so no
  pair counts twice, and only the front block's mask reads a tensor (the landmark positions): the
  band blocks stay block-aligned and their interior ones full. The G landmark query rows, which
  see every key, are one dense SDPA call whose rows replace flex's.
  Two slower arrangements, measured: one block mask with the window plus G scattered global
  columns skips few blocks (about 12 vs 80 GF/s at N=16384 on a 2-core AVX-512 machine); G
  unpadded front keys with the landmarks masked out of the band by a per-key lookup make every
  band block partial, and each of their elements a gather: 29.8 ms against 0.9 ms for the band
  alone on an H200 (fp16, B=4, H=16, N=16384, D=64).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .cases import Case
from .providers import Provider

__all__ = ["FlexProvider"]

_FLEX_BLOCK = 128  # flex_attention's default (Q, KV) block size


@functools.lru_cache(maxsize=None)
def _flex(compiled: bool = True):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def block_mask(*args, **kwargs):
        # Compiled mask evaluation: the eager one materializes every (q, kv) pair at once
        # (34 GB at N = 65536).
        return create_block_mask(*args, _compile=compiled, **kwargs)
    return (torch.compile(flex_attention, dynamic=False) if compiled else flex_attention,
            block_mask)


def _band(r, j, left: int, right: int, causal: bool):
    ok = (j <= r + right) if right >= 0 else (j == j)
    if left >= 0:
        ok = ok & (j >= r - left)
    if causal:
        ok = ok & (j <= r)
    return ok


class FlexProvider(Provider):
    name = "flex"
    description = "torch FlexAttention, compiled (window as block mask, landmarks in front)"

    def __init__(self, compiled: bool = True):
        self.compiled = compiled  # eager only for quick correctness tests of the arrangement

    def unavailable_reason(self, device: str) -> Optional[str]:
        try:
            import torch.nn.attention.flex_attention  # noqa: F401  (compiled on first use)
        except Exception as exc:  # torch too old
            return f"FlexAttention unavailable ({type(exc).__name__}: {exc})"
        return None

    def build(self, case: Case, q, k, v):
        flex, create_block_mask = _flex(self.compiled)
        p = case.pattern
        nq, nk, off = case.n_q, case.n, case.n - case.n_q
        kw = dict(scale=case.head_dim ** -0.5, enable_gqa=case.heads_q != case.heads_kv)
        left, right = case.window_lr
        causal = p.causal
        lm = case.landmarks() if p.window is not None else None  # no window: landmarks add nothing
        if p.window is None and not causal:
            return lambda: flex(q, k, v, **kw)
        if lm is None:
            def mask_mod(b, h, qi, kv):
                return _band(qi + off, kv, left, right, causal)
            bm = create_block_mask(mask_mod, None, None, nq, nk, device=q.device)
            return lambda: flex(q, k, v, block_mask=bm, **kw)

        g = lm.numel()
        front = -(-g // _FLEX_BLOCK) * _FLEX_BLOCK
        positions = lm.to(q.device)

        def mask_mod(b, h, qi, kv):
            r = qi + off
            lm_key = positions[kv.clamp(max=g - 1)]
            from_front = (kv < g) & ~_band(r, lm_key, left, right, causal)
            if causal:
                from_front = from_front & (lm_key <= r)
            return torch.where(kv < front, from_front, _band(r, kv - front, left, right, causal))

        bm = create_block_mask(mask_mod, None, None, nq, nk + front, device=q.device)
        rows = positions - off
        rows = rows[(rows >= 0) & (rows < nq)]
        row_mask = None
        if causal:
            row_mask = (torch.arange(nk, device=q.device)[None, :] <= (rows + off)[:, None])
        lm_kw = dict(scale=kw["scale"])
        if kw["enable_gqa"]:
            lm_kw["enable_gqa"] = True

        pad = q.new_zeros(k.shape[0], k.shape[1], front - g, k.shape[3])
        pad_v = q.new_zeros(v.shape[0], v.shape[1], front - g, v.shape[3])

        def run():
            k2 = torch.cat([k[:, :, positions], pad, k], dim=2)
            v2 = torch.cat([v[:, :, positions], pad_v, v], dim=2)
            out = flex(q, k2, v2, block_mask=bm, **kw)
            if rows.numel() == 0:
                return out
            out_rows = F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=row_mask,
                                                      **lm_kw)
            return out.index_copy(2, rows, out_rows)
        return run
