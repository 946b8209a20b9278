"""FlexAttention (torch.compile'd) in its best arrangement for each pattern.

* full: no block mask; causal / window: one block mask (band).
* window + landmarks: the G landmark keys are copied in front of K/V and the window is a block
  mask over the rest (landmark keys masked out there so no pair counts twice); the G landmark
  query rows, which see every key, are one dense SDPA call whose rows replace flex's. One block
  mask holding the window plus G scattered global columns skips few blocks and is several times
  slower (about 12 vs 80 GF/s at N=16384 on a 2-core AVX-512 machine).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .cases import Case
from .providers import Provider

__all__ = ["FlexProvider"]


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
        positions = lm.to(q.device)
        is_lm = torch.zeros(nk, dtype=torch.bool, device=q.device)
        is_lm[positions] = True

        def mask_mod(b, h, qi, kv):
            r = qi + off
            front = kv < g
            lm_key = positions[kv.clamp(max=g - 1)]
            j = (kv - g).clamp(min=0)
            front_ok = (lm_key <= r) if causal else (lm_key >= 0)
            rest_ok = _band(r, j, left, right, causal) & ~is_lm[j]
            return torch.where(front, front_ok, rest_ok)

        bm = create_block_mask(mask_mod, None, None, nq, nk + g, device=q.device)
        rows = positions - off
        rows = rows[(rows >= 0) & (rows < nq)]
        row_mask = None
        if causal:
            row_mask = (torch.arange(nk, device=q.device)[None, :] <= (rows + off)[:, None])
        lm_kw = dict(scale=kw["scale"])
        if kw["enable_gqa"]:
            lm_kw["enable_gqa"] = True

        def run():
            k2 = torch.cat([k[:, :, positions], k], dim=2)
            v2 = torch.cat([v[:, :, positions], v], dim=2)
            out = flex(q, k2, v2, block_mask=bm, **kw)
            if rows.numel() == 0:
                return out
            out_rows = F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=row_mask,
                                                      **lm_kw)
            return out.index_copy(2, rows, out_rows)
        return run
