"""Validation of :func:`hybrid_kernels.attention`'s arguments into a normalized
:class:`~hybrid_kernels.pattern.Pattern` (errors name the argument, its shape/dtype/device and what
was expected)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .pattern import (Pattern, normalize_key_padding_mask, normalize_landmarks, normalize_scale,
                      normalize_window)
from .score_mods import combine_bias, normalize_softcap

__all__ = ["plan", "BACKENDS", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "cpu", "triton", "cuda", "reference")


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, N, D); got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16; got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got q {q.device}, k {k.device}, v {v.device}")
    (B, Hq, _, D), (Bk, Hk, Nk, Dk), (Bv, Hv, Nv, _) = q.shape, k.shape, v.shape
    if not (B == Bk == Bv):
        raise ValueError(f"batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hk != Hv or Nk != Nv:
        raise ValueError(f"k (B, Hk, Nk, D) and v (B, Hk, Nk, Dv) must agree on Hk and Nk; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if D != Dk:
        raise ValueError(f"q and k must have the same head dim D; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"the number of query heads Hq={Hq} must be a positive multiple of the "
                         f"number of key/value heads Hk={Hk} (MHA/GQA/MQA)")


def plan(q: Tensor, k: Tensor, v: Tensor, *, window=None, landmarks=None, causal: bool = False,
         key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
         quant: Optional[str] = None, softcap: Optional[float] = None,
         alibi_slopes: Optional[Tensor] = None,
         position_bias: Optional[Tensor] = None) -> Tuple[Pattern, Optional[str]]:
    """Validate the arguments of :func:`attention` and return (Pattern, quant)."""
    _check_qkv(q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool; got {type(causal).__name__}")
    if quant not in (None, "int8"):
        raise ValueError(f"quant must be None or 'int8'; got {quant!r}")
    B, Nk = q.shape[0], k.shape[2]
    left, right = normalize_window(window)
    return Pattern(
        window_left=left, window_right=right, causal=causal,
        landmarks=normalize_landmarks(landmarks, B, Nk, q.device),
        key_padding_mask=normalize_key_padding_mask(key_padding_mask, B, Nk, q.device),
        scale=normalize_scale(scale, q.shape[-1]),
        softcap=normalize_softcap(softcap),
        bias=combine_bias(alibi_slopes, position_bias, q.shape[1], q.shape[2], Nk, q.device),
    ), quant
