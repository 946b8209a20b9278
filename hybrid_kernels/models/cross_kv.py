"""Cross-attention K/V of one decoder layer, computed once per question, and attention over it.

Three ways to attend (combinable):

* fp32/bf16/fp16 K/V through :func:`hybrid_kernels.attention` (differentiable; used for training).
* INT8 K/V (``quant="int8"``, inference only): K and V are stored as int8 with one fp32 absmax
  scale per (batch, head, token) row of ``d_kv`` values, so a decoding step reads about a quarter
  of the bytes (plus 4/d_kv for the scales). q, the scores and the softmax stay fp32; the
  dequantization happens inside one fused kernel that ``torch.compile`` generates (inductor C++
  on CPU, Triton on GPU), so no fp32 copy of K/V is ever materialized. Where compiling is not
  possible the same math runs eagerly (dequantize, then matmul).
* Landmark sparse fusion (``top_passages=m``): every query scores each passage by its first
  token's key (mean over heads of q.k, T5's scale 1.0) and attends only to the m best passages,
  whose K/V rows are gathered for it.

K/V of all passages of a question are concatenated: N = P * L with every passage padded to the
same length L (``passage_len``). Several query rows may share one question (beams): a query batch
of B * G rows attends to a cache of batch B, the G rows of a question reading its K/V once.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import hybrid_kernels as hk

__all__ = ["CrossKV", "quantize_rows_int8", "int8_attention"]


def quantize_rows_int8(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Symmetric absmax int8 per row of the last dim: x (..., D) -> (int8 (..., D), fp32 scale (...))."""
    xf = x.float()
    scale = xf.abs().amax(-1).clamp_min(1e-12) / 127.0
    q = torch.round(xf / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _int8_attention_math(q: Tensor, k8: Tensor, ks: Tensor, v8: Tensor, vs: Tensor,
                         bias: Tensor) -> Tensor:
    # Written as broadcast-multiply + sum so inductor fuses the int8 -> fp32 conversion into the
    # reductions (one pass over the int8 bytes); do not rewrite as matmul.
    s = (q.unsqueeze(3) * k8.unsqueeze(2).to(torch.float32)).sum(-1) * ks.unsqueeze(2) + bias
    p = torch.softmax(s, dim=-1) * vs.unsqueeze(2)
    return (p.unsqueeze(-1) * v8.unsqueeze(2).to(torch.float32)).sum(3)


def _int8_attention_eager(q, k8, ks, v8, vs, bias):
    k = k8.to(torch.float32) * ks.unsqueeze(-1)
    v = v8.to(torch.float32) * vs.unsqueeze(-1)
    p = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)
    return p @ v


@functools.lru_cache(maxsize=None)
def _compiled_int8_attention():
    return torch.compile(_int8_attention_math, dynamic=True)


def _compile_allowed() -> bool:
    return os.environ.get("HYBRID_KERNELS_FID_COMPILE", "1") != "0"


