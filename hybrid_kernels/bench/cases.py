"""Benchmark cases: a pattern name plus a shape, the inputs it needs, and its exact FLOP count.

Pattern names are '+'-joined tokens: ``full``, ``causal``, ``window``, ``landmarks``, ``int8``
(e.g. ``window+landmarks``, ``causal+int8``). ``int8`` alone means ``window+landmarks+int8``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["Case", "PatternSpec", "parse_pattern", "DEFAULT_PATTERNS", "visible_pairs",
           "landmark_positions", "make_inputs", "DTYPES"]

DEFAULT_PATTERNS = ("full", "causal", "window", "window+landmarks", "int8")
_TOKENS = ("full", "causal", "window", "landmarks", "int8")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class PatternSpec:
    name: str
    window: Optional[Tuple[int, int]] = None   # None = unlimited
    num_landmarks: int = 0
    causal: bool = False
    quant: Optional[str] = None

    @property
    def is_dense(self) -> bool:
        """Full or causal attention: no window, no landmarks."""
        return self.window is None and self.num_landmarks == 0


def parse_pattern(name: str, window: Tuple[int, int] = (256, 256),
                  num_landmarks: int = 16) -> PatternSpec:
    tokens = [t.strip() for t in name.lower().split("+") if t.strip()]
    bad = [t for t in tokens if t not in _TOKENS]
    if not tokens or bad:
        raise ValueError(f"unknown pattern {name!r}: use '+'-joined tokens from {_TOKENS} "
                         f"(e.g. 'window+landmarks')")
    if tokens == ["int8"]:
        tokens = ["window", "landmarks", "int8"]
    has_window = "window" in tokens
    return PatternSpec(name=name, window=tuple(window) if has_window else None,
                       num_landmarks=num_landmarks if "landmarks" in tokens else 0,
                       causal="causal" in tokens, quant="int8" if "int8" in tokens else None)


@dataclass(frozen=True)
class Case:
    """One measured configuration (self-attention shapes: Nq == Nk == N unless nq given)."""
    pattern: PatternSpec
    n: int
    dtype: torch.dtype = torch.float32
    mode: str = "fwd"            # "fwd" | "bwd"
    batch: int = 1
    heads_q: int = 8
    heads_kv: int = 8
    head_dim: int = 64
    device: str = "cpu"
    nq: Optional[int] = None

    @property
    def n_q(self) -> int:
        return self.n if self.nq is None else self.nq

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, str(self.dtype))

    @property
    def window_lr(self) -> Tuple[int, int]:
        return self.pattern.window if self.pattern.window is not None else (-1, -1)

    def with_mode(self, mode: str) -> "Case":
        return replace(self, mode=mode)

    def label(self) -> str:
        return (f"{self.pattern.name} {self.dtype_name} {self.mode} B={self.batch} "
                f"H={self.heads_q}/{self.heads_kv} N={self.n} D={self.head_dim}")

    def landmarks(self) -> Optional[Tensor]:
        return landmark_positions(self.n, self.pattern.num_landmarks, self.device)

    def hk_kwargs(self) -> Dict:
        """Keyword arguments for ``hk.attention``."""
        return dict(window=self.pattern.window, landmarks=self.landmarks(),
                    causal=self.pattern.causal, quant=self.pattern.quant)

    def reference_kwargs(self) -> Dict:
        """Keyword arguments for hybrid_kernels.reference functions."""
        left, right = self.window_lr
        lm = self.landmarks()
        return dict(window_left=left, window_right=right, causal=self.pattern.causal,
                    landmarks=None if lm is None else lm.unsqueeze(0).expand(self.batch, -1),
                    key_padding_mask=None, scale=self.head_dim ** -0.5)

    def pairs(self) -> int:
        """Visible (query, key) pairs per (batch, head)."""
        left, right = self.window_lr
        return visible_pairs(self.n_q, self.n, left, right, self.pattern.causal, self.landmarks())

    def flops(self) -> float:
        """Visible-pair FLOPs: 4*pairs*D forward (QK^T and PV), 2.5x that for the backward."""
        fwd = 4.0 * self.pairs() * self.head_dim * self.batch * self.heads_q
        return fwd if self.mode == "fwd" else 2.5 * fwd

    def io_bytes(self) -> int:
        """Bytes of q, k, v and the output."""
        el = torch.tensor([], dtype=self.dtype).element_size()
        d = self.head_dim
        return el * self.batch * d * (2 * self.heads_q * self.n_q + 2 * self.heads_kv * self.n)


def landmark_positions(n: int, count: int, device="cpu") -> Optional[Tensor]:
    """``count`` evenly spaced key positions in [0, n) (sorted, unique), or None."""
    if count <= 0 or n <= 0:
        return None
    count = min(count, n)
    return torch.div(torch.arange(count) * n, count, rounding_mode="floor").to(device)


def visible_pairs(nq: int, nk: int, left: int, right: int, causal: bool,
                  landmarks: Optional[Tensor]) -> int:
    """Exact number of visible (query, key) pairs of the contract, in O(Nq log G) without a mask.

    Row i (aligned position r = i + Nk - Nq) sees: every key (up to r if causal) when r is a
    landmark; otherwise the clipped window band plus the landmark keys outside the band.
    """
    r = torch.arange(nq, dtype=torch.int64) + (nk - nq)
    lo = torch.zeros_like(r) if left < 0 else (r - left).clamp(min=0)
    hi = torch.full_like(r, nk - 1) if right < 0 else (r + right).clamp(max=nk - 1)
    if causal:
        hi = torch.minimum(hi, r)
    band = (hi - lo + 1).clamp(min=0)
    if landmarks is None or landmarks.numel() == 0:
        return int(band.sum())
    lm = landmarks.detach().to("cpu", torch.int64).reshape(-1)
    lm_in_band = (torch.searchsorted(lm, hi, right=True)
                  - torch.searchsorted(lm, lo, right=False)).clamp(min=0)
    lm_in_band = torch.where(band > 0, lm_in_band, torch.zeros_like(lm_in_band))
    lm_allowed = (torch.searchsorted(lm, r, right=True) if causal
                  else torch.full_like(r, lm.numel()))
    regular = band + lm_allowed - lm_in_band
    is_lm_row = torch.zeros(nk, dtype=torch.bool)
    is_lm_row[lm] = True
    valid = (r >= 0) & (r < nk)
    row_is_lm = valid & is_lm_row[r.clamp(0, nk - 1)]
    full_row = (r.clamp(max=nk - 1) + 1).clamp(min=0) if causal else torch.full_like(r, nk)
    return int(torch.where(row_is_lm, full_row, regular).sum())


def make_inputs(case: Case, seed: int = 0, requires_grad: bool = False) -> List[Tensor]:
    """q, k, v (standard normal) for ``case``, on its device and dtype."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shapes = [(case.batch, case.heads_q, case.n_q, case.head_dim),
              (case.batch, case.heads_kv, case.n, case.head_dim),
              (case.batch, case.heads_kv, case.n, case.head_dim)]
    out = []
    for shape in shapes:
        t = torch.randn(shape, generator=gen).to(device=case.device, dtype=case.dtype)
        out.append(t.requires_grad_(requires_grad))
    return out
