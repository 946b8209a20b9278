"""Cross-attention K/V of one decoder layer, computed once per question, and attention over it.

Three ways to attend (combinable):

* fp32/bf16/fp16 K/V through :func:`hybrid_kernels.attention` (differentiable; used for training).
* INT8 K (``quant="int8"``, inference only): the package's one INT8 definition through an
  :class:`~hybrid_kernels.int8_cache.Int8KVCache` (K smoothed and quantized once per 64-token
  block, V in bf16, q quantized per call inside the kernel, exact-score lse), so a decoding step
  reads 3/8 of the fp32 bytes; the output is rounded to bf16.
* Landmark sparse fusion (``top_passages=m``): every query scores each passage by its first
  token's key (mean over heads of q.k, T5's scale 1.0) and attends only to the m best passages,
  whose K/V rows are gathered for it.

K/V of all passages of a question are concatenated: N = P * L with every passage padded to the
same length L (``passage_len``). Several query rows may share one question (beams): a query batch
of B * G rows attends to a cache of batch B, the G rows of a question reading its K/V once.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import hybrid_kernels as hk
from hybrid_kernels.int8_cache import Int8KVCache

__all__ = ["CrossKV", "attend_dense_masked"]


def _gather_passages(t: Tensor, idx: Tensor, P: int, L: int) -> Tensor:
    """t (B,H,P*L,*rest), idx (B,M,m) -> (B*M, H, m*L, *rest): the chosen passages per query."""
    B, H = t.shape[:2]
    rest = t.shape[3:]
    tp = t.reshape(B, H, P, L, *rest).transpose(1, 2)                      # (B,P,H,L,*rest)
    b = torch.arange(B, device=t.device).view(B, 1, 1)
    g = tp[b, idx]                                                          # (B,M,m,H,L,*rest)
    M, m = idx.shape[1], idx.shape[2]
    return g.transpose(2, 3).reshape(B * M, H, m * L, *rest)


class CrossKV:
    """One layer's cross-attention keys/values for a batch of questions.

    Args:
        k, v: (B, H, N, D) projected encoder states, N = n_passages * passage_len.
        key_mask: bool (B, N), True = real token, or None.
        passage_len: L; needed for landmark sparse fusion (default: N, one passage).
        quant: None or "int8" (inference only).
    """

    def __init__(self, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None,
                 passage_len: Optional[int] = None, quant: Optional[str] = None):
        if quant not in (None, "int8"):
            raise ValueError(f"quant must be None or 'int8'; got {quant!r}")
        B, H, N, _ = k.shape
        L = N if passage_len is None else int(passage_len)
        if L <= 0 or N % L != 0:
            raise ValueError(f"passage_len must divide the key length N={N}; got {passage_len}")
        self.batch, self.heads, self.length, self.passage_len = B, H, N, L
        self.num_passages = N // L
        self.key_mask = key_mask
        self.quant = quant
        self.landmark_k = k[:, :, ::L].float()                              # (B,H,P,D)
        self.passage_mask = None if key_mask is None else key_mask[:, ::L]  # (B,P)
        self.k = self.v = self.int8 = None
        if quant == "int8":
            if k.requires_grad or v.requires_grad:
                raise ValueError("int8 cross-attention K/V is inference-only; run under "
                                 "torch.no_grad() or use quant=None for training")
            self.int8 = Int8KVCache.from_kv(k, v.to(torch.bfloat16), key_padding_mask=key_mask)
        else:
            self.k, self.v = k, v

    def nbytes(self) -> int:
        """Bytes one decoding step reads from this cache (all passages)."""
        if self.int8 is not None:
            return self.int8.nbytes
        return sum(t.numel() * t.element_size() for t in (self.k, self.v))

    def attend(self, q: Tensor, *, top_passages: Optional[int] = None,
               backend: str = "auto") -> Tensor:
        """q (B*G, H, M, D) -> (B*G, H, M, Dv) in q's dtype; query row b*G+g reads question b."""
        Bq, H, M, D = q.shape
        B = self.batch
        if Bq % B != 0 or H != self.heads:
            raise ValueError(f"q of shape {tuple(q.shape)} does not fit a cross K/V cache of "
                             f"batch {B} and {self.heads} heads")
        G = Bq // B
        qg = q.reshape(B, G, H, M, D).transpose(1, 2).reshape(B, H, G * M, D)
        if top_passages is not None and 0 < top_passages < self.num_passages:
            out = self._attend_selected(qg, top_passages, backend)
        elif self.int8 is not None:
            out = self.int8.attention(qg.to(torch.bfloat16), scale=1.0)
        else:
            out = hk.attention(qg, self.k.to(qg.dtype), self.v.to(qg.dtype),
                               key_padding_mask=self.key_mask, scale=1.0, backend=backend)
        Dv = out.shape[-1]
        return out.reshape(B, H, G, M, Dv).transpose(1, 2).reshape(Bq, H, M, Dv).to(q.dtype)

    def passage_scores(self, q: Tensor) -> Tensor:
        """Landmark score of every passage for every query: (B, M, P) fp32, -inf for padding."""
        s = torch.einsum("bhmd,bhpd->bmp", q.float(), self.landmark_k) / self.heads
        if self.passage_mask is not None:
            s = s.masked_fill(~self.passage_mask.unsqueeze(1), float("-inf"))
        return s

    def _attend_selected(self, q, m, backend):
        B, H, M, D = q.shape
        P, L = self.num_passages, self.passage_len
        idx = self.passage_scores(q).topk(m, dim=-1).indices.sort(dim=-1).values   # (B,M,m)
        km = None
        if self.key_mask is not None:
            km = _gather_passages(self.key_mask.unsqueeze(1), idx, P, L).squeeze(1)  # (B*M, m*L)
        qs = q.transpose(1, 2).reshape(B * M, H, 1, D)
        if self.int8 is None:
            out = hk.attention(qs, _gather_passages(self.k, idx, P, L).to(qs.dtype),
                               _gather_passages(self.v, idx, P, L).to(qs.dtype),
                               key_padding_mask=km, scale=1.0, backend=backend)
        else:
            out = self._selected_int8_cache(idx, km).attention(qs.to(torch.bfloat16), scale=1.0)
        return out.reshape(B, M, H, -1).transpose(1, 2)

    def _selected_int8_cache(self, idx: Tensor, key_mask: Optional[Tensor]) -> Int8KVCache:
        """The int8 cache of each query's chosen passages, (B*M, H, m*L, D): the tokens and their
        whole quantization blocks gathered (no requantization; the smoothing mean is the full
        cache's, which changes no softmax row and keeps the lse exact)."""
        c, P, L = self.int8, self.num_passages, self.passage_len
        if L % c.block != 0:
            raise ValueError(f"top_passages with quant='int8' needs passage_len to be a multiple "
                             f"of the int8 block ({c.block}); got passage_len={L}")
        BM = idx.shape[0] * idx.shape[1]
        scales = _gather_passages(c.k_scale.unsqueeze(-1), idx, P, L // c.block).squeeze(-1)
        return Int8KVCache(k8=_gather_passages(c.k8, idx, P, L), k_scale=scales,
                           k_mean=c.k_mean.repeat_interleave(BM // c.k_mean.shape[0], dim=0),
                           v=_gather_passages(c.v, idx, P, L), key_padding_mask=key_mask,
                           block=c.block)


def attend_dense_masked(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor]) -> Tensor:
    """Plain torch attention with scale 1.0 (for tests and benchmarks as an anchor)."""
    s = (q.float() @ k.float().transpose(-1, -2))
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return (F.softmax(s, -1) @ v.float()).to(q.dtype)