def int8_attention(q: Tensor, k8: Tensor, ks: Tensor, v8: Tensor, vs: Tensor,
                   key_mask: Optional[Tensor], impl: str = "auto") -> Tensor:
    """Attention (scale 1.0) of fp32 q (B,H,M,D) over int8 K/V (B,H,N,D) with row scales (B,H,N).

    impl: "compiled" (fused dequantize, torch.compile), "eager", or "auto" (compiled when
    ``HYBRID_KERNELS_FID_COMPILE`` is not "0", falling back to eager if compiling fails).
    Returns fp32 (B,H,M,Dv).
    """
    if impl not in ("auto", "compiled", "eager"):
        raise ValueError(f"impl must be 'auto', 'compiled' or 'eager'; got {impl!r}")
    B, N = k8.shape[0], k8.shape[2]
    if key_mask is None:
        bias = q.new_zeros((B, 1, 1, N), dtype=torch.float32)
    else:
        bias = torch.zeros((B, 1, 1, N), dtype=torch.float32, device=q.device)
        bias.masked_fill_(~key_mask.view(B, 1, 1, N), float("-inf"))
    q = q.float()
    if impl == "eager" or (impl == "auto" and not _compile_allowed()):
        return _int8_attention_eager(q, k8, ks, v8, vs, bias)
    try:
        return _compiled_int8_attention()(q, k8, ks, v8, vs, bias)
    except Exception:  # no C++ compiler / inductor failure: same math, eagerly
        if impl == "compiled":
            raise
        return _int8_attention_eager(q, k8, ks, v8, vs, bias)


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
        if quant == "int8":
            if k.requires_grad or v.requires_grad:
                raise ValueError("int8 cross-attention K/V is inference-only; run under "
                                 "torch.no_grad() or use quant=None for training")
            self.k8, self.ks = quantize_rows_int8(k)
            self.v8, self.vs = quantize_rows_int8(v)
            self.k = self.v = None
        else:
            self.k, self.v = k, v

    def nbytes(self) -> int:
        """Bytes one decoding step reads from this cache (all passages)."""
        ts = (self.k8, self.ks, self.v8, self.vs) if self.quant == "int8" else (self.k, self.v)
        return sum(t.numel() * t.element_size() for t in ts)

    def attend(self, q: Tensor, *, top_passages: Optional[int] = None, backend: str = "auto",
               int8_impl: str = "auto") -> Tensor:
        """q (B*G, H, M, D) -> (B*G, H, M, Dv) in q's dtype; query row b*G+g reads question b."""
        Bq, H, M, D = q.shape
        B = self.batch
        if Bq % B != 0 or H != self.heads:
            raise ValueError(f"q of shape {tuple(q.shape)} does not fit a cross K/V cache of "
                             f"batch {B} and {self.heads} heads")
        G = Bq // B
        qg = q.reshape(B, G, H, M, D).transpose(1, 2).reshape(B, H, G * M, D)
        if top_passages is not None and 0 < top_passages < self.num_passages:
            out = self._attend_selected(qg, top_passages, backend, int8_impl)
        else:
            out = self._attend(qg, self.k, self.v, getattr(self, "k8", None),
                               getattr(self, "ks", None), getattr(self, "v8", None),
                               getattr(self, "vs", None), self.key_mask, backend, int8_impl)
        Dv = out.shape[-1]
        return out.reshape(B, H, G, M, Dv).transpose(1, 2).reshape(Bq, H, M, Dv).to(q.dtype)

    def _attend(self, q, k, v, k8, ks, v8, vs, key_mask, backend, int8_impl):
        if self.quant == "int8":
            return int8_attention(q, k8, ks, v8, vs, key_mask, int8_impl)
        return hk.attention(q, k.to(q.dtype), v.to(q.dtype), key_padding_mask=key_mask,
                            scale=1.0, backend=backend)

    def passage_scores(self, q: Tensor) -> Tensor:
        """Landmark score of every passage for every query: (B, M, P) fp32, -inf for padding."""
        s = torch.einsum("bhmd,bhpd->bmp", q.float(), self.landmark_k) / self.heads
        if self.passage_mask is not None:
            s = s.masked_fill(~self.passage_mask.unsqueeze(1), float("-inf"))
        return s

    def _attend_selected(self, q, m, backend, int8_impl):
        B, H, M, D = q.shape
        P, L = self.num_passages, self.passage_len
        idx = self.passage_scores(q).topk(m, dim=-1).indices.sort(dim=-1).values   # (B,M,m)
        gather = lambda t: None if t is None else _gather_passages(t, idx, P, L)  # noqa: E731
        km = None
        if self.key_mask is not None:
            km = _gather_passages(self.key_mask.unsqueeze(1), idx, P, L).squeeze(1)  # (B*M, m*L)
        qs = q.transpose(1, 2).reshape(B * M, H, 1, D)
        out = self._attend(qs, gather(self.k), gather(self.v), gather(getattr(self, "k8", None)),
                           gather(getattr(self, "ks", None)), gather(getattr(self, "v8", None)),
                           gather(getattr(self, "vs", None)), km, backend, int8_impl)
        return out.reshape(B, M, H, -1).transpose(1, 2)


def attend_dense_masked(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor]) -> Tensor:
    """Plain torch attention with scale 1.0 (for tests and benchmarks as an anchor)."""
    s = (q.float() @ k.float().transpose(-1, -2))
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return (F.softmax(s, -1) @ v.float()).to(q.dtype)
